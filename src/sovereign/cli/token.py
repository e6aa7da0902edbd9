"""`sovereign token`: an access token from the profile's local issuer, minted by the
gateway's `admin token`; only the token goes to stdout, so `TOKEN=$(sovereign token ...)`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.delegate import admin
from sovereign.cli.output import fail
from sovereign.cli.profile import load_or_exit
from sovereign.profile.defaults import EMBEDDED_DEFAULT_NAME
from sovereign.render.gateway import gateway_config


@app.command()
def token(
    file: Annotated[
        Path | None, typer.Argument(help="profile file; the embedded personal default if left out")
    ] = None,
    user: Annotated[str, typer.Option("--user", help="the token's subject")] = "",
    role: Annotated[
        list[str] | None, typer.Option("--role", help="a role from identity.roles (repeatable)")
    ] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="lifetime: 3600s, 30m, 1h, ... 30d")] = "1h",
    client: Annotated[str, typer.Option("--client", help="the azp (client id)")] = "sovereign-cli",
) -> None:
    """Print an access token signed by the local issuer (identity.provider local)."""
    profile = load_or_exit(file)
    source = EMBEDDED_DEFAULT_NAME if file is None else str(file)
    identity = profile.identity
    if identity.provider != "local":
        issuer_url = str(identity.issuer).rstrip("/")
        raise fail(
            f"identity.provider is {identity.provider} in {source}; get tokens from {issuer_url}"
        )
    roles = [argument for name in role or [] for argument in ("--role", name)]
    with tempfile.TemporaryDirectory(prefix="sovereign-token-") as directory:
        config = Path(directory) / "config.json"
        config.write_text(gateway_config(profile).model_dump_json())
        admin("token", "--config", config, "--user", user, *roles, "--ttl", ttl, "--client", client)
