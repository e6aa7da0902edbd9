"""`admin memory check` and `admin keys rotate`, run while the gateway is stopped.

Exit 0 done or clean; 1 findings left, or keys or stores that cannot be opened; 2 bad
input. Each change is recorded in the node's audit log, as the gateway would.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from sovereign_gateway.admin.base import EXIT_FAILED, AdminError, config_from
from sovereign_gateway.audit import AuditLog
from sovereign_gateway.contract import GatewayConfig, load_or_create_private_key, resolve
from sovereign_gateway.memory import envelope
from sovereign_gateway.memory.catalog import Catalog
from sovereign_gateway.memory.errors import MemoryFailure
from sovereign_gateway.memory.service import (
    CATALOG_FILE,
    KEYRING_FILE,
    CheckReport,
    Memory,
    kek_settings,
    open_memory,
)

Result = TypeVar("Result")
NEW_PASSPHRASE_VARIABLE = "SOVEREIGN_MEMORY_NEW_PASSPHRASE"  # noqa: S105 (a name, not a secret)


def run_check(args: argparse.Namespace) -> int:
    async def work(memory: Memory) -> CheckReport:
        return await memory.check(repair=args.repair)

    config = config_from(args.config)
    report = with_memory(args.config, config, work)
    if report.repaired:
        record_event(args.config, config, "memory.repair", report.as_dict())
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report)
    return EXIT_FAILED if not report.clean and not report.repaired else 0


def run_rotate(args: argparse.Namespace) -> int:
    config_path: Path = args.config
    config = config_from(config_path)
    memory = config.memory

    def resolved(value: str) -> Path:
        return resolve(config_path, value)

    data_dir = resolved(memory.data_dir)
    try:
        old = envelope.recorded_settings(
            data_dir / KEYRING_FILE,
            passphrase=envelope.passphrase_from_environment(),
            tpm_tcti=memory.tpm_tcti,
        )
        new = dataclasses.replace(
            kek_settings(memory, resolved),
            passphrase=_new_passphrase() if memory.key_source == "passphrase" else None,
        )
        catalog = Catalog(data_dir / CATALOG_FILE)
    except MemoryFailure as failure:
        raise AdminError(str(failure), EXIT_FAILED) from None
    try:
        ring = envelope.KeyRing.open(old, create=False)
        before = ring.current.version

        def rewrap(ring: envelope.KeyRing, kek: envelope.Kek) -> int:
            def one(doc_id: str, version: int, wrapped: bytes) -> bytes:
                return kek.wrap(ring.kek(version).unwrap(wrapped, doc_id), doc_id)

            return catalog.rewrap(one, kek.version)

        count = ring.rotate(new, rewrap)
    except MemoryFailure as failure:
        raise AdminError(str(failure), EXIT_FAILED) from None
    except ValueError as error:
        raise AdminError(str(error)) from None
    finally:
        catalog.close()
    record_event(
        config_path,
        config,
        "memory.keys.rotate",
        {
            "from": {"version": before, "source": old.source},
            "to": {"version": ring.current.version, "source": new.source},
            "rewrapped": count,
        },
    )
    print(
        f"✓ KEK v{before} ({envelope.describe(old)}) → v{ring.current.version} "
        f"({envelope.describe(new)}): {count} data key(s) rewrapped, ciphertexts untouched"
    )
    return 0


def with_memory(
    config_path: Path, config: GatewayConfig, work: Callable[[Memory], Awaitable[Result]]
) -> Result:
    """Open the node's memory, run `work`, close it; a memory failure is exit 1."""

    async def run() -> Result:
        async with aiohttp.ClientSession(trust_env=False) as session:
            memory = await open_memory(
                config.memory,
                lambda value: resolve(config_path, value),
                lambda: session,
                create=False,
            )
            try:
                return await work(memory)
            finally:
                await memory.close()

    try:
        return asyncio.run(run())
    except MemoryFailure as failure:
        raise AdminError(str(failure), EXIT_FAILED) from None


def record_event(
    config_path: Path, config: GatewayConfig, action: str, details: dict[str, Any]
) -> None:
    """Append the change to the node's audit log, as the gateway would have."""
    settings = config.audit

    async def append() -> None:
        log = AuditLog(
            resolve(config_path, settings.path),
            load_or_create_private_key(resolve(config_path, settings.signing_key)),
            checkpoint_records=settings.checkpoint_records,
            checkpoint_interval_seconds=settings.checkpoint_interval_seconds,
            segment_max_bytes=settings.segment_max_bytes,
            profile=config.profile,
        )
        await log.open()
        try:
            await log.append(
                {
                    "type": "event",
                    "action": action,
                    "resource": "/documents",
                    "actor": {
                        "sub": f"cli:{getpass.getuser()}",
                        "client": "sovereign-gateway admin",
                        "roles": [],
                    },
                    "memory": details,
                }
            )
        finally:
            await log.close()

    try:
        asyncio.run(append())
    except Exception as exc:
        raise AdminError(
            f"the change is done but could not be audited: {exc}", EXIT_FAILED
        ) from None


def _print(report: CheckReport) -> None:
    findings = (
        (report.pending, "interrupted ingest (never visible)", "removed"),
        (report.orphan_ciphertext, "ciphertext file with no record", "removed"),
        (report.missing_ciphertext, "record whose ciphertext is gone", "removed"),
        (report.unindexed, "ciphertext with no index entry", "re-indexed"),
        (report.unknown_vectors, "index entries with no ciphertext", "removed"),
    )
    if report.clean:
        print(f"✓ memory: {report.documents} document(s), no orphans")
        return
    for ids, what, done in findings:
        for doc_id in ids:
            action = f" ({done})" if report.repaired else ""
            print(f"  {what}: {doc_id}{action}")
    verdict = "repaired" if report.repaired else "run again with --repair to fix"
    print(f"✗ memory: orphans found; {verdict}")


def _new_passphrase() -> str:
    given = os.environ.get(NEW_PASSPHRASE_VARIABLE)
    if given:
        return given
    if not sys.stdin.isatty():
        raise AdminError(f"the new passphrase: set {NEW_PASSPHRASE_VARIABLE} or run on a terminal")
    first = getpass.getpass("new memory passphrase: ")
    if first != getpass.getpass("repeat it: "):
        raise AdminError("the two passphrases differ; nothing was changed")
    return first
