"""The gateway against a real Keycloak: every RFC 8725 attack is refused 401, real tokens work.

Takes the session's Keycloak (realms rendered by `sovereign render`) and a gateway trusting
its `sovereign` realm; forged tokens are built here from Keycloak's own tokens and keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from openai import OpenAI

from tests.integration.conftest import http, keycloak_identity

if TYPE_CHECKING:
    from tests.integration.conftest import GatewayFactory, Keycloak, RunningGateway

pytestmark = pytest.mark.slow
CHAT = {"model": "echo-1", "messages": [{"role": "user", "content": "hello"}]}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
    )


def _unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"


@pytest.fixture
def node(gateway_factory: GatewayFactory, keycloak: Keycloak) -> RunningGateway:
    return gateway_factory(identity=keycloak_identity(keycloak.base))


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 (shared by the server's handler instances)
    body = b"{}"

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def attacker_server(attacker_key: rsa.RSAPrivateKey) -> Iterator[tuple[str, list[str]]]:
    """A JWKS server on loopback holding the attacker's key; records every fetch."""
    jwk = json.loads(RSAAlgorithm.to_jwk(attacker_key.public_key()))
    handler = type(
        "Handler",
        (_Counter,),
        {
            "hits": [],
            "body": json.dumps(
                {"keys": [jwk | {"kid": "evil", "alg": "RS256", "use": "sig"}]}
            ).encode(),
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


def _status(node: RunningGateway, token: str) -> tuple[int, str]:
    status, headers, _ = node.call("POST", "/v1/chat/completions", CHAT, token=token)
    return status, headers.get("www-authenticate", "")


def test_a_keycloak_user_token_is_accepted(node: RunningGateway, keycloak: Keycloak) -> None:
    status, body = node.chat("hello", keycloak.password_token("alice"))

    assert status == 200, body
    assert node.records()[-1]["actor"]["sub"] != ""


def test_the_openai_client_works_with_a_keycloak_token(
    node: RunningGateway, keycloak: Keycloak
) -> None:
    client = OpenAI(
        base_url=f"{node.url}/v1", api_key=keycloak.password_token("alice"), max_retries=0
    )

    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "hi"}]
    )
    stream = client.chat.completions.create(
        model="echo-1", messages=[{"role": "user", "content": "x y"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert answer.choices[0].message.content == "echo: hi"
    assert text == "echo: x y"
    assert [m.id for m in client.models.list()] == ["echo-1"]


def test_keycloak_roles_drive_the_policy(node: RunningGateway, keycloak: Keycloak) -> None:
    admin = keycloak.password_token("root")
    viewer = keycloak.password_token("vera")

    assert node.chat("hi", admin, model="restricted-1")[0] == 200
    assert node.chat("hi", viewer)[0] == 403


def test_internal_endpoints_take_keycloak_service_client_tokens_only(
    node: RunningGateway, keycloak: Keycloak
) -> None:
    service = keycloak.service_token()
    user = keycloak.password_token("root")

    assert node.call("POST", "/embed", {"input": "x"}, token=service)[0] == 200
    assert node.call("POST", "/embed", {"input": "x"}, token=user)[0] == 403
    assert node.chat("hi", service)[0] == 403


def test_alg_none_is_refused(node: RunningGateway, keycloak: Keycloak) -> None:
    header, payload = _parts(keycloak.password_token("alice"))
    forged = _unsigned({**header, "alg": "none"}, payload) + "."

    status, challenge = _status(node, forged)

    assert status == 401
    assert 'error="invalid_token"' in challenge


def test_hs256_signed_with_the_rsa_public_key_is_refused(
    node: RunningGateway, keycloak: Keycloak
) -> None:
    token = keycloak.password_token("alice")
    header, payload = _parts(token)
    jwks = json.loads(http("GET", f"{keycloak.issuer}/protocol/openid-connect/certs")[2])
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public_pem = RSAAlgorithm.from_jwk(jwk).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = _unsigned({**header, "alg": "HS256"}, payload)
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()

    assert _status(node, f"{signing_input}.{_b64(signature)}")[0] == 401


@pytest.mark.parametrize("kid", ["not-a-key-we-know", "../../../../etc/passwd", "/dev/null"])
def test_an_unknown_or_path_like_kid_is_refused(
    node: RunningGateway, keycloak: Keycloak, attacker_key: rsa.RSAPrivateKey, kid: str
) -> None:
    _, payload = _parts(keycloak.password_token("alice"))
    forged = jwt.encode(payload, attacker_key, algorithm="RS256", headers={"kid": kid})

    assert _status(node, forged)[0] == 401


@pytest.mark.parametrize("field", ["jku", "x5u"])
def test_jku_and_x5u_headers_are_never_fetched(
    node: RunningGateway,
    keycloak: Keycloak,
    attacker_key: rsa.RSAPrivateKey,
    attacker_server: tuple[str, list[str]],
    field: str,
) -> None:
    url, hits = attacker_server
    _, payload = _parts(keycloak.password_token("alice"))
    forged = jwt.encode(
        payload, attacker_key, algorithm="RS256", headers={"kid": "evil", field: f"{url}/jwks"}
    )

    assert _status(node, forged)[0] == 401
    assert hits == []


def test_an_embedded_jwk_header_is_ignored(
    node: RunningGateway, keycloak: Keycloak, attacker_key: rsa.RSAPrivateKey
) -> None:
    header, payload = _parts(keycloak.password_token("alice"))
    jwk = json.loads(RSAAlgorithm.to_jwk(attacker_key.public_key()))
    # Same kid as Keycloak's real key, but signed by the key carried in the header.
    forged = jwt.encode(
        payload, attacker_key, algorithm="RS256", headers={"kid": header["kid"], "jwk": jwk}
    )

    assert _status(node, forged)[0] == 401


def test_a_tampered_payload_is_refused(node: RunningGateway, keycloak: Keycloak) -> None:
    token = keycloak.password_token("vera")
    header_b64, _, signature = token.split(".")
    _, payload = _parts(token)
    payload["realm_access"] = {"roles": ["admin"]}
    forged = f"{header_b64}.{_b64(json.dumps(payload).encode())}.{signature}"

    assert _status(node, forged)[0] == 401


def test_a_token_from_another_realm_is_refused(node: RunningGateway, keycloak: Keycloak) -> None:
    assert _status(node, keycloak.password_token("alice", realm="other"))[0] == 401


def test_a_token_for_another_audience_is_refused(node: RunningGateway, keycloak: Keycloak) -> None:
    # admin-cli exists in every realm and carries no audience mapper for the gateway.
    answer = keycloak.token_response(
        grant_type="password",
        client_id="admin-cli",
        username="alice",
        password="correct horse battery staple",
    )

    assert _status(node, answer["access_token"])[0] == 401


def test_an_id_token_is_not_an_access_token(node: RunningGateway, keycloak: Keycloak) -> None:
    answer = keycloak.token_response(
        grant_type="password",
        client_id="sovereign-cli",
        username="alice",
        password="correct horse battery staple",
        scope="openid",
    )

    assert _status(node, answer["id_token"])[0] == 401


def test_key_rotation_accepts_the_new_key_and_drops_the_removed_one(
    gateway_factory: GatewayFactory, keycloak: Keycloak
) -> None:
    def fast_refetch(config: dict[str, Any]) -> None:
        config["oidc"]["jwks_refetch_interval_seconds"] = 0

    node = gateway_factory(identity=keycloak_identity(keycloak.base), config_patch=fast_refetch)
    old_token = keycloak.password_token("alice")
    assert node.chat("before", old_token)[0] == 200
    old_kid = _parts(old_token)[0]["kid"]

    status, realm = keycloak.admin("GET", "/sovereign")
    assert status == 200
    status, providers = keycloak.admin(
        "GET", "/sovereign/components?type=org.keycloak.keys.KeyProvider"
    )
    old = [p for p in providers if p["providerId"] in ("rsa-generated", "rsa")]
    created, _ = keycloak.admin(
        "POST",
        "/sovereign/components",
        {
            "name": "rotated-rsa",
            "providerId": "rsa-generated",
            "providerType": "org.keycloak.keys.KeyProvider",
            "parentId": realm["id"],
            "config": {"priority": ["500"], "keySize": ["2048"], "algorithm": ["RS256"]},
        },
    )
    assert created == 201
    for provider in old:
        assert keycloak.admin("DELETE", f"/sovereign/components/{provider['id']}")[0] == 204

    new_token = keycloak.password_token("alice")
    assert _parts(new_token)[0]["kid"] != old_kid
    assert node.chat("after", new_token)[0] == 200
    assert _status(node, old_token)[0] == 401
