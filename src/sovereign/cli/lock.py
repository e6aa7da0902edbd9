"""`sovereign lock keygen|create|verify`: make, sign and check the compliance lock.

Takes a render directory and an Ed25519 key pair; gives a signed manifest, or the reasons
a manifest does not hold (exit 1) or cannot be checked (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError
from sovereign_gateway.config import GatewayConfig, load_config, resolve
from sovereign_gateway.keyfiles import KeyFileError, load_private_key, write_atomic
from sovereign_gateway.lock import (
    LockError,
    LockFacts,
    create_manifest,
    drift,
    facts_for,
    key_id,
    load_verified,
)

from sovereign.cli import app
from sovereign.cli.output import EXIT_FAILED, console, errors, fail

lock_app = typer.Typer(
    help="Create and verify the signed compliance lock of a rendered node.",
    no_args_is_help=True,
)
app.add_typer(lock_app, name="lock")

PRIVATE_KEY = "lock.key"
PUBLIC_KEY = "lock.pub"
CONFIG = Path("gateway") / "config.json"


@lock_app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for lock.key and lock.pub")],
) -> None:
    """Write a new Ed25519 signing key (lock.key, 0600) and its public key (lock.pub)."""
    for name in (PRIVATE_KEY, PUBLIC_KEY):
        if (out / name).exists():
            raise fail(f"refusing to overwrite {out / name}; move it away or choose another --out")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / PRIVATE_KEY, private_pem, 0o600)
        write_atomic(out / PUBLIC_KEY, public_pem, 0o644)
    except OSError as exc:
        raise fail(f"cannot write keys into {out}: {exc.strerror}") from None
    console.print(f"{out / PRIVATE_KEY}  [dim]private, keep it off the node[/dim]")
    console.print(f"{out / PUBLIC_KEY}  [dim]key id {key_id(key.public_key())[:16]}[/dim]")


@lock_app.command()
def create(
    render: Annotated[Path, typer.Option("--render", help="a `sovereign render` output directory")],
    key: Annotated[Path, typer.Option("--key", help="the Ed25519 private key (PEM) to sign with")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the manifest")],
) -> None:
    """Pin the render's models, policy bundle, gateway config and egress mode, and sign it."""
    config_path = render / CONFIG
    config = load_gateway_config(config_path)
    bundle = resolve(config_path, config.policy.bundle)
    if not bundle.is_dir():
        raise fail(f"{config_path}: policy.bundle {bundle} is not a directory")
    try:
        private_key = load_private_key(key)
    except KeyFileError as exc:
        raise fail(str(exc)) from None
    facts = _facts(config_path, config)
    try:
        manifest = create_manifest(
            facts, profile=config.profile, kind=config.kind, private_key=private_key
        )
    except ValueError as exc:
        raise fail(f"{config_path}: {exc}") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, manifest, 0o644)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror}") from None
    console.print(f"{out}  [dim]locks {len(facts.models)} model(s), policy and config[/dim]")


@lock_app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="the lock manifest")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Ed25519 public key (PEM)")],
    render: Annotated[
        Path | None, typer.Option("--render", help="also check this render for drift")
    ] = None,
) -> None:
    """Check the manifest's signature and, with --render, that the render still matches it."""
    try:
        verified = load_verified(manifest, public_key)
    except LockError as error:
        if error.code in ("missing", "key_unreadable"):
            raise fail(str(error)) from None
        raise fail(f"violation: {error}", EXIT_FAILED) from None
    if render is not None:
        config_path = render / CONFIG
        reasons = drift(verified, _facts(config_path, load_gateway_config(config_path)))
        if reasons:
            for reason in reasons:
                errors.print(f"violation: {reason}", markup=False)
            raise typer.Exit(EXIT_FAILED)
    checked = "signature and render" if render is not None else "signature"
    console.print(f"[green]✓[/green] {manifest}: {checked} ok (key {verified['key_id'][:16]})")


def load_gateway_config(path: Path) -> GatewayConfig:
    """A render's gateway config, or an `error:` line and exit 2."""
    try:
        return load_config(path)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise fail(f"{path}: {where}: {first['msg']}") from None


def _facts(config_path: Path, config: GatewayConfig) -> LockFacts:
    try:
        return facts_for(config_path, config)
    except OSError as exc:
        raise fail(f"cannot read {exc.filename or config_path}: {exc.strerror}") from None
