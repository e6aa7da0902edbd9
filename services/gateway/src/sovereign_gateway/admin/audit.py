"""`admin audit verify PATH`: check an audit log's chain, checkpoints, signatures and HEAD.

Exit 0 intact, 1 tampered or damaged (the first bad seq named), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from sovereign_gateway.admin.base import EXIT_FAILED, AdminError
from sovereign_gateway.audit import AuditInputError, load_public_key, verify


def run_verify(args: argparse.Namespace) -> int:
    path: Path = args.path
    try:
        key = None if args.public_key is None else load_public_key(args.public_key)
        report = verify(path, key)
    except AuditInputError as error:
        raise AdminError(str(error)) from None
    except OSError as error:
        raise AdminError(f"{path}: cannot read: {error.strerror or error}") from None
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    elif report.ok:
        span = "" if report.first_seq is None else f", seq {report.first_seq}..{report.last_seq}"
        print(
            f"✓ {path}: intact: {report.records} record(s){span}, "
            f"{report.checkpoints} checkpoint(s)"
        )
    else:
        first = report.problems[0]
        print(f"✗ {path}: not intact")
        where = "" if first.seq is None else f"seq {first.seq}: "
        print(f"{where}{first.kind}: {first.detail}")
        others = len(report.problems) - 1
        if others:
            print(f"and {others} other problem(s); --json lists them all")
    if not args.json:
        for note in report.notes:
            print(f"  note: {note}")
    return 0 if report.ok else EXIT_FAILED
