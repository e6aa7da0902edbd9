"""Per-request policy decision latency: embedded regorus against OPA over loopback.

Takes nothing (renders the personal profile's policy into a temp dir and starts the pinned
OPA on 127.0.0.1); prints p50/p99 microseconds per decision and compares with the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from sovereign_gateway.policy import EmbeddedEngine, RemoteEngine

from sovereign import tools
from sovereign.profile.loader import load_profile
from sovereign.render import render_to

ROOT = Path(__file__).resolve().parents[1]
DECISION = "gateway/decision"
GOAL_P50_US = 50.0
PROMPT_BYTES = 4096

PARAGRAPH = (
    "Please review the attached incident summary before Thursday's meeting. The outage "
    "began shortly after the deploy of version 3.2 and lasted about 40 minutes; customers "
    "in the EU region saw elevated error rates while the retry queue drained. Our on-call "
    "engineer rolled back the change, and the postmortem lists three follow-ups. "
)
FINDINGS = " Reach me at ada.lovelace@example.org; refund card 4111 1111 1111 1111. "


def prompt(size: int = PROMPT_BYTES) -> str:
    """English prose with one e-mail address and one card number in the middle."""
    filler = PARAGRAPH * (size // len(PARAGRAPH) + 1)
    half = (size - len(FINDINGS)) // 2
    text = filler[:half] + FINDINGS + filler[half:]
    return text[:size]


def request(text: str) -> dict[str, Any]:
    return {
        "action": "chat",
        "path": "/v1/chat/completions",
        "subject": {"sub": "bench", "client": "bench", "roles": ["user"], "service": False},
        "model": "smollm2-135m-instruct",
        "texts": [text],
        "resource": None,
    }


def render(out: Path) -> Path:
    render_to(load_profile(ROOT / "profiles" / "personal.yaml"), out, ["policy"])
    return out / "policy"


def start_opa(bundle: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            *(str(tools.opa_binary()), "run", "--server", "--log-level", "error"),
            *("--addr", f"127.0.0.1:{port}", str(bundle)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):  # noqa: S310 (loopback)
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                sys.exit(f"OPA did not start on {url}")
            time.sleep(0.05)


async def measure(call: Callable[[], Awaitable[object]], seconds: float) -> list[float]:
    """Microseconds per call, after a warm-up, for about `seconds` of calls."""
    for _ in range(200):
        await call()
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


def line(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{name:<44} p50 {p50:9.1f} us   p99 {p99:9.1f} us   n={len(ordered)}"


async def run(seconds: float) -> None:
    text = prompt()
    big, small = request(text), request("What is the capital of France?")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = render(Path(tmp) / "render")
        embedded = EmbeddedEngine(bundle, DECISION)
        interpreted = EmbeddedEngine(bundle, DECISION, compiled=False)
        decision = await embedded.decide(big)
        opa, url = start_opa(bundle)
        # One keep-alive connection, reused, as the gateway's engine does.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trust_env=False)
        remote = RemoteEngine(url, DECISION, 2.0, session=session)
        try:
            assert await remote.decide(big) == decision, "the engines disagree"
            results = {
                "embedded, 4 KB prompt": await measure(lambda: embedded.decide(big), seconds),
                "embedded, short prompt": await measure(lambda: embedded.decide(small), seconds),
                "embedded interpreter only, 4 KB prompt": await measure(
                    lambda: interpreted.decide(big), seconds
                ),
                "remote OPA over loopback, 4 KB prompt": await measure(
                    lambda: remote.decide(big), seconds
                ),
                "remote OPA over loopback, short prompt": await measure(
                    lambda: remote.decide(small), seconds
                ),
            }
        finally:
            await session.close()
            opa.terminate()
            opa.wait(timeout=10)

    print(f"policy decision latency, {len(text.encode())}-byte prompt, DLP mode redact")
    print(f"findings: {[dict(f) for f in decision.obligations['dlp_findings']]}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    for name, samples in results.items():
        print(line(name, samples))
    embedded_p50 = statistics.median(results["embedded, 4 KB prompt"])
    remote_p50 = statistics.median(results["remote OPA over loopback, 4 KB prompt"])
    verdict = "meets" if embedded_p50 <= GOAL_P50_US else "misses"
    print(
        f"goal: embedded p50 <= {GOAL_P50_US:.0f} us with a 4 KB prompt -> {embedded_p50:.1f} us, "
        f"{verdict} it ({embedded_p50 / GOAL_P50_US:.1f}x the goal); "
        f"remote OPA is {remote_p50 / embedded_p50:.1f}x the embedded p50"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per row")
    asyncio.run(run(parser.parse_args().seconds))


if __name__ == "__main__":
    main()
