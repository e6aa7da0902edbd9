"""Latency the gateway adds over a 5 ms upstream, with LiteLLM proxy as the peer, and what
TLS 1.3 on the client boundary adds to the plain gateway.

Open-loop constant-rate load (vegeta) at 100, 500 and 1,000 req/s; p50/p99 vs the goals.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign_gateway import issuer

from sovereign.profile.loader import parse_profile
from sovereign.render import render_to

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "sovereign" / "bench"
VEGETA_MODULE = "github.com/tsenart/vegeta/v12"
VEGETA_VERSION = "12.13.0"
LITELLM_DIR = ROOT / "bench" / "litellm"
LITELLM_KEY = "sk-bench-master-key"
MODEL = "echo-1"
PROMPT = "Summarise the quarterly report for the board in three short bullet points."
TARGETS = ("direct", "gateway", "gateway-tls", "litellm")
PEERS = ("direct", "gateway", "litellm")  # the side-by-side comparison with LiteLLM
GOAL_RATE = 500
GOAL_ADDED_P99_MS = 2.0
START_TIMEOUT_S = 120
SETTLE_S = 5
# LiteLLM fetches cost maps, blog posts and presets from the internet unless told not to.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def process(
    command: list[str],
    log: Path,
    ready_url: str,
    env: dict[str, str] | None = None,
    trusted: Path | None = None,
) -> Iterator[int]:
    """Run `command` in its own session until `ready_url` answers (over TLS trusting the
    CA file `trusted`, which the server may write as it starts); gives its pid."""
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"{command[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                context = None if trusted is None else ssl.create_default_context(cafile=trusted)
                with urllib.request.urlopen(ready_url, timeout=5, context=context):  # noqa: S310
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"{ready_url} did not answer:\n{log.read_text()[-3000:]}"
                    ) from exc
                time.sleep(0.25)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    ticks, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
        todo.extend(children.get(current, []))
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting on I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(limit_s: float) -> float:
    """Wait (up to `limit_s`) until others use under 0.2 CPUs; gives what they used last."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_busy()
        time.sleep(3)
        used = (machine_busy() - before) / 3
        if used < 0.2 or time.monotonic() > deadline:
            return used
        print(f"  waiting: other processes use {used:.1f} CPUs", flush=True)


# -- the three servers --------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str  # ends in /v1
    token: str | None
    pids: list[int]
    ca: Path | None = None  # the CA a client trusts, for https


@contextmanager
def upstream(work: Path, latency_ms: float) -> Iterator[tuple[str, int]]:
    """bench/fixed_upstream.py; gives its base URL and its pid."""
    port = free_port()
    script = str(ROOT / "bench" / "fixed_upstream.py")
    command = [sys.executable, script, "--port", str(port), "--latency-ms", str(latency_ms)]
    base = f"http://127.0.0.1:{port}/v1"
    with process(command, work / "upstream.log", f"{base}/models") as pid:
        yield base, pid


def gateway_profile(home: Path, port: int, models: str, tls: bool = False) -> str:
    """A personal profile as shipped: local issuer, embedded policy, DLP redact, audit on;
    with `tls`, TLS 1.3 from the node-local CA.

    `models` is the YAML list under `models:`.
    """
    listen = f"gateway:\n  listen: 127.0.0.1:{port}\n"
    if tls:
        listen += f"  tls:\n    local_ca: true\n    ca_dir: {home}/tls\n"
    return f"""\
kind: personal
name: bench
identity:
  provider: local
  issuer: http://127.0.0.1:{port}/local
  local_key_dir: {home}/issuer
  roles:
    admin: [admin, chat, embeddings, ingest, query, "models:read", "audit:read"]
    user: [chat, embeddings, ingest, "models:read"]
models:{models.rstrip()}
memory:
  data_dir: {home}/memory
  key_file: {home}/keys/memory.kek
policy:
  engine: embedded
  dlp: redact
  lock:
    required: false
    manifest: {home}/lock/lock.json
    public_key: {home}/lock/lock.pub
audit:
  path: {home}/audit
  signing_key: {home}/keys/audit.key
  capture_content: false
{listen}"""


def upstream_model(upstream_url: str) -> str:
    return f"""
  - name: {MODEL}
    engine: upstream
    source: {upstream_url}
    context_length: 4096
    allowed_roles: [admin, user]
"""


@contextmanager
def rendered_gateway(
    work: Path, profile_for: Callable[[Path, int], str], tls: bool = False
) -> Iterator[tuple[str, str, int, Path]]:
    """Render `profile_for(home, port)`, mint a token, start `sovereign_gateway` on the render.

    Gives its base URL (no /v1), the token, its pid and its home directory.
    """
    home = Path(tempfile.mkdtemp(prefix="gateway-", dir=work))
    port = free_port()
    profile = parse_profile(profile_for(home, port), str(home / "p.yaml"))
    local = issuer.ensure_keys(Path(str(profile.identity.local_key_dir)))
    render_to(profile, home / "render")
    token = issuer.mint(
        local,
        issuer_url=str(profile.identity.issuer).rstrip("/"),
        audience="sovereign-gateway",
        subject="bench",
        roles=["user"],
        ttl_seconds=6 * 3600,
    )
    config = home / "render" / "gateway" / "config.json"
    command = [sys.executable, "-m", "sovereign_gateway", "--config", str(config)]
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    trusted = home / "tls" / "ca.pem" if tls else None
    with process(command, home / "gateway.log", f"{base}/health", trusted=trusted) as pid:
        yield base, token, pid, home


@contextmanager
def gateway(work: Path, upstream_url: str, tls: bool = False) -> Iterator[Server]:
    """The gateway with `upstream_url` as its models' server; over TLS 1.3 with `tls`."""

    def profile(home: Path, port: int) -> str:
        return gateway_profile(home, port, upstream_model(upstream_url), tls)

    with rendered_gateway(work, profile, tls) as (base, token, pid, home):
        name = "gateway-tls" if tls else "gateway"
        yield Server(name, f"{base}/v1", token, [pid], home / "tls" / "ca.pem" if tls else None)


def litellm_version() -> str:
    for line in (LITELLM_DIR / "requirements.in").read_text().splitlines():
        if line.startswith("litellm"):
            return line.split("==", 1)[1].strip()
    raise SystemExit("bench/litellm/requirements.in pins no litellm version")


def uv_binary() -> str:
    found = shutil.which("uv")
    if found:
        return found
    cached = sorted((Path.home() / ".cache" / "sovereign").glob("uv-*/bin/uv"))
    if cached:
        return str(cached[-1])
    raise SystemExit("uv not found: run scripts/bootstrap first")


def litellm_venv() -> Path:
    """The venv holding LiteLLM, installed from the hash-locked file when missing."""
    home = CACHE / f"litellm-{litellm_version()}"
    binary = home / "venv" / "bin" / "litellm"
    done = home / "installed"
    if done.exists():
        return binary
    print(f"installing LiteLLM into {home} (once) ...", flush=True)
    shutil.rmtree(home, ignore_errors=True)
    uv = uv_binary()
    subprocess.run([uv, "venv", "--quiet", "--python", "3.11", str(home / "venv")], check=True)
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(home / "venv" / "bin" / "python"),
            "--require-hashes",
            "--compile-bytecode",  # as pip does; else every failed lazy import recompiles
            "-r",
            str(LITELLM_DIR / "requirements.lock"),
        ],
        check=True,
    )
    done.write_text(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}\n")
    return binary


@contextmanager
def litellm(work: Path, upstream_url: str) -> Iterator[Server]:
    """LiteLLM proxy: one model on the upstream, a master key, no database, no logging."""
    binary = litellm_venv()
    config = work / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": upstream_url,
                            "api_key": "dummy",
                        },
                    }
                ],
                "general_settings": {"master_key": LITELLM_KEY},
                "litellm_settings": {
                    "set_verbose": False,
                    "turn_off_message_logging": True,
                    "telemetry": False,
                },
            },
            indent=2,
        )
    )
    port = free_port()
    command = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", "1"]
    base = f"http://127.0.0.1:{port}"
    with process(command, work / "litellm.log", f"{base}/health/liveliness", LITELLM_ENV) as pid:
        yield Server("litellm", f"{base}/v1", LITELLM_KEY, [pid])


# -- load ---------------------------------------------------------------------------------


def vegeta_binary() -> Path:
    """vegeta from the Go module proxy, built once into the cache."""
    binary = CACHE / f"vegeta-{VEGETA_VERSION}" / "bin" / "vegeta"
    if binary.exists():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    print(f"building vegeta {VEGETA_VERSION} into {binary.parent} (once) ...", flush=True)
    subprocess.run(
        [go, "install", f"{VEGETA_MODULE}@v{VEGETA_VERSION}"],
        check=True,
        env={**os.environ, "GOBIN": str(binary.parent)},
    )
    return binary


@dataclass
class Point:
    target: str
    rate: int
    sent: float  # req/s vegeta sent
    served: float  # successful responses/s
    success: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us: float  # CPU of the server under test (threads and children) per request
    loadgen_cpu_us: float  # CPU of vegeta per request
    others_cpus: float  # CPUs used meanwhile by processes outside this benchmark
    errors: list[str]

    @property
    def kept_up(self) -> bool:
        return self.success == 1 and self.served > 0.97 * self.rate


def settle(pids: list[int], limit_s: float) -> bool:
    """Wait until the servers are idle; False if they are still busy (a backlog) at the limit."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(0.5)
        if sum(cpu_seconds(pid) for pid in pids) - before < 0.05:
            return True
    return False


class Fleet:
    """The servers under test; one that is left with a backlog is restarted, not waited on."""

    def __init__(self, work: Path, latency_ms: float, names: list[str]) -> None:
        self.work = work
        self.stacks: dict[str, ExitStack] = {}
        self.servers: dict[str, Server] = {}
        self.upstream = ExitStack()
        url, pid = self.upstream.enter_context(upstream(work, latency_ms))
        self.servers["direct"] = Server("direct", url, None, [pid])
        try:
            for name in names:
                if name != "direct":
                    self.start(name)
        except BaseException:
            self.close()
            raise

    def start(self, name: str) -> None:
        stack = ExitStack()
        upstream_url = self.servers["direct"].url
        started = (
            litellm(self.work, upstream_url)
            if name == "litellm"
            else gateway(self.work, upstream_url, tls=name == "gateway-tls")
        )
        self.servers[name] = stack.enter_context(started)
        self.stacks[name] = stack

    def quiet(self) -> list[str]:
        """Let every server drain; restart those that do not within a few seconds."""
        restarted = []
        for name, server in list(self.servers.items()):
            if not settle(server.pids, SETTLE_S):
                restarted.append(name)
                if name == "direct":
                    settle(server.pids, 60)
                else:
                    self.stacks.pop(name).close()
                    self.start(name)
        return restarted

    def close(self) -> None:
        for stack in self.stacks.values():
            stack.close()
        self.upstream.close()


def attack(
    vegeta: Path,
    work: Path,
    server: Server,
    rate: int,
    seconds: float,
    timeout_s: float,
    ours: list[int],
) -> Point:
    headers = {"Content-Type": ["application/json"]}
    if server.token:
        headers["Authorization"] = [f"Bearer {server.token}"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]})
    spec = {
        "method": "POST",
        "url": f"{server.url}/chat/completions",
        "header": headers,
        "body": base64.b64encode(body.encode()).decode(),
    }
    targets = work / f"{server.name}.targets"
    targets.write_text(json.dumps(spec) + "\n")
    results = work / f"{server.name}-{rate}.bin"
    command = [str(vegeta), "attack", "-format=json", f"-targets={targets}", f"-rate={rate}/1s"]
    command += [f"-duration={seconds}s", f"-timeout={timeout_s}s", f"-output={results}"]
    if server.ca is not None:
        # HTTP/1.1 over TLS, as the OpenAI SDK speaks it; connections are kept and reused.
        command += [f"-root-certs={server.ca}", "-http2=false"]
    before = sum(cpu_seconds(pid) for pid in server.pids)
    ours_before = sum(cpu_seconds(pid) for pid in ours)
    busy_before, wall_before = machine_busy(), time.monotonic()
    loadgen = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    subprocess.run(command, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = sum(cpu_seconds(pid) for pid in server.pids) - before
    loadgen_cpu = after.ru_utime + after.ru_stime - loadgen.ru_utime - loadgen.ru_stime
    own = self_after.ru_utime + self_after.ru_stime - self_before.ru_utime - self_before.ru_stime
    ours_cpu = sum(cpu_seconds(pid) for pid in ours) - ours_before + loadgen_cpu + own
    others = (machine_busy() - busy_before - ours_cpu) / (time.monotonic() - wall_before)
    report = subprocess.run(
        [str(vegeta), "report", "-type=json", str(results)],
        check=True,
        capture_output=True,
        text=True,
    )
    data: dict[str, Any] = json.loads(report.stdout)
    lat = data["latencies"]
    requests = max(1, int(data["requests"]))
    return Point(
        target=server.name,
        rate=rate,
        sent=float(data["rate"]),
        served=float(data["throughput"]),
        success=float(data["success"]),
        p50_ms=lat["50th"] / 1e6,
        p90_ms=lat["90th"] / 1e6,
        p99_ms=lat["99th"] / 1e6,
        max_ms=lat["max"] / 1e6,
        server_cpu_us=cpu / max(1.0, requests * float(data["success"])) * 1e6,
        loadgen_cpu_us=loadgen_cpu / requests * 1e6,
        others_cpus=max(0.0, others),
        errors=sorted({e.split(": ")[-1] for e in data.get("errors") or []})[:3],
    )


# -- report -------------------------------------------------------------------------------


def table(points: list[Point], markdown: bool) -> list[str]:
    by = {(p.target, p.rate): p for p in points}
    head = ["req/s", "path", "p50 ms", "p99 ms", "adds p50", "adds p99", "served/s", "ok"]
    head += ["server CPU µs/req", "vegeta CPU µs/req", "others' CPUs"]
    rows = []
    for p in points:
        base = by.get(("direct", p.rate))
        added = ["", ""]
        if base is not None and p.target != "direct":
            added = [f"{p.p50_ms - base.p50_ms:+,.2f}", f"{p.p99_ms - base.p99_ms:+,.2f}"]
        rows.append(
            [
                f"{p.rate:,}",
                p.target,
                f"{p.p50_ms:,.2f}",
                f"{p.p99_ms:,.2f}",
                *added,
                f"{p.served:,.0f}",
                f"{p.success:.1%}",
                f"{p.server_cpu_us:,.0f}" if p.kept_up else "(saturated)",
                f"{p.loadgen_cpu_us:,.0f}",
                f"{p.others_cpus:.2f}",
            ]
        )
    return grid(head, rows, markdown, left=frozenset({1}))


def grid(
    head: list[str], rows: list[list[str]], markdown: bool, left: frozenset[int] = frozenset()
) -> list[str]:
    """A Markdown table, or right-aligned columns; `left` names the text columns."""
    if markdown:
        rule = "".join("---|" if i in left else "---:|" for i in range(len(head)))
        return ["| " + " | ".join(head) + " |", "|" + rule] + [
            "| " + " | ".join(row) + " |" for row in rows
        ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [head, *rows]
    ]


def verdicts(points: list[Point], rates: list[int]) -> list[str]:
    by = {(p.target, p.rate): p for p in points}
    lines = []
    if ("direct", GOAL_RATE) in by and ("gateway", GOAL_RATE) in by:
        gw = by[("gateway", GOAL_RATE)]
        added = gw.p99_ms - by[("direct", GOAL_RATE)].p99_ms
        verdict = "PASS" if added <= GOAL_ADDED_P99_MS and gw.kept_up else "MISS"
        lines.append(
            f"{verdict}: the gateway adds {added:,.2f} ms at p99 at {GOAL_RATE} req/s "
            f"(goal: <= {GOAL_ADDED_P99_MS:g} ms)"
        )
    for rate in rates:
        if ("gateway", rate) in by and ("gateway-tls", rate) in by:
            plain, tls = by[("gateway", rate)], by[("gateway-tls", rate)]
            lines.append(
                f"info: at {rate:,} req/s TLS 1.3 adds {tls.p50_ms - plain.p50_ms:+,.2f} / "
                f"{tls.p99_ms - plain.p99_ms:+,.2f} ms (p50 / p99) and "
                f"{tls.server_cpu_us - plain.server_cpu_us:+,.0f} µs of gateway CPU per request "
                "to the plain gateway"
            )
        if not all((t, rate) in by for t in PEERS):
            continue
        base, gw, ll = (by[(t, rate)] for t in PEERS)
        gw_added = (gw.p50_ms - base.p50_ms, gw.p99_ms - base.p99_ms)
        ll_added = (ll.p50_ms - base.p50_ms, ll.p99_ms - base.p99_ms)
        figures = (
            f"the gateway adds {gw_added[0]:,.2f} / {gw_added[1]:,.2f} ms (p50 / p99), "
            f"LiteLLM {ll_added[0]:,.2f} / {ll_added[1]:,.2f} ms"
        )
        if not gw.kept_up and not ll.kept_up:
            # Both hit the client timeout: their latencies are the timeout, not comparable.
            lines.append(
                f"n/a : at {rate:,} req/s both are saturated (latency = the timeout); "
                f"they served {gw.served:,.0f} and {ll.served:,.0f} req/s"
            )
            continue
        ok = gw.kept_up and gw_added[0] < ll_added[0] and gw_added[1] < ll_added[1]
        saturated = [p.target for p in (gw, ll) if not p.kept_up]
        note = f" ({' and '.join(saturated)} saturated)" if saturated else ""
        lines.append(f"{'PASS' if ok else 'MISS'}: at {rate:,} req/s {figures}{note}")
    return lines


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="100,500,1000", help="req/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=12, help="measured time per point")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured time per point")
    parser.add_argument("--timeout", type=float, default=10, help="per-request timeout, s")
    parser.add_argument("--latency-ms", type=float, default=5, help="the upstream's delay")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"of {','.join(TARGETS)}")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120,
        help="before each point wait up to this long for other processes to go idle (0: not)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, results)")
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    chosen = [t for t in TARGETS if t in args.targets.split(",")]
    vegeta = vegeta_binary()
    if "litellm" in chosen:
        litellm_venv()
    work = Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    started = time.monotonic()
    print(f"{machine()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(
        f"upstream {args.latency_ms:g} ms; vegeta {VEGETA_VERSION} open-loop, "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s per point, {args.timeout:g} s timeout; "
        f"LiteLLM {litellm_version()}; work dir {work}",
        flush=True,
    )
    points: list[Point] = []
    fleet = Fleet(work, args.latency_ms, chosen)
    try:
        for rate in rates:
            for target in chosen:
                for name in fleet.quiet():
                    print(f"  ({name} still had a backlog: restarted it)", flush=True)
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                server = fleet.servers[target]
                ours = [pid for each in fleet.servers.values() for pid in each.pids]
                if args.warmup > 0:
                    attack(vegeta, work, server, rate, args.warmup, args.timeout, ours)
                    fleet.quiet()
                    server = fleet.servers[target]
                    ours = [pid for each in fleet.servers.values() for pid in each.pids]
                point = attack(vegeta, work, server, rate, args.seconds, args.timeout, ours)
                points.append(point)
                print(
                    f"  {target:>8} {rate:>5}/s: p50 {point.p50_ms:8.2f}  "
                    f"p90 {point.p90_ms:8.2f}  p99 {point.p99_ms:8.2f}  "
                    f"max {point.max_ms:8.2f} ms  served {point.served:5.0f}/s  "
                    f"ok {point.success:6.1%}  server {point.server_cpu_us:6,.0f} µs/req  "
                    f"others {point.others_cpus:.2f} CPUs  "
                    f"[{time.monotonic() - started:4.0f} s]"
                    + (f"  {'; '.join(point.errors)}" if point.errors else ""),
                    flush=True,
                )
    finally:
        fleet.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(table(points, args.markdown)))
    print()
    print("\n".join(verdicts(points, rates)))


if __name__ == "__main__":
    main()
