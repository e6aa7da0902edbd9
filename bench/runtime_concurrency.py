"""A concurrency sweep against the gateway's embedded llama.cpp engine: queueing and 429s.

The gateway runs SmolLM2 in one embedded worker (one request at a time) with a queue of 4
(`serving: {queue: 4, queue_timeout: 30s}`). For 1, 4 and 16 clients in turn, each client
sends a short streaming chat, waits for it to finish and sends the next (closed loop) for a
fixed time; a client answered 429 waits the Retry-After it was given (at most until the end
of the point) before its next request. Meanwhile /metrics is scraped for the model's queue
depth. Expected: no 429 at 1 and 4 clients (1 running + 3 waiting fit), 429s at 16, and no
other errors at all; the script exits 1 if there was any answer other than 200 or 429.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from gateway_overhead import grid, machine, machine_busy, wait_for_quiet
from runtime_common import (
    SMOLLM2_CONTEXT,
    CpuMeter,
    Gateway,
    Reply,
    client_session,
    gateway,
    llama_cpp_version,
    percentile,
    revision,
    smollm2_model,
    stream_chat,
)

MODEL = "smollm2-135m-instruct"
PROMPT = "Name three colours of the rainbow."
SAMPLE_EVERY_S = 0.2


@dataclass
class Point:
    clients: int
    wall: float = 0.0
    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # exceptions: connection errors and such
    queued: list[float] = field(default_factory=list)  # gauge samples
    in_flight: list[float] = field(default_factory=list)
    rejected: dict[str, float] = field(default_factory=dict)  # counter deltas by reason
    cpu: dict[str, float] = field(default_factory=dict)
    others: float = 0.0

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.ok]

    @property
    def throttled(self) -> list[Reply]:
        return [r for r in self.replies if r.status == 429]

    @property
    def other(self) -> list[Reply]:
        return [r for r in self.replies if not r.ok and r.status != 429]

    @property
    def other_count(self) -> int:
        return len(self.other) + len(self.failures)


def gauges(text: str) -> dict[str, float]:
    """This model's queue and in-flight gauges and 429 counters from a /metrics page."""
    found: dict[str, float] = {}
    pattern = re.compile(r"^(sovereign_gateway_backend_\w+)\{([^}]*)\} ([0-9.eE+-]+)$", re.M)
    for name, labels, value in pattern.findall(text):
        if f'model="{MODEL}"' not in labels:
            continue
        reason = re.search(r'reason="([^"]+)"', labels)
        key = name.removeprefix("sovereign_gateway_backend_")
        key = key.removesuffix("_total")
        found[f"{key}:{reason.group(1)}" if reason else key] = float(value)
    return found


def scrape(gw: Gateway) -> dict[str, float]:
    with urllib.request.urlopen(f"{gw.base}/metrics", timeout=10) as reply:  # noqa: S310
        return gauges(reply.read().decode())


async def sampler(
    session: aiohttp.ClientSession, gw: Gateway, point: Point, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        async with session.get(f"{gw.base}/metrics") as reply:
            values = gauges(await reply.text())
        point.queued.append(values.get("queued", 0.0))
        point.in_flight.append(values.get("in_flight", 0.0))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


async def client(
    session: aiohttp.ClientSession,
    gw: Gateway,
    point: Point,
    end: float,
    max_tokens: int,
    honour_retry_after: bool,
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "seed": 42,
        "max_tokens": max_tokens,
    }
    while time.perf_counter() < end:
        try:
            reply = await stream_chat(session, f"{gw.base}/v1", gw.token, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            point.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        point.replies.append(reply)
        if reply.status == 429 and honour_retry_after:
            try:
                wait = float(reply.retry_after or 1)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(max(0.0, min(wait, end - time.perf_counter())))


async def run_point(
    gw: Gateway, clients: int, seconds: float, max_tokens: int, honour: bool, meter: CpuMeter
) -> Point:
    point = Point(clients)
    before = scrape(gw)
    # A new connection per request: a client that waited out a Retry-After would otherwise
    # race the server closing its idle connection.
    async with client_session(clients + 2, keep_alive=False) as session:
        stop = asyncio.Event()
        watcher = asyncio.create_task(sampler(session, gw, point, stop))
        meter.start()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        mine = usage.ru_utime + usage.ru_stime
        busy, began = machine_busy(), time.perf_counter()
        end = began + seconds
        await asyncio.gather(
            *(client(session, gw, point, end, max_tokens, honour) for _ in range(clients))
        )
        point.wall = time.perf_counter() - began
        point.cpu = meter.stop()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        ours = sum(point.cpu.values()) + usage.ru_utime + usage.ru_stime - mine
        point.others = max(0.0, (machine_busy() - busy - ours) / point.wall)
        stop.set()
        await watcher
    after = scrape(gw)
    for key, value in after.items():
        if key.startswith("rejected:"):
            point.rejected[key.split(":", 1)[1]] = value - before.get(key, 0.0)
    return point


def row(point: Point) -> list[str]:
    ok = point.ok
    latency = [r.end - r.sent for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.tokens for r in ok)
    retry = collections.Counter(r.retry_after or "none" for r in point.throttled)
    codes = collections.Counter(r.code or "?" for r in point.throttled)
    return [
        str(point.clients),
        str(len(point.replies) + len(point.failures)),
        str(len(ok)),
        str(len(point.throttled)),
        str(point.other_count),
        ", ".join(f"{code} {n}" for code, n in sorted(codes.items())) or "-",
        f"{percentile(latency, 50) * 1000:,.0f}",
        f"{percentile(latency, 95) * 1000:,.0f}",
        f"{percentile(ttft, 50) * 1000:,.0f}",
        f"{percentile(ttft, 95) * 1000:,.0f}",
        f"{tokens / point.wall:.1f}",
        ", ".join(f"{value} s x{n}" for value, n in sorted(retry.items())) or "-",
        f"{max(point.queued, default=0):.0f}",
        f"{max(point.in_flight, default=0):.0f}",
        f"{point.cpu.get('worker', 0.0) / point.wall:.2f}",
        f"{point.cpu.get('gateway', 0.0) / point.wall:.2f}",
        f"{point.others:.2f}",
    ]


HEAD = [
    "clients",
    "requests",
    "200",
    "429",
    "other",
    "429 codes",
    "p50 ms (200s)",
    "p95 ms",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "tok/s",
    "Retry-After seen",
    "max queued",
    "max in flight",
    "engine CPUs",
    "gateway CPUs",
    "others' CPUs",
]


def table(points: list[Point], markdown: bool) -> list[str]:
    body = [row(point) for point in points]
    return grid(HEAD, body, markdown)


def readings(points: list[Point], queue: int) -> list[str]:
    lines = []
    for point in points:
        fits = point.clients <= 1 + queue
        throttled = len(point.throttled)
        missing = sum(1 for r in point.throttled if not r.retry_after)
        metric = sum(point.rejected.values())
        expect = "no 429" if fits else "429s"
        seen = f"{throttled} x 429"
        as_expected = (throttled == 0) if fits else throttled > 0
        lines.append(
            f"{'as expected' if as_expected else 'UNEXPECTED'}: {point.clients} clients "
            f"(1 slot + {queue} queued {'fit' if fits else 'do not fit'}): expected {expect}, "
            f"saw {seen}; max queue depth {max(point.queued, default=0):.0f}; the gateway's "
            f"rejected counter rose by {metric:.0f}"
            + (f"; {missing} 429s WITHOUT Retry-After" if missing else "")
        )
        for reply in point.other[:3]:
            lines.append(f"  other: HTTP {reply.status} {reply.error}")
        for failure in point.failures[:3]:
            lines.append(f"  other: {failure}")
    total = sum(point.other_count for point in points)
    lines.append(f"other errors: {total}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=30, help="per client count")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--queue", type=int, default=4, help="the model's serving.queue")
    parser.add_argument("--queue-timeout", default="30s", help="the model's serving.queue_timeout")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="worker threads")
    parser.add_argument(
        "--no-retry-after",
        action="store_true",
        help="after a 429 retry at once instead of waiting Retry-After",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each point wait up to this long for other processes to go idle (0: not)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    # Stop the servers (own sessions) on SIGTERM too, e.g. from `timeout`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(c) for c in args.clients.split(",")]
    honour = not args.no_retry_after
    work = Path(tempfile.mkdtemp(prefix="runtime-concurrency-"))
    began = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    print(f"{machine()}; {now:%Y-%m-%d %H:%M UTC}; gateway at {revision()}")
    serving = (
        f"{{queue: {args.queue}, queue_timeout: {args.queue_timeout}, threads: {args.threads}}}"
    )
    print(
        f"SmolLM2-135M-Instruct Q4_1 in the gateway's embedded engine, 1 worker, "
        f"{args.threads} threads, n_ctx {SMOLLM2_CONTEXT}, llama-cpp-python "
        f"{llama_cpp_version()}; serving {serving}; closed loop, {args.seconds:g} s per point, "
        f"greedy, max_tokens {args.max_tokens}; after a 429 clients "
        f"{'wait Retry-After' if honour else 'retry at once'}; work dir {work}",
        flush=True,
    )
    points: list[Point] = []
    try:
        with ExitStack() as stack:
            gw = stack.enter_context(gateway(work, smollm2_model(MODEL, serving=serving)))
            workers = gw.worker_pids()
            meter = CpuMeter(
                {"gateway": gw.pid, "worker": workers[0]}, exclude={"gateway": workers}
            )
            print(f"  started in {time.monotonic() - began:.0f} s", flush=True)
            for clients in counts:
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                point = asyncio.run(
                    run_point(gw, clients, args.seconds, args.max_tokens, honour, meter)
                )
                points.append(point)
                print("  " + "  ".join(f"{h}={c}" for h, c in zip(HEAD, row(point), strict=True)))
                print(f"  [{time.monotonic() - began:.0f} s]", flush=True)
            restarts = [r.get("restarts") for r in gw.health()["models"][MODEL]["replicas"]]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(points, args.markdown)))
    print()
    print("\n".join(readings(points, args.queue)))
    print(f"worker restarts: {restarts}  (total time {time.monotonic() - began:.0f} s)")
    return 1 if any(point.other_count for point in points) else 0


if __name__ == "__main__":
    sys.exit(main())
