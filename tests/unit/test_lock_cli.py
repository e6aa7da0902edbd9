"""`sovereign lock keygen|create|verify`: exit 0 when it holds, 1 on violation, 2 on bad input.

The work is `sovereign-gateway admin lock`, run here in this process with the render's
config; the last test runs the toolkit's own command, which delegates to it.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from services.gateway.tests.commands import Ran, run_admin
from sovereign.profile.loader import load_profile
from sovereign.render import render_to
from tests.cli import sovereign

ROOT = Path(__file__).resolve().parents[2]


def _invoke(*args: str | Path) -> Ran:
    """The toolkit's arguments, as it hands them to the gateway's admin command."""
    given = list(args)
    if "--render" in given:
        at = given.index("--render")
        given[at : at + 2] = ["--config", Path(given[at + 1]) / "gateway" / "config.json"]
    return run_admin(*given)


@pytest.fixture
def render(tmp_path: Path) -> Path:
    out = tmp_path / "render"
    render_to(load_profile(ROOT / "profiles" / "personal.yaml"), out)
    return out


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    out = tmp_path / "keys"
    result = _invoke("lock", "keygen", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def manifest(tmp_path: Path, render: Path, keys: Path) -> Path:
    out = tmp_path / "lock.json"
    result = _invoke("lock", "create", "--render", render, "--key", keys / "lock.key", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _verify(manifest: Path, keys: Path, *extra: str | Path) -> Ran:
    return _invoke("lock", "verify", manifest, "--public-key", keys / "lock.pub", *extra)


def test_keygen_writes_a_private_key_only_the_owner_can_read(keys: Path) -> None:
    assert stat.S_IMODE((keys / "lock.key").stat().st_mode) == 0o600
    assert (keys / "lock.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (keys / "lock.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_keygen_refuses_to_overwrite_a_key(keys: Path) -> None:
    before = (keys / "lock.key").read_bytes()
    result = _invoke("lock", "keygen", "--out", keys)
    assert result.exit_code == 2
    assert f"refusing to overwrite {keys / 'lock.key'}" in result.stderr
    assert (keys / "lock.key").read_bytes() == before


def test_created_manifest_pins_the_render(manifest: Path, render: Path) -> None:
    document = json.loads(manifest.read_text())
    assert document["profile"] == "ada-laptop"
    assert document["models"][0]["name"] == "smollm2-135m-instruct"
    assert document["egress_default"] == "deny"
    assert document["signature"]


def test_verify_accepts_the_manifest_and_its_render(
    manifest: Path, keys: Path, render: Path
) -> None:
    assert _verify(manifest, keys).exit_code == 0
    result = _verify(manifest, keys, "--render", render)
    assert result.exit_code == 0, result.output
    assert "signature and config ok" in result.stdout


def test_verify_lists_every_drift_of_the_render(manifest: Path, keys: Path, render: Path) -> None:
    (render / "policy" / "data.json").write_text("{}\n")
    config = render / "gateway" / "config.json"
    document = json.loads(config.read_text())
    document["max_body_bytes"] = 2048
    config.write_text(json.dumps(document))
    result = _verify(manifest, keys, "--render", render)
    assert result.exit_code == 1
    assert "violation: policy bundle digest differs" in result.stderr
    assert "violation: gateway config digest differs" in result.stderr


def test_verify_refuses_a_tampered_manifest(manifest: Path, keys: Path) -> None:
    document = json.loads(manifest.read_text())
    document["profile"] = "someone-else"
    manifest.write_text(json.dumps(document))
    result = _verify(manifest, keys)
    assert result.exit_code == 1
    assert "signature does not match" in result.stderr


def test_verify_refuses_a_manifest_signed_by_another_key(manifest: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert _invoke("lock", "keygen", "--out", other).exit_code == 0
    result = _verify(manifest, other)
    assert result.exit_code == 1
    assert "is signed by key" in result.stderr


def test_verify_of_a_missing_manifest_is_bad_input(tmp_path: Path, keys: Path) -> None:
    result = _verify(tmp_path / "absent.json", keys)
    assert result.exit_code == 2
    assert f"{tmp_path / 'absent.json'} is missing" in result.stderr


def test_verify_with_an_unreadable_public_key_is_bad_input(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lock.pub").write_text("garbage")
    result = _verify(manifest, tmp_path / "bad")
    assert result.exit_code == 2
    assert "is not a PEM public key" in result.stderr


def test_create_without_a_render_names_the_config_file(tmp_path: Path, keys: Path) -> None:
    result = _invoke(
        "lock", "create", "--render", tmp_path / "nope", "--key", keys / "lock.key",
        "--out", tmp_path / "lock.json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert str(tmp_path / "nope" / "gateway" / "config.json") in result.stderr
    assert not (tmp_path / "lock.json").exists()


def test_create_with_an_invalid_config_names_the_file_and_field(
    tmp_path: Path, render: Path, keys: Path
) -> None:
    config = render / "gateway" / "config.json"
    document = json.loads(config.read_text())
    document["listen"]["port"] = "eighty"
    config.write_text(json.dumps(document))
    result = _invoke(
        "lock", "create", "--render", render, "--key", keys / "lock.key",
        "--out", tmp_path / "lock.json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"{config} is not a valid gateway config: listen.port:" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "lock.json").exists()


def test_create_refuses_a_model_without_sha256(tmp_path: Path, render: Path, keys: Path) -> None:
    config = render / "gateway" / "config.json"
    document = json.loads(config.read_text())
    document["models"][0]["sha256"] = None
    config.write_text(json.dumps(document))
    result = _invoke(
        "lock", "create", "--render", render, "--key", keys / "lock.key",
        "--out", tmp_path / "lock.json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "model smollm2-135m-instruct has no sha256" in result.stderr
    assert not (tmp_path / "lock.json").exists()


def test_create_with_a_public_key_as_signing_key_is_bad_input(
    tmp_path: Path, render: Path, keys: Path
) -> None:
    result = _invoke(
        "lock", "create", "--render", render, "--key", keys / "lock.pub",
        "--out", tmp_path / "lock.json",
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"{keys / 'lock.pub'} is not an unencrypted PEM private key" in result.stderr
    assert not (tmp_path / "lock.json").exists()


def test_the_toolkit_command_delegates_with_the_renders_config(
    manifest: Path, keys: Path, render: Path
) -> None:
    held = sovereign(
        "lock", "verify", manifest, "--public-key", keys / "lock.pub", "--render", render
    )
    assert held.exit_code == 0, held.output
    assert "signature and config ok" in held.stdout
    (render / "policy" / "extra.rego").write_text("package extra\n")
    drifted = sovereign(
        "lock", "verify", manifest, "--public-key", keys / "lock.pub", "--render", render
    )
    assert drifted.exit_code == 1
    assert "violation: policy bundle" in drifted.stderr
