"""The compliance lock as the running gateway enforces it, with manifests from `sovereign lock`.

Takes a gateway whose profile requires a lock at a path under tmp; the manifest is made,
replaced and invalidated on disk while the gateway runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.integration.conftest import GatewayFactory, RunningGateway

SOVEREIGN = Path(sys.executable).with_name("sovereign")


def _sovereign(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOVEREIGN, *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )


def _lock(node: RunningGateway, render_dir: Path | None = None) -> None:
    lock_dir = node.home / "lock"
    if not (lock_dir / "lock.key").exists():
        keygen = _sovereign("lock", "keygen", "--out", lock_dir)
        assert keygen.returncode == 0, keygen.stderr
    created = _sovereign(
        "lock", "create", "--render", render_dir or node.render_dir,
        "--key", lock_dir / "lock.key", "--out", lock_dir / "lock.json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def _chat_status(node: RunningGateway) -> tuple[int, str]:
    status, body = node.chat("hi", node.token())
    return status, body.get("error", {}).get("code", "")


def _health(node: RunningGateway) -> dict[str, object]:
    lock: dict[str, object] = json.loads(node.call("GET", "/health")[2])["lock"]
    return lock


def _lock_events(node: RunningGateway) -> list[dict[str, object]]:
    return [r["lock"] for r in node.records() if r.get("action") == "lock.state"]


def test_a_required_lock_that_is_missing_refuses_everything(
    gateway_factory: GatewayFactory,
) -> None:
    node = gateway_factory(lock_required=True)

    assert _chat_status(node) == (503, "compliance_lock_violation")
    assert _health(node)["state"] == "violation"
    assert node.call("GET", "/health")[0] == 503
    assert _lock_events(node)[0]["state"] == "violation"
    assert [r["refusal"] for r in node.records() if r.get("action") == "chat"] == [
        "compliance_lock_violation"
    ]


def test_a_valid_lock_admits_requests_and_drift_is_caught_while_running(
    gateway_factory: GatewayFactory,
) -> None:
    node = gateway_factory(lock_required=True)
    _lock(node)

    assert _chat_status(node)[0] == 200
    assert _health(node)["state"] == "locked"

    # A new lock pins a policy this gateway does not run (DLP weakened to log).
    changed = node.home / "changed-render"
    shutil.copytree(node.render_dir, changed)
    data = changed / "policy" / "data.json"
    data.write_text(data.read_text().replace('"redact"', '"log"'))
    _lock(node, changed)

    status, code = _chat_status(node)
    health = _health(node)

    assert (status, code) == (503, "compliance_lock_violation")
    assert health["state"] == "violation"
    assert "policy bundle digest differs" in " ".join(map(str, health["reasons"]))  # type: ignore[call-overload]
    assert [event["state"] for event in _lock_events(node)] == ["violation", "locked", "violation"]


def test_a_manifest_signed_by_another_key_is_a_violation(gateway_factory: GatewayFactory) -> None:
    node = gateway_factory(lock_required=False)
    _lock(node)
    assert _chat_status(node)[0] == 200

    other = node.home / "other-key"
    assert _sovereign("lock", "keygen", "--out", other).returncode == 0
    created = _sovereign(
        "lock", "create", "--render", node.render_dir, "--key", other / "lock.key",
        "--out", node.home / "lock" / "lock.json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr

    assert _chat_status(node) == (503, "compliance_lock_violation")
    assert _health(node)["state"] == "violation"
