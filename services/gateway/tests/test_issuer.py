"""The local issuer: its keys, its JWKS and the tokens it mints."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.issuer import IssuerError, ensure_keys, mint, public_jwk

from services.gateway.tests.tokens import AUDIENCE, ISSUER, verified_claims


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- keys ---------------------------------------------------------------------------------


def test_ensure_keys_creates_a_private_directory_and_key(tmp_path: Path) -> None:
    key_dir = tmp_path / "state" / "issuer"
    issuer = ensure_keys(key_dir)
    assert _mode(key_dir) == 0o700
    assert _mode(key_dir / "signing-key.pem") == 0o600
    assert (key_dir / "signing-key.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    [jwk] = json.loads((key_dir / "jwks.json").read_text())["keys"]
    assert jwk == public_jwk(issuer.private_key)
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"], jwk["kid"]) == (
        "OKP",
        "Ed25519",
        "EdDSA",
        "sig",
        issuer.kid,
    )
    assert "d" not in jwk


def test_ensure_keys_loads_the_same_key_on_later_calls(tmp_path: Path) -> None:
    first = ensure_keys(tmp_path / "issuer")
    jwks_before = (tmp_path / "issuer" / "jwks.json").read_bytes()
    second = ensure_keys(tmp_path / "issuer")
    assert second.kid == first.kid
    assert (tmp_path / "issuer" / "jwks.json").read_bytes() == jwks_before


def test_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    # The Ed25519 key of RFC 8037 appendix A.1 and its thumbprint from appendix A.3.
    d = base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    jwk = public_jwk(Ed25519PrivateKey.from_private_bytes(d))
    assert jwk["x"] == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk["kid"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_missing_or_stale_jwks_is_rewritten_from_the_key(tmp_path: Path) -> None:
    issuer = ensure_keys(tmp_path / "issuer")
    jwks = tmp_path / "issuer" / "jwks.json"
    jwks.write_text('{"keys": []}')
    ensure_keys(tmp_path / "issuer")
    assert json.loads(jwks.read_text())["keys"][0]["kid"] == issuer.kid
    jwks.unlink()
    ensure_keys(tmp_path / "issuer")
    assert json.loads(jwks.read_text())["keys"][0]["kid"] == issuer.kid


def test_corrupt_signing_key_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "issuer").mkdir()
    (tmp_path / "issuer" / "signing-key.pem").write_text("not a key")
    with pytest.raises(IssuerError, match=str(tmp_path / "issuer" / "signing-key.pem")):
        ensure_keys(tmp_path / "issuer")


def test_key_dir_that_is_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "issuer").write_text("")
    with pytest.raises(IssuerError, match=str(tmp_path / "issuer")):
        ensure_keys(tmp_path / "issuer")


# -- tokens -------------------------------------------------------------------------------


def test_minted_token_verifies_against_the_jwks(tmp_path: Path) -> None:
    issuer = ensure_keys(tmp_path / "issuer")
    token = mint(issuer, issuer_url=ISSUER, audience=AUDIENCE, subject="ada", roles=["user"])
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["typ"], header["kid"]) == ("EdDSA", "JWT", issuer.kid)
    claims = verified_claims(token, tmp_path / "issuer")
    assert claims["sub"] == claims["preferred_username"] == "ada"
    assert claims["azp"] == "sovereign-cli"
    assert claims["roles"] == ["user"]
    assert claims["realm_access"] == {"roles": ["user"]}
    assert claims["typ"] == "Bearer"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] == claims["iat"]
    assert claims["jti"]


def test_minted_token_is_refused_for_another_audience(tmp_path: Path) -> None:
    issuer = ensure_keys(tmp_path / "issuer")
    token = mint(issuer, issuer_url=ISSUER, audience="elsewhere", subject="ada", roles=["user"])
    with pytest.raises(jwt.InvalidAudienceError):
        verified_claims(token, tmp_path / "issuer")


def test_minted_token_expires_after_its_ttl(tmp_path: Path) -> None:
    issuer = ensure_keys(tmp_path / "issuer")
    token = mint(
        issuer,
        issuer_url=ISSUER,
        audience=AUDIENCE,
        subject="ada",
        roles=["user"],
        ttl_seconds=60,
        now=int(time.time()) - 120,
    )
    with pytest.raises(jwt.ExpiredSignatureError):
        verified_claims(token, tmp_path / "issuer")


def test_each_token_has_its_own_jti(tmp_path: Path) -> None:
    issuer = ensure_keys(tmp_path / "issuer")
    tokens = [
        mint(issuer, issuer_url=ISSUER, audience=AUDIENCE, subject="ada", roles=["user"], now=1)
        for _ in range(2)
    ]
    jtis = {jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(jtis) == 2
