"""Durability of the gateway's audit log under SIGKILL and SIGTERM.

Takes a running gateway and a burst of real requests; checks that every 2xx answer has
its audit record and that the chain verifies after recovery.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sovereign_gateway.audit import verify

from tests.integration.conftest import fixed_upstream, start, wait_listening

if TYPE_CHECKING:
    from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.slow
BURST = 400


def test_sigkill_mid_burst_loses_no_answered_request(gateway_factory: GatewayFactory) -> None:
    node = gateway_factory()
    token = node.token()
    answered: list[str] = []
    killed = threading.Event()

    def one(index: int) -> None:
        if killed.is_set():
            return
        try:
            status, headers, _ = node.call(
                "POST",
                "/v1/chat/completions",
                {"model": "echo-1", "messages": [{"role": "user", "content": f"n{index}"}]},
                token=token,
                timeout=10,
            )
        except OSError:
            return
        if 200 <= status < 300:
            answered.append(headers["x-request-id"])
        if len(answered) == BURST // 4:
            node.process.send_signal(signal.SIGKILL)
            killed.set()

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(BURST)))
    node.process.wait(timeout=10)

    assert node.process.returncode == -signal.SIGKILL
    assert len(answered) >= BURST // 4
    logged = {
        r["request_id"]
        for r in node.records_tolerant()
        if r.get("phase") == "complete" and r.get("status") == 200
    }
    assert set(answered) <= logged

    # Restarting recovers any torn tail; the chain must then verify end to end.
    restarted = start(
        [node.process.args[0], "-m", "sovereign_gateway", "--config", str(node.config_path)],  # type: ignore[index]
        node.log,
    )
    wait_listening(f"{node.url}/health", restarted, node.log, 60)
    restarted.send_signal(signal.SIGTERM)
    restarted.wait(timeout=30)
    report = verify(node.audit_dir)
    assert report.ok, report.problems


def test_sigterm_drains_in_flight_requests_and_seals_the_log(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    with fixed_upstream(tmp_path / "slow.log", latency_ms=1500) as slow:
        node = gateway_factory(upstream=slow)
        token = node.token()
        results: list[int] = []

        def slow_call() -> None:
            status, _, _ = node.call(
                "POST",
                "/v1/chat/completions",
                {"model": "echo-1", "messages": [{"role": "user", "content": "slow"}]},
                token=token,
                timeout=30,
            )
            results.append(status)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        node.process.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        node.process.wait(timeout=30)

    assert results == [200]
    # uvicorn re-raises SIGTERM once it has drained and shut down cleanly.
    assert node.process.returncode in (0, -signal.SIGTERM)
    records = node.records()
    assert any(r.get("action") == "chat" and r.get("status") == 200 for r in records)
    assert records[-1]["type"] == "checkpoint"
    report = verify(node.audit_dir)
    assert report.ok, report.problems
    head = json.loads((node.audit_dir / "HEAD.json").read_text())
    assert head["checkpoint"]["covers_seq"] == records[-2]["seq"]
