"""Check a token the local issuer minted, as the gateway would: by its JWKS, audience, issuer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK

ISSUER = "http://127.0.0.1:8000/local"
AUDIENCE = "sovereign-gateway"


def verified_claims(token: str, key_dir: Path, **overrides: Any) -> dict[str, Any]:
    jwks = json.loads((key_dir / "jwks.json").read_text())
    header = jwt.get_unverified_header(token)
    [entry] = [key for key in jwks["keys"] if key["kid"] == header["kid"]]
    options: dict[str, Any] = {"audience": AUDIENCE, "issuer": ISSUER, **overrides}
    claims: dict[str, Any] = jwt.decode(token, key=PyJWK(entry), algorithms=["EdDSA"], **options)
    return claims
