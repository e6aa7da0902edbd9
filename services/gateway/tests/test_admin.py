"""`sovereign-gateway admin health|token`: the node operator's checks, and their bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import jwt
from jwt import PyJWK

from services.gateway.tests.commands import run_admin
from services.gateway.tests.configs import config_document


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, **listen: object) -> Path:
    document = config_document(tmp_path)
    document["listen"].update(listen)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    return path


def test_health_says_when_nothing_answers_and_exits_1(tmp_path: Path) -> None:
    port = _closed_port()
    ran = run_admin("health", "--config", _config(tmp_path, port=port))
    assert ran.exit_code == 1
    assert ran.stdout.startswith(f"✗ http://127.0.0.1:{port}: no answer: ")


def test_health_of_a_tls_node_asks_over_https_trusting_its_local_ca(tmp_path: Path) -> None:
    tls = {"mode": "local_ca", "certificate": None, "key": None,
           "ca_dir": str(tmp_path / "tls"), "names": ["localhost"]}  # fmt: skip
    ran = run_admin("health", "--config", _config(tmp_path, host="0.0.0.0", tls=tls))  # noqa: S104
    # No CA yet: the gateway makes it on its first start.
    assert ran.exit_code == 2
    assert (
        ran.stderr
        == f"error: the CA to trust, {tmp_path / 'tls' / 'ca.pem'}: No such file or directory\n"
    )


def test_health_wants_one_of_config_and_url(tmp_path: Path) -> None:
    both = run_admin("health", "--config", _config(tmp_path), "--url", "http://127.0.0.1:9")
    neither = run_admin("health")
    for ran in (both, neither):
        assert ran.exit_code == 2
        assert ran.stderr == "error: give --config or --url, one of them\n"


def test_token_is_signed_by_the_local_issuer_for_the_configs_audience(tmp_path: Path) -> None:
    config = _config(tmp_path)
    ran = run_admin("token", "--config", config, "--user", "ada", "--role", "user", "--ttl", "5m")
    assert ran.exit_code == 0, ran.stderr
    token = ran.stdout.strip()
    [key] = json.loads((tmp_path / "issuer" / "jwks.json").read_text())["keys"]
    claims = jwt.decode(
        token, key=PyJWK(key), algorithms=["EdDSA"], audience="sovereign-gateway",
        issuer="http://127.0.0.1:8000/local",
    )  # fmt: skip
    assert (claims["sub"], claims["roles"], claims["exp"] - claims["iat"]) == ("ada", ["user"], 300)


def test_token_refuses_a_keycloak_node_and_unknown_roles(tmp_path: Path) -> None:
    document = config_document(tmp_path)
    document["oidc"].update(provider="keycloak", local_issuer_dir=None,
                            issuer="https://auth.example/realms/r")  # fmt: skip
    keycloak = tmp_path / "keycloak.json"
    keycloak.write_text(json.dumps(document))
    refused = run_admin("token", "--config", keycloak, "--user", "ada", "--role", "user")
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"error: oidc.provider is keycloak in {keycloak}; get tokens from "
        "https://auth.example/realms/r\n"
    )
    unknown = run_admin("token", "--config", _config(tmp_path), "--user", "ada", "--role", "root")
    assert unknown.exit_code == 2
    assert unknown.stderr == "error: role root is not one of the node's roles; known roles: user\n"
    assert not (tmp_path / "issuer").exists()
