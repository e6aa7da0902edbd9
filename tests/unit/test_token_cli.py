"""`sovereign token`: the profile's local issuer mints through `sovereign-gateway admin token`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.tests.tokens import verified_claims
from tests.cli import sovereign

ROOT = Path(__file__).resolve().parents[2]


def _profile(tmp_path: Path, key_dir: Path, extra: str = "") -> Path:
    path = tmp_path / "personal.yaml"
    path.write_text(f"kind: personal\nname: t\nidentity:\n  local_key_dir: {key_dir}\n{extra}")
    return path


def test_token_command_prints_only_a_verifiable_token(tmp_path: Path) -> None:
    key_dir = tmp_path / "issuer"
    result = sovereign(
        "token", _profile(tmp_path, key_dir), "--user", "ada", "--role", "user",
        "--role", "admin", "--ttl", "30m", "--client", "notebook",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    claims = verified_claims(result.stdout.strip(), key_dir)
    assert (claims["sub"], claims["azp"]) == ("ada", "notebook")
    assert claims["realm_access"]["roles"] == ["user", "admin"]
    assert claims["exp"] - claims["iat"] == 1800


def test_token_command_refuses_a_keycloak_profile() -> None:
    path = ROOT / "profiles" / "personal.yaml"
    result = sovereign("token", str(path), "--user", "ada", "--role", "user")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"error: identity.provider is keycloak in {path}; "
        "get tokens from http://127.0.0.1:8080/realms/sovereign\n"
    )


def test_token_command_names_an_unknown_role_and_the_known_ones(tmp_path: Path) -> None:
    profile = _profile(tmp_path, tmp_path / "issuer")
    result = sovereign("token", str(profile), "--user", "ada", "--role", "root")
    assert result.exit_code == 2
    assert "role root is not one of the node's roles" in result.stderr
    assert "known roles: admin, user, service" in result.stderr
    assert not (tmp_path / "issuer").exists()


@pytest.mark.parametrize("ttl", ["1x", "0s", "-5m", "365d"])
def test_token_command_refuses_a_bad_ttl(tmp_path: Path, ttl: str) -> None:
    profile = _profile(tmp_path, tmp_path / "issuer")
    result = sovereign("token", str(profile), "--user", "ada", "--role", "user", "--ttl", ttl)
    assert result.exit_code == 2
    assert "--ttl" in result.stderr
    assert result.stdout == ""


def test_token_command_requires_a_role(tmp_path: Path) -> None:
    profile = _profile(tmp_path, tmp_path / "issuer")
    result = sovereign("token", str(profile), "--user", "ada")
    assert result.exit_code == 2
    assert "at least one --role is required" in result.stderr


def test_token_command_reports_an_unusable_key_dir(tmp_path: Path) -> None:
    (tmp_path / "issuer").write_text("")
    profile = _profile(tmp_path, tmp_path / "issuer")
    result = sovereign("token", str(profile), "--user", "ada", "--role", "user")
    assert result.exit_code == 2
    assert str(tmp_path / "issuer") in result.stderr
    assert "the local issuer's directory" in result.stderr
    assert "Traceback" not in result.output
