"""`sovereign lock keygen|create|verify` (delegated to the gateway's admin with the render's
config): a signed manifest, or why one does not hold (exit 1) or cannot be checked (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.delegate import admin, render_config

lock_app = typer.Typer(
    help="Create and verify the signed compliance lock of a rendered node.",
    no_args_is_help=True,
)
app.add_typer(lock_app, name="lock")


@lock_app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for lock.key and lock.pub")],
) -> None:
    """Write a new Ed25519 signing key (lock.key, 0600) and its public key (lock.pub)."""
    admin("lock", "keygen", "--out", out)


@lock_app.command()
def create(
    render: Annotated[Path, typer.Option("--render", help="a `sovereign render` output directory")],
    key: Annotated[Path, typer.Option("--key", help="the Ed25519 private key (PEM) to sign with")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the manifest")],
) -> None:
    """Pin the render's models, policy bundle, gateway config and egress mode, and sign it."""
    admin("lock", "create", "--config", render_config(render), "--key", key, "--out", out)


@lock_app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="the lock manifest")],
    public_key: Annotated[Path, typer.Option("--public-key", help="Ed25519 public key (PEM)")],
    render: Annotated[
        Path | None, typer.Option("--render", help="also check this render for drift")
    ] = None,
) -> None:
    """Check the manifest's signature and, with --render, that the render still matches it."""
    drift: list[str | Path] = [] if render is None else ["--config", render_config(render)]
    admin("lock", "verify", manifest, "--public-key", public_key, *drift)
