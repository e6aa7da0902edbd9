"""`admin token`: mint an access token from the node's local issuer (`oidc.provider: local`).

Prints only the token on stdout, so `TOKEN=$(sovereign-gateway admin token ...)` works.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sovereign_gateway import issuer
from sovereign_gateway.admin.base import AdminError, config_from
from sovereign_gateway.contract import KeyFileError, duration_seconds, resolve

# A local token cannot be revoked before it expires, so its lifetime is bounded.
MAX_TTL_SECONDS = 30 * 86400


def run(args: argparse.Namespace) -> int:
    config_path: Path = args.config
    config = config_from(config_path)
    oidc = config.oidc
    if oidc.provider != "local" or oidc.local_issuer_dir is None:
        raise AdminError(
            f"oidc.provider is {oidc.provider} in {config_path}; get tokens from {oidc.issuer}"
        )
    known = ", ".join(config.roles)
    if not args.user:
        raise AdminError("--user is required")
    if not args.role:
        raise AdminError(f"at least one --role is required; known roles: {known}")
    unknown = [name for name in args.role if name not in config.roles]
    if unknown:
        raise AdminError(
            f"role {', '.join(unknown)} is not one of the node's roles; known roles: {known}"
        )
    try:
        ttl_seconds = duration_seconds(args.ttl)
    except ValueError as exc:
        raise AdminError(f"--ttl: {exc}") from None
    if ttl_seconds > MAX_TTL_SECONDS:
        raise AdminError(f"--ttl {args.ttl} is longer than the 30d a local token may live")
    if not args.client:
        raise AdminError("--client must not be empty")
    key_dir = resolve(config_path, oidc.local_issuer_dir)
    try:
        keys = issuer.ensure_keys(key_dir)
    except (issuer.IssuerError, KeyFileError) as exc:
        raise AdminError(f"{exc} (the local issuer's directory)") from None
    print(
        issuer.mint(
            keys,
            issuer_url=oidc.issuer,
            audience=oidc.audience,
            subject=args.user,
            roles=list(dict.fromkeys(args.role)),
            client_id=args.client,
            ttl_seconds=ttl_seconds,
        )
    )
    return 0
