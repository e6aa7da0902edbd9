"""`sovereign audit verify`: check a gateway audit log's chain, checkpoints and signatures.

Takes a log directory or one segment file (and optionally the trusted public key); gives a
verdict on stdout and exit 0 (intact), 1 (tampered or damaged) or 2 (bad input).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from sovereign_gateway.audit import AuditInputError, load_public_key, verify

from sovereign.cli import app
from sovereign.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, console, errors

audit_app = typer.Typer(help="Check the gateway's tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def verify_command(
    path: Annotated[Path, typer.Argument(help="audit log directory, or one segment file")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="trusted Ed25519 public key (PEM); else the log's own audit.pub, "
            "which whoever can rewrite the log can also replace",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Verify every record, the chain, the checkpoints and HEAD.json; name the first bad seq."""
    try:
        key = None if public_key is None else load_public_key(public_key)
        report = verify(path, key)
    except AuditInputError as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as error:
        errors.print(f"error: {path}: cannot read: {error.strerror or error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    elif report.ok:
        span = "" if report.first_seq is None else f", seq {report.first_seq}..{report.last_seq}"
        console.print(
            f"✓ {path}: intact: {report.records} record(s){span}, "
            f"{report.checkpoints} checkpoint(s)",
            markup=False,
        )
    else:
        first = report.problems[0]
        console.print(f"✗ {path}: not intact", markup=False)
        where = "" if first.seq is None else f"seq {first.seq}: "
        console.print(f"{where}{first.kind}: {first.detail}", markup=False)
        others = len(report.problems) - 1
        if others:
            console.print(f"and {others} other problem(s); --json lists them all", markup=False)
    if not as_json:
        for note in report.notes:
            console.print(f"  note: {note}", markup=False)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
