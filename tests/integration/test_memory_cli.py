"""`sovereign memory check` and `sovereign keys rotate` on a real gateway's data dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import GatewayFactory, RunningGateway
from tests.integration.test_memory import ingest, memory_gateway, query

SOVEREIGN = str(Path(sys.executable).with_name("sovereign"))


def sovereign(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOVEREIGN, *args], capture_output=True, text=True, timeout=180, check=False, env=env
    )


def audit_actions(gateway: RunningGateway) -> list[str]:
    return [str(record.get("action")) for record in gateway.records()]


def test_check_names_orphans_repairs_them_and_refuses_a_running_gateway(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("ada", ("admin",))
    assert ingest(gateway, token, text="The dialysis unit opens at six.")[0] == 201
    render = str(gateway.render_dir)

    busy = sovereign("memory", "check", "--render", render)
    assert busy.returncode == 1
    assert "in use by another process" in busy.stderr
    assert "Traceback" not in busy.stderr

    gateway.stop()
    clean = sovereign("memory", "check", "--render", render)
    assert clean.returncode == 0, clean.stderr
    assert "1 document(s), no orphans" in clean.stdout

    orphan = gateway.home / "memory" / "sealed" / f"{'e' * 64}.sealed"
    orphan.write_bytes(b"sealed bytes nobody names")
    found = sovereign("memory", "check", "--render", render, "--json")
    assert found.returncode == 1
    assert json.loads(found.stdout)["orphan_ciphertext"] == ["e" * 64]
    repaired = sovereign("memory", "check", "--render", render, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "ciphertext file with no record" in repaired.stdout
    assert not orphan.exists()
    assert "memory.repair" in audit_actions(gateway)


def test_rotation_moves_every_key_to_a_new_provider(
    gateway_factory: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = memory_gateway(gateway_factory, name="rotating")
    token = gateway.token("ada", ("admin",))
    status, doc = ingest(gateway, token, text="The neonatal ward has twelve cots.")
    assert status == 201
    sealed = (gateway.home / "memory" / "sealed" / f"{doc['id']}.sealed").read_bytes()
    gateway.stop()

    def to_passphrase(config: dict[str, Any]) -> None:
        config["memory"]["key_source"] = "passphrase"
        config["memory"]["key_file"] = None

    config_path = gateway.render_dir / "gateway" / "config.json"
    config = json.loads(config_path.read_text())
    to_passphrase(config)
    config_path.write_text(json.dumps(config))
    render = str(gateway.render_dir)

    environment = {"PATH": "/usr/bin:/bin", "HOME": str(gateway.home)}
    refused = sovereign("keys", "rotate", "--render", render, env=environment)
    assert refused.returncode == 2
    assert "SOVEREIGN_MEMORY_NEW_PASSPHRASE" in refused.stderr

    environment["SOVEREIGN_MEMORY_NEW_PASSPHRASE"] = "a long and new passphrase"
    rotated = sovereign("keys", "rotate", "--render", render, env=environment)
    assert rotated.returncode == 0, rotated.stderr
    assert "→ v2 (passphrase (argon2id)): 1 data key(s) rewrapped" in rotated.stdout
    assert not (gateway.home / "keys" / "memory.kek").exists()
    sealed_after = (gateway.home / "memory" / "sealed" / f"{doc['id']}.sealed").read_bytes()
    assert sealed_after == sealed  # rewrapped, not re-encrypted
    assert "memory.keys.rotate" in audit_actions(gateway)

    monkeypatch.setenv("SOVEREIGN_MEMORY_PASSPHRASE", "a long and new passphrase")
    restarted = memory_gateway(gateway_factory, name="rotating", config_patch=to_passphrase)
    token = restarted.token("ada", ("admin",))
    status, found = query(restarted, token, "How many cots are there?")
    assert status == 200, found
    assert [hit["document"] for hit in found["data"]] == [doc["id"]]
    restarted.stop()

    monkeypatch.setenv("SOVEREIGN_MEMORY_PASSPHRASE", "the wrong passphrase")
    wrong = memory_gateway(gateway_factory, name="rotating", config_patch=to_passphrase)
    health = json.loads(wrong.call("GET", "/health")[2])["components"]["memory"]
    assert health["ready"] is False
    assert "passphrase is wrong" in health["detail"]
