"""The local token issuer (`oidc.provider: local`): an Ed25519 key pair and its JWKS.

Takes the issuer directory; gives a `LocalIssuer` (the keys are created on first use) and
signed access tokens shaped like Keycloak's, so the gateway treats both issuers alike.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sovereign_gateway.contract import KeyFileError, load_or_create_private_key, write_atomic

SIGNING_KEY = "signing-key.pem"
JWKS = "jwks.json"
ALGORITHM = "EdDSA"


class IssuerError(Exception):
    """The key directory or a key in it cannot be used; the message names the path."""


@dataclass(frozen=True)
class LocalIssuer:
    key_dir: Path
    private_key: Ed25519PrivateKey
    kid: str


def public_jwk(private_key: Ed25519PrivateKey) -> dict[str, str]:
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    x = _b64url(raw)
    # RFC 7638: the required members only, sorted, no whitespace.
    thumbprint = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    kid = _b64url(hashlib.sha256(thumbprint.encode()).digest())
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def jwks_path(key_dir: Path) -> Path:
    return key_dir / JWKS


def ensure_keys(key_dir: Path) -> LocalIssuer:
    """Load the issuer in `key_dir`, creating the directory, key and JWKS when missing."""
    key_path = key_dir / SIGNING_KEY
    try:
        if not key_dir.is_dir():
            key_dir.mkdir(mode=0o700, parents=True)
            os.chmod(key_dir, 0o700)  # mkdir's mode is filtered by the umask
        # Racing first runs all end up with the one key that won, so the JWKS matches it.
        private_key = load_or_create_private_key(key_path)
        jwk = public_jwk(private_key)
        _ensure_jwks(jwks_path(key_dir), jwk)
    except KeyFileError as exc:
        raise IssuerError(str(exc)) from None
    except OSError as exc:
        where = exc.filename or key_dir
        raise IssuerError(f"issuer keys: cannot use {where}: {exc.strerror}") from None
    return LocalIssuer(key_dir=key_dir, private_key=private_key, kid=jwk["kid"])


def mint(
    issuer: LocalIssuer,
    *,
    issuer_url: str,
    audience: str,
    subject: str,
    roles: list[str],
    client_id: str = "sovereign-cli",
    ttl_seconds: int = 3600,
    now: int | None = None,
) -> str:
    """A signed access token for `subject` with `roles`, valid for `ttl_seconds` from `now`."""
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    issued = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer_url,
        "aud": audience,
        "sub": subject,
        "preferred_username": subject,
        "azp": client_id,
        "roles": list(roles),
        "realm_access": {"roles": list(roles)},
        # Keycloak's marker for an access token; the gateway refuses ID and refresh tokens.
        "typ": "Bearer",
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(
        claims,
        issuer.private_key,
        algorithm=ALGORITHM,
        headers={"kid": issuer.kid, "typ": "JWT"},
    )


def _ensure_jwks(path: Path, jwk: dict[str, str]) -> None:
    # The private key is the source of truth; the JWKS is derived from it, so a missing,
    # unreadable or stale one is rewritten rather than refused.
    try:
        document = json.loads(path.read_bytes())
        keys = document.get("keys") if isinstance(document, dict) else None
        if isinstance(keys, list) and jwk in keys:
            return
    except (OSError, ValueError):
        pass
    write_atomic(path, (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode(), 0o644)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
