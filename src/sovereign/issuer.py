"""The personal node's local token issuer: an Ed25519 key pair and the JWKS the gateway reads.

Takes a key directory; gives a `LocalIssuer` (creating the keys on first use) and signed
access tokens shaped like Keycloak's, so the gateway treats both issuers alike.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def ensure_keys(key_dir: Path) -> LocalIssuer:
    """Load the issuer in `key_dir`, creating the directory, key and JWKS when missing."""
    key_path = key_dir / SIGNING_KEY
    try:
        if not key_dir.is_dir():
            key_dir.mkdir(mode=0o700, parents=True)
            os.chmod(key_dir, 0o700)  # mkdir's mode is filtered by the umask
        if not key_path.exists():
            _create_key(key_path)
        private_key = _load_key(key_path)
        jwk = public_jwk(private_key)
        _ensure_jwks(key_dir / JWKS, jwk)
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


def _create_key(key_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = _write_temporary(key_path, pem, 0o600)
    try:
        # link, unlike replace, never clobbers: when two first runs race, one key wins
        # and both go on with it, so the JWKS always matches the key that signs.
        os.link(temporary, key_path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    _fsync_directory(key_path.parent)


def _load_key(key_path: Path) -> Ed25519PrivateKey:
    data = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IssuerError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IssuerError(f"{key_path} is not an Ed25519 private key")
    return key


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
    text = json.dumps({"keys": [jwk]}, indent=2) + "\n"
    temporary = _write_temporary(path, text.encode(), 0o644)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """A fully written, fsynced temp file next to `path`, ready to be renamed into place."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
