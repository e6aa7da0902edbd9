"""SmolLM2 through the gateway against llama.cpp's server directly: tokens/s and first token.

Three paths, in the same run, with the same streaming request (greedy, same seed and
max_tokens, so each generates the same tokens): (direct) `python -m llama_cpp.server`;
(gateway -> server) the gateway with that server as the model's replica; (gateway embedded)
the gateway's own llama.cpp worker. Sequential requests, interleaved across the paths, the
order rotating each round. Goals: at least 95 % of direct throughput, at most 5 ms added
to time to first token."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from gateway_overhead import grid, machine, machine_busy, wait_for_quiet
from runtime_common import (
    SERVER_ALIAS,
    SMOLLM2_CONTEXT,
    CpuMeter,
    Reply,
    client_session,
    gateway,
    llama_cpp_version,
    llama_server,
    percentile,
    revision,
    smollm2_model,
    stream_chat,
)

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
EMBEDDED = "smollm2-embedded"
VIA_SERVER = "smollm2-server"
PATHS = ("direct", "gateway->server", "gateway-embedded")
GOAL_RATIO = 0.95
GOAL_TTFT_MS = 5.0
# llama_cpp.server's default repeat_penalty is 1.1; the embedded engine samples with 1.0
# (and refuses the parameter), so the server is asked for 1.0 to generate the same tokens.
SAME_AS_EMBEDDED = {"repeat_penalty": 1.0}
QUIET_CPUS = 0.2  # others using more than this during a round: wait for quiet before the next


@dataclass
class Target:
    name: str
    url: str
    token: str | None
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # more request fields
    replies: list[Reply] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)  # per measured request
    others: list[float] = field(default_factory=list)  # others' CPUs during each request


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    targets: list[Target],
    rounds: int,
    warmup: int,
    max_tokens: int,
    meter: CpuMeter,
    quiet_wait: float,
) -> None:
    # A new connection per request: the client may wait between rounds, longer than the
    # servers keep an idle connection, and a reused one could be closed under it.
    async with client_session(4, keep_alive=False) as session:
        disturbed = True
        for index in range(warmup + rounds):
            if quiet_wait > 0 and disturbed:
                # Before the first round, and after a round others used CPU in.
                await asyncio.to_thread(wait_for_quiet, quiet_wait)
            disturbed = False
            # Rotate the order each round, so no path always comes first.
            shift = index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                body = {
                    "model": target.model,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "temperature": 0,
                    "seed": 42,
                    "max_tokens": max_tokens,
                    **target.extra,
                }
                meter.start()
                mine, busy, wall = own_cpu(), machine_busy(), time.monotonic()
                reply = await stream_chat(session, target.url, target.token, body)
                wall = time.monotonic() - wall
                cpu = meter.stop()
                ours = sum(cpu.values()) + own_cpu() - mine
                others = max(0.0, (machine_busy() - busy - ours) / wall)
                if not reply.ok:
                    print(f"  {target.name}: HTTP {reply.status} {reply.error}", flush=True)
                disturbed = disturbed or (wall > 0.5 and others > QUIET_CPUS)
                label = "warm-up" if index < warmup else f"round {index - warmup + 1}"
                print(
                    f"  {label:>8} {target.name:>16}: TTFT {fmt_ms(reply.ttft)} ms, "
                    f"{reply.tokens} tokens, {fmt(reply.decode_rate)} tok/s decode, "
                    f"{reply.e2e_rate:6.1f} tok/s end-to-end, others {others:.2f} CPUs",
                    flush=True,
                )
                if index >= warmup:
                    target.replies.append(reply)
                    target.cpu.append(cpu)
                    target.others.append(others)


def fmt(value: float | None, spec: str = "6.1f") -> str:
    return "   n/a" if value is None else format(value, spec)


def fmt_ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value * 1000:7.1f}"


@dataclass
class Summary:
    name: str
    n: int
    errors: int
    ttft_p50: float
    ttft_p90: float
    rate_p50: float
    rate_p10: float
    e2e_p50: float
    total_p50: float
    tokens: str
    engine_cpu: float  # CPU seconds per request of the engine process
    gateway_cpu: float  # of the gateway process (without its worker)
    others: float


def summarise(target: Target) -> Summary:
    good = [r for r in target.replies if r.ok]
    ttft = [r.ttft for r in good if r.ttft is not None]
    rates = [r.decode_rate for r in good if r.decode_rate is not None]
    counts = sorted({r.tokens for r in good})

    def cpu_of(key: str) -> float:
        values = [c.get(key, 0.0) for c in target.cpu]
        return sum(values) / max(1, len(values))

    engine_key = "worker" if target.name == "gateway-embedded" else "server"
    return Summary(
        name=target.name,
        n=len(good),
        errors=len(target.replies) - len(good),
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        rate_p50=percentile(rates, 50),
        rate_p10=percentile(rates, 10),
        e2e_p50=percentile([r.e2e_rate for r in good], 50),
        total_p50=percentile([r.end - r.sent for r in good], 50),
        tokens="/".join(str(c) for c in counts),
        engine_cpu=cpu_of(engine_key),
        gateway_cpu=cpu_of("gateway") if target.name != "direct" else 0.0,
        others=sum(target.others) / max(1, len(target.others)),
    )


def table(rows: list[Summary], markdown: bool) -> list[str]:
    head = ["path", "ok", "errors", "TTFT p50 ms", "TTFT p90 ms", "decode tok/s p50", "tok/s p10"]
    head += ["end-to-end tok/s p50", "request s p50", "tokens", "engine CPU s/req"]
    head += ["gateway CPU s/req", "others' CPUs"]
    body = [
        [
            s.name,
            str(s.n),
            str(s.errors),
            f"{s.ttft_p50 * 1000:.1f}",
            f"{s.ttft_p90 * 1000:.1f}",
            f"{s.rate_p50:.1f}",
            f"{s.rate_p10:.1f}",
            f"{s.e2e_p50:.1f}",
            f"{s.total_p50:.2f}",
            s.tokens,
            f"{s.engine_cpu:.2f}",
            f"{s.gateway_cpu:.3f}" if s.name != "direct" else "",
            f"{s.others:.2f}",
        ]
        for s in rows
    ]
    return grid(head, body, markdown, left=frozenset({0}))


def paired_ttft_delta(target: Target, direct: Target) -> float:
    """Median over rounds of (this path's TTFT - direct's TTFT in the same round)."""
    deltas = [
        a.ttft - b.ttft
        for a, b in zip(target.replies, direct.replies, strict=False)
        if a.ttft is not None and b.ttft is not None
    ]
    return median(deltas) if deltas else float("nan")


def paired_rate_ratio(target: Target, direct: Target) -> float:
    """Median over rounds of (this path's decode tokens/s / direct's in the same round)."""
    ratios = [
        a.decode_rate / b.decode_rate
        for a, b in zip(target.replies, direct.replies, strict=False)
        if a.decode_rate and b.decode_rate
    ]
    return median(ratios) if ratios else float("nan")


def verdicts(targets: dict[str, Target], rows: dict[str, Summary]) -> list[str]:
    lines: list[str] = []
    direct = rows.get("direct")
    if direct is None:
        return lines
    for name in ("gateway->server", "gateway-embedded"):
        if name not in rows:
            continue
        row = rows[name]
        ratio = row.rate_p50 / direct.rate_p50
        e2e = row.e2e_p50 / direct.e2e_p50
        added = (row.ttft_p50 - direct.ttft_p50) * 1000
        added90 = (row.ttft_p90 - direct.ttft_p90) * 1000
        paired = paired_ttft_delta(targets[name], targets["direct"]) * 1000
        paired_ratio = paired_rate_ratio(targets[name], targets["direct"])
        met = "goal met" if ratio >= GOAL_RATIO else "goal missed"
        lines.append(
            f"{met}: {name} decodes at {ratio:.1%} of direct tokens/s (p50 {row.rate_p50:.1f} "
            f"vs {direct.rate_p50:.1f}; end-to-end {e2e:.1%}; median paired per round "
            f"{paired_ratio:.1%}); goal >= {GOAL_RATIO:.0%}"
        )
        met = "goal met" if added <= GOAL_TTFT_MS else "goal missed"
        lines.append(
            f"{met}: {name} adds {added:+.1f} ms to TTFT at p50 ({added90:+.1f} ms at p90, "
            f"{paired:+.1f} ms median paired per round); goal <= {GOAL_TTFT_MS:g} ms"
        )
    return lines


def same_text(targets: list[Target]) -> list[str]:
    texts = {t.name: {r.text for r in t.replies if r.ok} for t in targets}
    every = set().union(*texts.values())
    if len(every) == 1:
        return ["every path generated the same text"]
    lines = [
        f"NOTE: the paths generated {len(every)} different texts: "
        + ", ".join(f"{name} {len(found)}" for name, found in texts.items())
    ]
    for name, found in texts.items():
        for text in sorted(found):
            lines.append(f"  {name}: {text[:100]!r}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests per path")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="per engine")
    parser.add_argument("--paths", default=",".join(PATHS), help="of " + ",".join(PATHS))
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="wait up to this long for other processes to go idle, first and after a round "
        "they were busy in (0: not)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    # Stop the servers (own sessions) on SIGTERM too, e.g. from `timeout`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chosen = [p for p in PATHS if p in args.paths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="runtime-throughput-"))
    began = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    print(f"{machine()}; {now:%Y-%m-%d %H:%M UTC}; gateway at {revision()}")
    print(
        f"SmolLM2-135M-Instruct Q4_1, llama-cpp-python {llama_cpp_version()}, "
        f"{args.threads} threads per engine, n_ctx {SMOLLM2_CONTEXT}; greedy, seed 42, "
        f"max_tokens {args.max_tokens}; {args.warmup} warm-up + {args.rounds} rounds, "
        f"paths interleaved, order rotating; work dir {work}",
        flush=True,
    )
    models = smollm2_model(EMBEDDED, serving=f"{{threads: {args.threads}}}")
    try:
        with ExitStack() as stack:
            server_url, server_pid = stack.enter_context(
                llama_server(work, args.threads, SMOLLM2_CONTEXT)
            )
            models += smollm2_model(VIA_SERVER, replicas=[server_url])
            gw = stack.enter_context(gateway(work, models))
            workers = gw.worker_pids()
            meter = CpuMeter(
                {"server": server_pid, "gateway": gw.pid, "worker": workers[0]},
                exclude={"gateway": workers},
            )
            every = {
                "direct": Target("direct", server_url, None, SERVER_ALIAS, SAME_AS_EMBEDDED),
                "gateway->server": Target(
                    "gateway->server", f"{gw.base}/v1", gw.token, VIA_SERVER, SAME_AS_EMBEDDED
                ),
                "gateway-embedded": Target("gateway-embedded", f"{gw.base}/v1", gw.token, EMBEDDED),
            }
            targets = [every[name] for name in chosen]
            print(f"  started in {time.monotonic() - began:.0f} s", flush=True)
            asyncio.run(
                measure(targets, args.rounds, args.warmup, args.max_tokens, meter, args.quiet_wait)
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = {t.name: summarise(t) for t in targets}
    print()
    print("\n".join(table(list(rows.values()), args.markdown)))
    print()
    print("\n".join(same_text(targets)))
    print("\n".join(verdicts(every, rows)))
    errors = sum(s.errors for s in rows.values())
    print(f"errors: {errors}  (total time {time.monotonic() - began:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
