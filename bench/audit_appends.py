"""Durable audit appends per second with 1, 16 and 256 concurrent appenders.

Takes a directory on the disk to measure (default: the system temp dir) and a duration;
prints appends/s, batch sizes and latencies against the goal of 5,000 durable appends/s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.audit import AuditLog, verify

GOAL_PER_SECOND = 5_000
CONCURRENCY = (1, 16, 256)


def gateway_like_event(i: int) -> dict[str, Any]:
    """Shaped like the gateway's records (digests, no content), about 600 bytes a line."""
    return {
        "type": "event",
        "request_id": hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest(),
        "phase": "complete",
        "action": "chat",
        "resource": "/v1/chat/completions",
        "model": "llama-3.1-8b-instruct",
        "actor": {"sub": f"user-{i % 50}", "client": "chat-ui", "roles": ["user"]},
        "decision": {
            "allow": True,
            "reasons": ["role user may chat with llama-3.1-8b-instruct"],
            "engine": "embedded",
            "dlp_findings": [],
            "redactions": 0,
        },
        "refusal": None,
        "request_digest": hashlib.sha256(f"request {i}".encode()).hexdigest(),
        "response_digest": hashlib.sha256(f"response {i}".encode()).hexdigest(),
        "status": 200,
        "latency_ms": 12.345,
    }


@dataclass
class Result:
    appenders: int
    appends: int
    seconds: float
    batches: int
    fsyncs: int
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.appends / self.seconds


async def measure(directory: Path, appenders: int, seconds: float) -> Result:
    log = AuditLog(
        directory,
        Ed25519PrivateKey.generate(),
        checkpoint_records=1000,
        checkpoint_interval_seconds=60,
        segment_max_bytes=64 * 1024 * 1024,
    )
    await log.open()
    latencies: list[float] = []
    counter = 0
    deadline = time.perf_counter() + seconds

    async def appender() -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            counter += 1
            record = gateway_like_event(counter)
            started = time.perf_counter()
            await log.append(record)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(appenders)))
    elapsed = time.perf_counter() - started
    batches, fsyncs = log.batches, log.fsyncs
    await log.close()
    report = verify(directory)
    if not report.ok:
        raise SystemExit(f"the benchmark's own log does not verify: {report.problems[0]}")
    cuts = statistics.quantiles(latencies, n=100)
    return Result(
        appenders, len(latencies), elapsed, batches, fsyncs, cuts[49] * 1e3, cuts[98] * 1e3
    )


def machine(directory: Path) -> dict[str, str]:
    def run(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in run("lscpu").splitlines()
            if line.startswith("Model name")
        ),
        "unknown",
    )
    df = run("df", "-T", str(directory)).splitlines()
    filesystem = " ".join(df[-1].split()[:2]) if len(df) > 1 else "unknown"
    return {
        "nproc": run("nproc").strip(),
        "cpu": model,
        "filesystem": filesystem,
        "date": run("date", "-u").strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the gateway")
    parser.add_argument("--markdown", action="store_true", help="also print a docs section")
    args = parser.parse_args()

    runner: Callable[[Coroutine[Any, Any, Result]], Result] = asyncio.run
    if args.uvloop:
        import uvloop

        runner = uvloop.run
    results = []
    for appenders in CONCURRENCY:
        directory = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir))
        try:
            result = runner(measure(directory / "log", appenders, args.seconds))
        finally:
            shutil.rmtree(directory)
        results.append(result)
        verdict = "meets" if result.per_second >= GOAL_PER_SECOND else "below"
        print(
            f"{appenders:>4} appenders: {result.per_second:>9,.0f} durable appends/s "
            f"({verdict} the {GOAL_PER_SECOND:,}/s goal); "
            f"{result.appends / result.batches:6.1f} records per batch (one fsync each); "
            f"latency p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
        )
    facts = machine(args.dir)
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"machine: {facts['nproc']} CPUs, {facts['cpu']}; {facts['filesystem']}; {loop}")
    print(f"date: {facts['date']}")
    if args.markdown:
        print()
        print(f"| appenders | durable appends/s | records per batch | p50 ms | p99 ms | {loop} |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in results:
            verdict = "meets goal" if r.per_second >= GOAL_PER_SECOND else "below goal"
            print(
                f"| {r.appenders} | {r.per_second:,.0f} | {r.appends / r.batches:.1f} "
                f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {verdict} |"
            )


if __name__ == "__main__":
    main()
