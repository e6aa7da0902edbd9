"""`sovereign token`: mint an access token from the personal node's local issuer.

Takes a profile (identity.provider local), a user and roles; prints only the token on
stdout, so `TOKEN=$(sovereign token --user ada --role user)` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.output import fail
from sovereign.cli.profile import load_or_exit
from sovereign.issuer import IssuerError, ensure_keys, mint
from sovereign.profile.defaults import EMBEDDED_DEFAULT_NAME
from sovereign.profile.types import duration_seconds

# A local token cannot be revoked before it expires, so its lifetime is bounded.
MAX_TTL_SECONDS = 30 * 86400


@app.command()
def token(
    file: Annotated[
        Path | None, typer.Argument(help="profile file; the embedded personal default if left out")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="the token's subject")] = None,
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
    issuer_url = str(identity.issuer).rstrip("/")
    if identity.provider != "local":
        raise fail(
            f"identity.provider is {identity.provider} in {source}; get tokens from {issuer_url}"
        )
    if not user:
        raise fail("--user is required")
    if not role:
        raise fail(f"at least one --role is required; known roles: {', '.join(identity.roles)}")
    unknown = [name for name in role if name not in identity.roles]
    if unknown:
        raise fail(
            f"role {', '.join(unknown)} is not in identity.roles of {source}; "
            f"known roles: {', '.join(identity.roles)}"
        )
    try:
        ttl_seconds = duration_seconds(ttl)
    except ValueError as exc:
        raise fail(f"--ttl: {exc}") from None
    if ttl_seconds > MAX_TTL_SECONDS:
        raise fail(f"--ttl {ttl} is longer than the 30d a local token may live")
    if not client:
        raise fail("--client must not be empty")
    try:
        issuer = ensure_keys(Path(identity.local_key_dir))
    except IssuerError as exc:
        raise fail(f"{exc} (identity.local_key_dir in {source})") from None
    print(
        mint(
            issuer,
            issuer_url=issuer_url,
            audience=identity.audience,
            subject=user,
            roles=list(dict.fromkeys(role)),
            client_id=client,
            ttl_seconds=ttl_seconds,
        )
    )
