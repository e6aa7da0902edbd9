"""Token checks that need no running issuer: claims, typ, and the JWKS refetch rate limit.

Takes a local JWKS file and tokens signed here with its key (the personal node's local
issuer works this way); gives pass or fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from sovereign_gateway.authentication import AuthError, OIDCBackend
from sovereign_gateway.contract import OIDC

ISSUER = "http://127.0.0.1:8000/local"
AUDIENCE = "sovereign-gateway"


def _oidc(refetch_interval: float = 60) -> OIDC:
    return OIDC(
        provider="local",
        issuer=ISSUER,
        audience=AUDIENCE,
        realm="sovereign",
        algorithms=["RS256", "ES256", "EdDSA"],
        clock_skew_seconds=30,
        local_issuer_dir=".",
        jwks_cache_seconds=300,
        jwks_refetch_interval_seconds=refetch_interval,
        service_clients=["sovereign-memory"],
    )


def _keys(tmp_path: Path, *kids: str) -> dict[str, Ed25519PrivateKey]:
    keys = {kid: Ed25519PrivateKey.generate() for kid in kids}
    entries = [
        json.loads(OKPAlgorithm.to_jwk(key.public_key()))
        | {"kid": kid, "alg": "EdDSA", "use": "sig"}
        for kid, key in keys.items()
    ]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": entries}))
    return keys


def _token(key: Ed25519PrivateKey, kid: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "azp": "sovereign-cli",
        "typ": "Bearer",
        "iat": now,
        "exp": now + 300,
        "realm_access": {"roles": ["user"]},
        "resource_access": {AUDIENCE: {"roles": ["auditor"]}},
        "groups": ["/team"],
    } | overrides
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def _authenticator(tmp_path: Path, refetch_interval: float = 60) -> OIDCBackend:
    return OIDCBackend(_oidc(refetch_interval), httpx.AsyncClient(), tmp_path / "jwks.json")


def test_roles_come_from_realm_client_plain_roles_and_groups(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    principal = asyncio.run(
        _authenticator(tmp_path).verify(f"Bearer {_token(keys['k1'], 'k1', roles=['extra'])}")
    )

    assert principal.sub == "alice"
    assert principal.client == "sovereign-cli"
    assert principal.roles == ("auditor", "extra", "team", "user")
    assert principal.service is False


def test_a_service_client_is_recognised_by_its_azp(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    token = _token(keys["k1"], "k1", azp="sovereign-memory")

    assert asyncio.run(_authenticator(tmp_path).verify(f"Bearer {token}")).service is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Times are offsets from when the test runs: collection may be many minutes earlier.
        ({"exp": -120}, "expired"),
        ({"nbf": 600}, "not valid yet"),
        ({"iat": 600}, "not valid yet"),
        ({"iss": "http://127.0.0.1:9999/other"}, "another issuer"),
        ({"aud": "someone-else"}, "audience"),
        ({"typ": "ID"}, "not an access token"),
        ({"typ": "Refresh"}, "not an access token"),
        ({"exp": None}, "lacks the exp claim"),
        ({"sub": None}, "lacks the sub claim"),
    ],
    ids=[
        "expired",
        "nbf-future",
        "iat-future",
        "wrong-iss",
        "wrong-aud",
        "id-token",
        "refresh-token",
        "no-exp",
        "no-sub",
    ],
)
def test_bad_claims_are_refused(tmp_path: Path, overrides: dict[str, Any], message: str) -> None:
    keys = _keys(tmp_path, "k1")
    now = int(time.time())
    claims = {
        name: now + value if name in ("exp", "nbf", "iat") and value is not None else value
        for name, value in overrides.items()
    }
    token = _token(keys["k1"], "k1", **claims)

    with pytest.raises(AuthError, match=message) as refused:
        asyncio.run(_authenticator(tmp_path).verify(f"Bearer {token}"))
    assert refused.value.error == "invalid_token"


def test_clock_skew_is_bounded_both_ways(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    just_expired = _token(keys["k1"], "k1", exp=int(time.time()) - 10)

    principal = asyncio.run(_authenticator(tmp_path).verify(f"Bearer {just_expired}"))

    assert principal.sub == "alice"


def test_an_unknown_kid_refetches_at_most_once_per_interval(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    authenticator = _authenticator(tmp_path, refetch_interval=60)
    stranger = Ed25519PrivateKey.generate()

    async def flood() -> None:
        await authenticator.verify(f"Bearer {_token(keys['k1'], 'k1')}")
        for index in range(50):
            with pytest.raises(AuthError, match="unknown key"):
                await authenticator.verify(f"Bearer {_token(stranger, f'kid{index}')}")

    asyncio.run(flood())

    assert authenticator.keys.fetches == 1


def test_a_new_key_is_picked_up_and_a_removed_one_is_dropped(tmp_path: Path) -> None:
    old = _keys(tmp_path, "old")
    authenticator = _authenticator(tmp_path, refetch_interval=0)

    async def rotate() -> None:
        await authenticator.verify(f"Bearer {_token(old['old'], 'old')}")
        new = _keys(tmp_path, "new")
        await authenticator.verify(f"Bearer {_token(new['new'], 'new')}")
        with pytest.raises(AuthError, match="unknown key"):
            await authenticator.verify(f"Bearer {_token(old['old'], 'old')}")

    asyncio.run(rotate())


def test_an_es256_kid_cannot_verify_an_rs256_token(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    header_swapped = jwt.encode(
        {"sub": "x"},
        "irrelevant-secret-of-32-bytes-or-more!",
        algorithm="HS256",
        headers={"kid": "k1"},
    )

    with pytest.raises(AuthError, match="algorithm 'HS256' is not accepted"):
        asyncio.run(_authenticator(tmp_path).verify(f"Bearer {header_swapped}"))
    assert keys


def test_a_remembered_token_is_dropped_with_its_key(tmp_path: Path) -> None:
    old = _keys(tmp_path, "old")
    authenticator = _authenticator(tmp_path, refetch_interval=0)
    token = f"Bearer {_token(old['old'], 'old')}"

    async def rotate() -> None:
        await authenticator.verify(token)
        await authenticator.verify(token)
        assert authenticator.keys.fetches == 1
        new = _keys(tmp_path, "new")
        await authenticator.verify(f"Bearer {_token(new['new'], 'new')}")
        with pytest.raises(AuthError, match="unknown key"):
            await authenticator.verify(token)

    asyncio.run(rotate())


def test_a_remembered_token_still_expires(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "k1")
    authenticator = _authenticator(tmp_path)
    token = f"Bearer {_token(keys['k1'], 'k1', exp=int(time.time()) - 29)}"

    async def twice() -> None:
        await authenticator.verify(token)
        await asyncio.sleep(1.5)
        with pytest.raises(AuthError, match="expired"):
            await authenticator.verify(token)

    asyncio.run(twice())


def test_health_checks_reuse_fresh_keys(tmp_path: Path) -> None:
    _keys(tmp_path, "k1")
    authenticator = _authenticator(tmp_path)

    async def poll() -> list[tuple[bool, str]]:
        return [await authenticator.ready() for _ in range(5)]

    answers = asyncio.run(poll())

    assert all(ready for ready, _ in answers)
    assert authenticator.keys.fetches == 1


def test_health_reports_an_unreadable_jwks(tmp_path: Path) -> None:
    ready, detail = asyncio.run(_authenticator(tmp_path).ready())

    assert ready is False
    assert "cannot read the local JWKS" in detail
