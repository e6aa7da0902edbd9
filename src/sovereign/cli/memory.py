"""`sovereign memory check` and `sovereign keys rotate`: look after the encrypted memory.

Both take a render directory (its gateway/config.json names the data dir, the key source
and the stores) and run while the gateway is stopped: the embedded vector store is held
by one process at a time. Exit 0: done (or clean); 1: findings left, or the keys or
stores could not be opened; 2: bad input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import aiohttp
import typer
from sovereign_gateway.audit import AuditLog
from sovereign_gateway.config import GatewayConfig, resolve
from sovereign_gateway.keyfiles import load_or_create_private_key
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

from sovereign.cli import app
from sovereign.cli.lock import CONFIG, load_gateway_config
from sovereign.cli.output import EXIT_FAILED, console, fail

memory_app = typer.Typer(help="Check and repair the node's encrypted memory.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

Result = TypeVar("Result")
RenderOption = Annotated[
    Path, typer.Option("--render", help="a `sovereign render` output directory")
]


def record_event(
    config_path: Path, config: GatewayConfig, action: str, details: dict[str, Any]
) -> None:
    """Append the change to the node's audit log, as the gateway would have."""
    audit = config.audit

    async def append() -> None:
        log = AuditLog(
            resolve(config_path, audit.path),
            load_or_create_private_key(resolve(config_path, audit.signing_key)),
            checkpoint_records=audit.checkpoint_records,
            checkpoint_interval_seconds=audit.checkpoint_interval_seconds,
            segment_max_bytes=audit.segment_max_bytes,
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
                        "client": "sovereign",
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
        raise fail(f"the change is done but could not be audited: {exc}", EXIT_FAILED) from None


def with_memory(
    render: Path, work: Callable[[Memory], Awaitable[Result]]
) -> tuple[GatewayConfig, Result]:
    """Open the render's memory, run `work`, close it; a memory failure is exit 1."""
    config_path = render / CONFIG
    config = load_gateway_config(config_path)

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
        return config, asyncio.run(run())
    except MemoryFailure as failure:
        raise fail(str(failure), EXIT_FAILED) from None


@memory_app.command("check")
def check(
    render: RenderOption,
    repair: Annotated[
        bool, typer.Option("--repair", help="remove orphans and re-index lost vectors")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Compare the catalog's ciphertexts with the vector index; name every orphan."""

    async def work(memory: Memory) -> CheckReport:
        return await memory.check(repair=repair)

    config, report = with_memory(render, work)
    if report.repaired:
        record_event(render / CONFIG, config, "memory.repair", report.as_dict())
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report)
    if not report.clean and not report.repaired:
        raise typer.Exit(EXIT_FAILED)


def _print(report: CheckReport) -> None:
    findings = (
        (report.pending, "interrupted ingest (never visible)", "removed"),
        (report.orphan_ciphertext, "ciphertext file with no record", "removed"),
        (report.missing_ciphertext, "record whose ciphertext is gone", "removed"),
        (report.unindexed, "ciphertext with no index entry", "re-indexed"),
        (report.unknown_vectors, "index entries with no ciphertext", "removed"),
    )
    if report.clean:
        console.print(f"✓ memory: {report.documents} document(s), no orphans", markup=False)
        return
    for ids, what, done in findings:
        for doc_id in ids:
            action = f" ({done})" if report.repaired else ""
            console.print(f"  {what}: {doc_id}{action}", markup=False)
    verdict = "repaired" if report.repaired else "run again with --repair to fix"
    console.print(f"✗ memory: orphans found; {verdict}", markup=False)


keys_app = typer.Typer(
    help="Manage keys: the memory's key-encryption keys and bundle signing keys.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

NEW_PASSPHRASE_VARIABLE = "SOVEREIGN_MEMORY_NEW_PASSPHRASE"  # noqa: S105 (a name, not a secret)


@keys_app.command("rotate")
def rotate(render: RenderOption) -> None:
    """Wrap every document's data key under a new KEK from the render's key source.

    The ciphertexts are not touched. The old KEK opens the keys (its passphrase from
    SOVEREIGN_MEMORY_PASSPHRASE); the new one is made from the profile's memory settings:
    a new key file, a passphrase (SOVEREIGN_MEMORY_NEW_PASSPHRASE, or asked twice), or a
    key sealed to the TPM's PCRs as they are now. So a profile that switches key_source,
    say file to tpm, migrates with one rotation.
    """
    config_path = render / CONFIG
    config = load_gateway_config(config_path)
    memory = config.memory

    def resolved(value: str) -> Path:
        return resolve(config_path, value)

    data_dir = resolved(memory.data_dir)
    keyring_path = data_dir / KEYRING_FILE
    try:
        old = envelope.recorded_settings(
            keyring_path,
            passphrase=envelope.passphrase_from_environment(),
            tpm_tcti=memory.tpm_tcti,
        )
        new = dataclasses.replace(
            kek_settings(memory, resolved),
            passphrase=_new_passphrase() if memory.key_source == "passphrase" else None,
        )
        catalog = Catalog(data_dir / CATALOG_FILE)
    except MemoryFailure as failure:
        raise fail(str(failure), EXIT_FAILED) from None
    try:
        ring = envelope.KeyRing.open(old, create=False)
        before = ring.current.version

        def rewrap(ring: envelope.KeyRing, kek: envelope.Kek) -> int:
            def one(doc_id: str, version: int, wrapped: bytes) -> bytes:
                return kek.wrap(ring.kek(version).unwrap(wrapped, doc_id), doc_id)

            return catalog.rewrap(one, kek.version)

        count = ring.rotate(new, rewrap)
    except MemoryFailure as failure:
        raise fail(str(failure), EXIT_FAILED) from None
    except ValueError as error:
        raise fail(str(error)) from None
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
    console.print(
        f"✓ KEK v{before} ({envelope.describe(old)}) → v{ring.current.version} "
        f"({envelope.describe(new)}): {count} data key(s) rewrapped, ciphertexts untouched",
        markup=False,
    )


def _new_passphrase() -> str:
    given = os.environ.get(NEW_PASSPHRASE_VARIABLE)
    if given:
        return given
    if not sys.stdin.isatty():
        raise fail(f"the new passphrase: set {NEW_PASSPHRASE_VARIABLE} or run on a terminal")
    return str(typer.prompt("new memory passphrase", hide_input=True, confirmation_prompt=True))
