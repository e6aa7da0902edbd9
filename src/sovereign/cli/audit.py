"""`sovereign audit verify`: check a gateway audit log (delegates to `sovereign-gateway admin`).

Exit 0 intact, 1 tampered or damaged (the first bad seq named), 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.delegate import admin

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
    key: list[str | Path] = [] if public_key is None else ["--public-key", public_key]
    admin("audit", "verify", path, *key, *(["--json"] if as_json else []))
