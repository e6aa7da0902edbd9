"""What the runtime benchmarks share: SmolLM2 on llama.cpp's server and behind the gateway.

Takes a YAML list of models; gives a running gateway (rendered from a personal profile into
a temp dir, with a token from its local issuer) and a running `llama_cpp.server`, plus a
streaming chat client that times each event. Used by `runtime_throughput.py` and
`runtime_concurrency.py`; the process handling comes from `gateway_overhead.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from gateway_overhead import cpu_seconds, free_port, gateway_profile, process, rendered_gateway

from sovereign import tools

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SOURCE = "pkg:smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192
SERVER_ALIAS = "smollm2-135m-instruct"
LOAD_TIMEOUT_S = 300


def smollm2_model(name: str, *, replicas: list[str] | None = None, serving: str = "") -> str:
    """One entry of the profile's `models:` list: SmolLM2 embedded, or on `replicas`."""
    text = f"""
  - name: {name}
    engine: llamacpp
    source: {SMOLLM2_SOURCE}
    sha256: {SMOLLM2_SHA256}
    quantization: int4
    context_length: {SMOLLM2_CONTEXT}
    allowed_roles: [admin, user]
"""
    if replicas:
        text += f"    replicas: [{', '.join(replicas)}]\n"
    if serving:
        text += f"    serving: {serving}\n"
    return text


@dataclass
class Gateway:
    base: str  # http://127.0.0.1:port, without /v1
    token: str
    pid: int
    home: Path

    def health(self) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.base}/health")  # noqa: S310 (loopback)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
                body: dict[str, Any] = json.loads(reply.read())
        except urllib.error.HTTPError as error:  # 503 while a model loads
            body = json.loads(error.read())
        return body

    def worker_pids(self) -> list[int]:
        """The embedded engine's worker processes, from /health."""
        pids = []
        for model in self.health().get("models", {}).values():
            for replica in model.get("replicas", []):
                if replica.get("pid"):
                    pids.append(int(replica["pid"]))
        return pids


@contextmanager
def gateway(work: Path, models: str) -> Iterator[Gateway]:
    """Render a profile with `models`, mint a token, start the gateway, wait for its models."""
    with rendered_gateway(work, lambda home, port: gateway_profile(home, port, models)) as (
        base,
        token,
        pid,
        home,
    ):
        log = home / "gateway.log"
        running = Gateway(base, token, pid, home)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not running.health().get("ready"):
            if time.monotonic() > deadline:
                raise SystemExit(f"the gateway's models did not load:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield running


@contextmanager
def llama_server(work: Path, threads: int, n_ctx: int) -> Iterator[tuple[str, int]]:
    """`python -m llama_cpp.server` with SmolLM2; gives its base URL (ending in /v1), pid."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(tools.smollm2_gguf())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model_alias", SERVER_ALIAS]
    command += ["--n_ctx", str(n_ctx), "--n_threads", str(threads)]
    command += ["--n_threads_batch", str(threads), "--verbose", "False"]
    # Its default stops a running stream when another request arrives; never wanted here.
    command += ["--interrupt_requests", "False"]
    base = f"http://127.0.0.1:{port}/v1"
    with process(command, work / "llama-server.log", f"{base}/models") as pid:
        # Its first request is slow (weights paged in); take it before anyone measures.
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        request = urllib.request.Request(  # noqa: S310 (loopback)
            f"{base}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S) as reply:  # noqa: S310
            reply.read()
        yield base, pid


def revision() -> str:
    """The commit the gateway runs from, with "+changes" when its source differs from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "services/gateway/src", "src")
    return f"{commit}+changes" if dirty else commit


def llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


# -- the client ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    sent: float  # perf_counter when the request was sent
    first: float | None = None  # first event with non-empty delta.content
    last: float | None = None  # last such event
    end: float = 0.0  # the response ended
    chunks: int = 0  # events with non-empty delta.content
    usage_tokens: int | None = None  # usage.completion_tokens, if the server sent usage
    text: str = ""
    error: str | None = None  # an in-stream error event, or the body of a non-200
    retry_after: str | None = None
    code: str | None = None  # error.code of a non-200
    done: bool = False  # [DONE] arrived
    finish: str | None = None  # the finish_reason

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def decode_rate(self) -> float | None:
        """Tokens per second between the first and the last token (n - 1 intervals)."""
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def e2e_rate(self) -> float:
        return self.tokens / (self.end - self.sent)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.first is not None


async def stream_chat(
    session: aiohttp.ClientSession, url: str, token: str | None, body: dict[str, Any]
) -> Reply:
    """POST a streaming chat completion to `url`/chat/completions and time its events."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode()
    reply = Reply(status=0, sent=time.perf_counter())
    async with session.post(f"{url}/chat/completions", data=data, headers=headers) as answer:
        reply.status = answer.status
        if answer.status != 200:
            raw = await answer.read()
            reply.end = time.perf_counter()
            reply.retry_after = answer.headers.get("retry-after")
            reply.error = raw.decode(errors="replace")[:300]
            with suppress(ValueError, KeyError, TypeError):
                reply.code = json.loads(raw)["error"]["code"]
            return reply
        buffer = b""
        parts: list[str] = []
        try:
            async for piece in answer.content.iter_any():
                now = time.perf_counter()
                buffer = (buffer + piece).replace(b"\r\n", b"\n")  # sse-starlette sends CRLF
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            _take(reply, line[5:].strip(), now, parts)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            reply.error = f"the stream broke off: {type(exc).__name__}"
        reply.end = time.perf_counter()
        reply.text = "".join(parts)
        if reply.error is None and not reply.done:
            reply.error = "the stream ended without [DONE]"
        elif reply.error is None and reply.finish is None:
            reply.error = "the stream ended without a finish_reason (cut short?)"
    return reply


def _take(reply: Reply, payload: bytes, now: float, parts: list[str]) -> None:
    """One SSE data line."""
    if payload == b"[DONE]":
        reply.done = True
        return
    chunk = json.loads(payload)
    if "error" in chunk:
        reply.error = json.dumps(chunk["error"])[:300]
        return
    usage = chunk.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        reply.usage_tokens = int(usage["completion_tokens"])
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            reply.finish = choice["finish_reason"]
        content = (choice.get("delta") or {}).get("content")
        if content:
            if reply.first is None:
                reply.first = now
            reply.last = now
            reply.chunks += 1
            parts.append(content)


def client_session(connections: int, keep_alive: bool = True) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=not keep_alive),
        timeout=aiohttp.ClientTimeout(total=300),
    )


# -- figures ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class CpuMeter:
    """CPU seconds of some processes (not their children counted elsewhere), over a span."""

    pids: dict[str, int]
    exclude: dict[str, list[int]] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        values = {}
        for name, pid in self.pids.items():
            values[name] = cpu_seconds(pid) - sum(
                cpu_seconds(child) for child in self.exclude.get(name, [])
            )
        return values

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        now = self._read()
        return {name: now[name] - self._start[name] for name in now}
