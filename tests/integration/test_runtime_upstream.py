"""The gateway in front of a real OpenAI-compatible engine: llama.cpp's server running SmolLM2.

One `python -m llama_cpp.server` serves the module; each test starts its own gateway with
that server (and dead or slow replicas beside it) listed in the model's `replicas`. The
slow replicas are `bench/fixed_upstream.py`, whose latency is fixed, so queueing is exact;
one in-process engine holds its connection open after [DONE], to pin a race down.
The machine has two cores: generations stay short and few.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from sovereign import tools
from tests.integration.conftest import (
    ROOT,
    START_TIMEOUT_S,
    GatewayFactory,
    RunningGateway,
    fixed_upstream,
    free_port,
    start,
    stop,
    wait_listening,
)

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONTEXT = 1024
MAX_TOKENS = 12
# Generous: other test runs share the two cores, and one generation can then take seconds.
GENERATION_TIMEOUT_S = 120
# The router probes every replica every 5 s; a replica back up must be seen by then.
HEALTH_RECOVERY_S = 12
SERVING = "{concurrency: 1, queue: 4, queue_timeout: 60s, timeout: 90s}"


@dataclass(frozen=True)
class LlamaServer:
    url: str  # the OpenAI base URL, ending in /v1
    log: Path

    def chat_posts(self) -> int:
        """How many chat requests reached the engine (uvicorn's access log lines)."""
        return self.log.read_text(errors="replace").count("POST /v1/chat/completions")

    def disconnects(self) -> int:
        """How many streams the engine saw its client (the gateway) walk away from."""
        return self.log.read_text(errors="replace").count("Disconnected from client")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """llama-cpp-python's OpenAI-compatible server with SmolLM2-135M, shared by the module."""
    gguf = tools.smollm2_gguf()
    assert tools.SMOLLM2_GGUF_SHA256 == SHA256
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    port = free_port()
    process = start(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            str(CONTEXT),
            # One thread: with two, llama.cpp's threads spin-wait on each other and a generation
            # of 16 tokens takes 10-50 s whenever anything else runs on the two cores.
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--model_alias",
            MODEL,
            "--verbose",
            "False",
        ],
        log,
    )
    try:
        wait_listening(f"http://127.0.0.1:{port}/v1/models", process, log, START_TIMEOUT_S)
        yield LlamaServer(url=f"http://127.0.0.1:{port}/v1", log=log)
    finally:
        stop(process)


def model_yaml(*replicas: str, serving: str = SERVING) -> str:
    return f"""
  - name: {MODEL}
    engine: llamacpp
    source: pkg:smollm2/{tools.SMOLLM2_GGUF}
    sha256: {SHA256}
    quantization: int4
    context_length: {CONTEXT}
    allowed_roles: [admin, user]
    replicas: [{", ".join(replicas)}]
    serving: {serving}
"""


def gateway(factory: GatewayFactory, *replicas: str, serving: str = SERVING) -> RunningGateway:
    return factory(models=model_yaml(*replicas, serving=serving))


def dead_replica() -> str:
    """A base URL on a loopback port nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}/v1"


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def records_of(node: RunningGateway, request_id: str) -> list[dict[str, Any]]:
    return [r for r in node.records() if r.get("request_id") == request_id]


def chat_records(node: RunningGateway) -> list[dict[str, Any]]:
    return [r for r in node.records() if r.get("action") == "chat"]


def header(headers: dict[str, str], name: str) -> str:
    found = {key.lower(): value for key, value in headers.items()}
    return found[name.lower()]


def error_of(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    return error


def health(node: RunningGateway) -> dict[str, Any]:
    model: dict[str, Any] = json.loads(node.call("GET", "/health")[2])["models"][MODEL]
    return model


def replica_states(node: RunningGateway) -> dict[str, str]:
    return {r["replica"]: r["state"] for r in health(node)["replicas"]}


def metric(node: RunningGateway, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0 when the series does not exist yet)."""
    text = node.call("GET", "/metrics")[2].decode()
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if found == labels:
            return float(match[3])
    return 0.0


def raw_stream(
    node: RunningGateway, token: str, body: dict[str, Any]
) -> tuple[int, dict[str, str], bytes]:
    """POST a streaming chat and read the whole response body, as sent (chunking undone)."""
    host, port = node.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=GENERATION_TIMEOUT_S)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"content-type": "application/json", "authorization": f"Bearer {token}"},
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def sse_data(body: bytes) -> list[str]:
    """The data of each event, after checking the framing: `data: ...` then a blank line.

    Comment events (`: ping`, sent by the engine while it is slow) are allowed and skipped.
    """
    text = body.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text.split("\n\n")[:-1]
    data: list[str] = []
    for event in events:
        lines = event.split("\n")
        if all(line.startswith(":") for line in lines):
            continue
        assert len(lines) == 1, f"one data line per event, got {event!r}"
        assert lines[0].startswith("data: "), event
        data.append(lines[0].removeprefix("data: "))
    assert data, text
    assert data[-1] == "[DONE]", data[-3:]
    assert data.count("[DONE]") == 1
    return data


def chunks_of(data: list[str]) -> list[dict[str, Any]]:
    chunks = [json.loads(item) for item in data[:-1]]
    assert all(isinstance(chunk, dict) and "error" not in chunk for chunk in chunks), chunks
    return chunks


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.2)


# -- the engine answering -------------------------------------------------------------


def test_a_chat_through_the_sdk_is_answered_with_usage_and_audited(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """The SDK's plain chat reaches llama.cpp; the engine's usage is in the answer and audit."""
    node = gateway(gateway_factory, llama.url)
    token = node.token()
    prompt = "Name one colour of the lighthouse keeper's boat."
    client = openai.OpenAI(
        base_url=f"{node.url}/v1", api_key=token, max_retries=0, timeout=GENERATION_TIMEOUT_S
    )

    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS
    )

    assert (completion.choices[0].message.content or "").strip()
    assert completion.model == MODEL
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    admitted, record = chat_records(node)
    assert admitted["phase"] == "admitted"
    assert record["phase"] == "complete"
    assert record["request_id"] == admitted["request_id"]
    assert record["status"] == 200
    assert record["refusal"] is None
    assert record["replica"] == llama.url
    assert record["usage"] == {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "source": "engine",
    }
    assert metric(node, "sovereign_gateway_tokens_total", model=MODEL, kind="completion") == float(
        usage.completion_tokens
    )
    for path in node.audit_dir.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert b"lighthouse keeper" not in text, path
            assert token.encode() not in text, path


def test_streams_keep_sse_framing_and_strip_the_usage_the_client_did_not_ask_for(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """SDK and raw streams: whole `data:` events, [DONE] last, no unasked usage chunk."""
    node = gateway(gateway_factory, llama.url)
    token = node.token()
    client = openai.OpenAI(
        base_url=f"{node.url}/v1", api_key=token, max_retries=0, timeout=GENERATION_TIMEOUT_S
    )

    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello to the harbour master."}],
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    status, headers, body = raw_stream(
        node, token, chat_body("Count from one to five.", stream=True)
    )

    assert "".join(pieces).strip()
    assert status == 200, body
    assert header(headers, "content-type").startswith("text/event-stream")
    chunks = chunks_of(sse_data(body))
    assert content_of(chunks).strip()
    assert all(chunk.get("usage") is None for chunk in chunks), chunks
    assert not [c for c in chunks if c.get("choices") == []], "an unasked usage-only chunk"
    request_id = header(headers, "x-request-id")
    phases = [r["phase"] for r in records_of(node, request_id)]
    assert phases == ["admitted", "stream_start", "stream_end"]
    end = records_of(node, request_id)[-1]
    assert end["status"] == 200
    assert end["replica"] == llama.url
    assert end["refusal"] is None
    # llama-cpp-python's server sends no usage in streams: the gateway counted the deltas.
    assert end["usage"]["source"] == "counted"
    assert 0 < end["usage"]["completion_tokens"] <= MAX_TOKENS


def test_a_stream_with_include_usage_gets_exactly_one_usage_chunk_before_done(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """OpenAI's contract: with include_usage, one chunk with choices [] and usage, then [DONE]."""
    node = gateway(gateway_factory, llama.url)
    status, headers, body = raw_stream(
        node,
        node.token(),
        chat_body("Count from one to five.", stream=True, stream_options={"include_usage": True}),
    )

    assert status == 200, body
    chunks = chunks_of(sse_data(body))
    end = records_of(node, header(headers, "x-request-id"))[-1]
    assert end["phase"] == "stream_end"
    assert end["usage"]["completion_tokens"] > 0
    usage_chunks = [c for c in chunks if isinstance(c.get("usage"), dict)]
    assert len(usage_chunks) == 1, chunks[-2:]
    assert usage_chunks[0]["choices"] == []
    assert chunks[-1] is usage_chunks[0]
    assert usage_chunks[0]["usage"]["completion_tokens"] == end["usage"]["completion_tokens"]


# -- replicas failing ---------------------------------------------------------------


def test_a_dead_replica_fails_over_to_the_live_one(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """Connection refused on the first replica: the second serves, the first is marked down."""
    dead = dead_replica()
    node = gateway(gateway_factory, dead, llama.url)
    # Before the first health probe (5 s after start) both replicas count as ready, so the
    # router tries the dead one first: it is listed first and both have nothing in flight.
    assert replica_states(node) == {dead: "ready", llama.url: "ready"}

    status, _, raw = node.call(
        "POST",
        "/v1/chat/completions",
        chat_body("Say yes."),
        token=node.token(),
        timeout=GENERATION_TIMEOUT_S,
    )

    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"].strip()
    record = chat_records(node)[-1]
    assert record["phase"] == "complete"
    assert record["status"] == 200
    assert record["replica"] == llama.url
    assert record["usage"]["source"] == "engine"
    state = health(node)
    assert state["ready"] is True
    assert state["engine"] == "llamacpp"
    assert {r["replica"]: r["state"] for r in state["replicas"]} == {
        dead: "down",
        llama.url: "ready",
    }
    assert "ClientConnectorError" in state["replicas"][0]["detail"]
    assert metric(node, "sovereign_gateway_backend_failovers_total", model=MODEL) >= 1


def test_with_every_replica_dead_502_then_503_and_a_replica_back_serves_again(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """All refused: 502 naming them; then 503 (all down); the health loop revives one back up."""
    port = free_port()
    first, second = f"http://127.0.0.1:{port}/v1", dead_replica()
    node = gateway(gateway_factory, first, second)
    token = node.token()

    tried, tried_body = node.chat("hello", token, model=MODEL)
    down, down_body = node.chat("hello", token, model=MODEL)

    assert tried == 502, tried_body
    assert tried_body["error"]["code"] == "upstream_unreachable"
    assert tried_body["error"]["type"] == "upstream_error"
    assert first in tried_body["error"]["message"]
    assert second in tried_body["error"]["message"]
    assert down == 503, down_body
    assert down_body["error"]["code"] == "backend_unavailable"
    assert replica_states(node) == {first: "down", second: "down"}
    assert health(node)["ready"] is False
    outcomes = [r for r in chat_records(node) if r["phase"] == "complete"]
    assert [(r["status"], r["refusal"]) for r in outcomes] == [
        (502, "upstream_unreachable"),
        (503, "backend_unavailable"),
    ]
    assert all(r["replica"] is None and r["usage"] is None for r in outcomes)

    log = tmp_path / "revived.log"
    revived = start(
        [sys.executable, str(ROOT / "bench" / "fixed_upstream.py"), "--port", str(port)], log
    )
    try:
        wait_listening(f"{first}/models", revived, log, START_TIMEOUT_S)
        wait_for(
            "the revived replica marked ready",
            lambda: replica_states(node)[first] == "ready",
            HEALTH_RECOVERY_S,
        )
        status, body = node.chat("back again", token, model=MODEL)
    finally:
        stop(revived)

    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "echo: back again"
    assert replica_states(node)[second] == "down"
    record = chat_records(node)[-1]
    assert (record["status"], record["replica"], record["refusal"]) == (200, first, None)


# -- requests the engine or the gateway refuses --------------------------------------


def test_a_prompt_over_the_context_window_gets_the_engines_400_relayed(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """llama.cpp's own refusal comes back as a 400 in OpenAI's shape, naming the 1024 limit."""
    node = gateway(gateway_factory, llama.url)
    long_prompt = "lighthouse " * 1500

    status, _, raw = node.call(
        "POST", "/v1/chat/completions", chat_body(long_prompt, max_tokens=8), token=node.token()
    )

    assert status == 400, raw
    error = error_of(raw)
    assert str(CONTEXT) in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    record = chat_records(node)[-1]
    assert record["phase"] == "complete"
    assert record["status"] == 400
    assert record["replica"] == llama.url
    assert record["usage"] is None


def test_a_streamed_prompt_over_the_context_window_fails_in_stream(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """llama.cpp's server answers such a stream 200 and ends it at once, without [DONE].

    The gateway cannot relay a reason it never got: it ends the stream with OpenAI's in-stream
    error (code upstream_error) and audits stream_failed.
    """
    node = gateway(gateway_factory, llama.url)

    status, headers, body = raw_stream(
        node, node.token(), chat_body("lighthouse " * 1500, max_tokens=8, stream=True)
    )

    assert status == 200, body
    events = [e for e in body.decode().split("\n\n") if e]
    assert len(events) == 1, events
    assert events[0].startswith("data: ")
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_error"
    assert "[DONE]" in error["message"]
    phases = [r["phase"] for r in records_of(node, header(headers, "x-request-id"))]
    assert phases == ["admitted", "stream_start", "stream_failed"]
    failed = records_of(node, header(headers, "x-request-id"))[-1]
    assert (failed["status"], failed["refusal"], failed["replica"]) == (
        200,
        "upstream_error",
        llama.url,
    )
    assert failed["usage"]["completion_tokens"] == 0


def test_max_tokens_at_the_context_length_is_refused_by_the_gateway(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """max_tokens >= context_length never reaches the engine: 400 on param max_tokens."""
    node = gateway(gateway_factory, llama.url)
    reached_before = llama.chat_posts()

    status, _, raw = node.call(
        "POST", "/v1/chat/completions", chat_body("hi", max_tokens=CONTEXT), token=node.token()
    )

    assert status == 400, raw
    error = error_of(raw)
    assert error["param"] == "max_tokens"
    assert error["code"] == "context_length_exceeded"
    assert str(CONTEXT) in error["message"]
    record = chat_records(node)[-1]
    assert (record["status"], record["refusal"], record["replica"]) == (
        400,
        "context_length_exceeded",
        None,
    )
    time.sleep(0.5)  # an access-log line, had the request gone out, would be written by now
    assert llama.chat_posts() == reached_before


def test_the_engines_400_is_audited_with_its_error_code(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """A refusal's record carries its code, the engine's own refusals included."""
    node = gateway(gateway_factory, llama.url)

    status, _, _ = node.call(
        "POST",
        "/v1/chat/completions",
        chat_body("lighthouse " * 1500, max_tokens=8),
        token=node.token(),
    )

    assert status == 400
    record = chat_records(node)[-1]
    assert (record["status"], record["refusal"]) == (400, "context_length_exceeded")


# -- admission: slots, queue, 429 ---------------------------------------------------


def concurrently(node: RunningGateway, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `count` chats at the same instant from threads; give their answers."""
    token = node.token()
    barrier = threading.Barrier(count)
    answers: list[tuple[int, dict[str, str], bytes]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        barrier.wait()
        answer = node.call(
            "POST",
            "/v1/chat/completions",
            chat_body(f"request {index}"),
            token=token,
            timeout=GENERATION_TIMEOUT_S,
        )
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GENERATION_TIMEOUT_S)
    assert len(answers) == count
    return answers


def test_a_full_queue_is_429_queue_full_with_retry_after(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """One slot, one queue place, three at once: one runs, one waits, one is refused at once."""
    with fixed_upstream(tmp_path / "slow.log", latency_ms=1500) as slow:
        node = gateway(
            gateway_factory, slow, serving="{concurrency: 1, queue: 1, queue_timeout: 10s}"
        )
        answers = concurrently(node, 3)

    refused = [a for a in answers if a[0] == 429]
    served = [a for a in answers if a[0] == 200]
    assert len(refused) == 1, [a[0] for a in answers]
    assert len(served) == 2, [a[0] for a in answers]
    _, headers, raw = refused[0]
    retry_after = header(headers, "retry-after")
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    error = error_of(raw)
    assert error["code"] == "queue_full"
    assert error["type"] == "rate_limit_error"
    outcomes = sorted(
        (r["status"], r["refusal"]) for r in chat_records(node) if r["phase"] == "complete"
    )
    assert outcomes == [(200, None), (200, None), (429, "queue_full")]
    assert (
        metric(node, "sovereign_gateway_backend_rejected_total", model=MODEL, reason="queue_full")
        == 1
    )


def test_a_request_waiting_past_queue_timeout_is_429_queue_timeout(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """The slot is held for 3 s; the waiting request gives up after its 1 s queue_timeout."""
    with fixed_upstream(tmp_path / "slow.log", latency_ms=3000) as slow:
        node = gateway(
            gateway_factory, slow, serving="{concurrency: 1, queue: 1, queue_timeout: 1s}"
        )
        answers = concurrently(node, 2)

    assert sorted(a[0] for a in answers) == [200, 429]
    _, headers, raw = next(a for a in answers if a[0] == 429)
    assert error_of(raw)["code"] == "queue_timeout"
    assert int(header(headers, "retry-after")) >= 1
    outcomes = sorted(
        (r["status"], r["refusal"]) for r in chat_records(node) if r["phase"] == "complete"
    )
    assert outcomes == [(200, None), (429, "queue_timeout")]
    assert (
        metric(
            node, "sovereign_gateway_backend_rejected_total", model=MODEL, reason="queue_timeout"
        )
        == 1
    )


# -- the client walking away ----------------------------------------------------------


def open_stream(
    node: RunningGateway, token: str, body: dict[str, Any]
) -> tuple[socket.socket, str]:
    """POST a streaming chat on a raw socket and read up to the first event with content.

    Gives the open socket and the request id.
    """
    host, port = node.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=GENERATION_TIMEOUT_S)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + f"host: {host}:{port}\r\nauthorization: Bearer {token}\r\n".encode()
        + f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    received = b""
    while not re.search(rb'"content": ?"[^"]', received):
        piece = sock.recv(65536)
        assert piece, received
        received += piece
    head = received.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200"), head
    request_id = re.search(rb"^x-request-id: (\w+)", head, re.IGNORECASE | re.MULTILINE)
    assert request_id is not None, head
    return sock, request_id[1].decode()


def test_a_client_closing_a_stream_stops_the_engine_and_frees_the_slot(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """Close the socket after the first content: llama.cpp is told, the next request runs."""
    node = gateway(gateway_factory, llama.url)
    token = node.token()
    disconnects = llama.disconnects()

    sock, _ = open_stream(
        node,
        token,
        chat_body("Tell me a long story about a lighthouse.", stream=True, max_tokens=200),
    )
    sock.close()

    # The gateway aborted its upstream connection, which is what stops llama.cpp generating.
    wait_for("the engine seeing the disconnect", lambda: llama.disconnects() > disconnects, 30)
    wait_for("the slot given back", lambda: health(node)["in_flight"] == 0, 10)
    status, _, raw = node.call(
        "POST",
        "/v1/chat/completions",
        chat_body("Say yes."),
        token=token,
        timeout=GENERATION_TIMEOUT_S,
    )
    assert status == 200, raw
    assert json.loads(raw)["choices"][0]["message"]["content"].strip()
    assert health(node)["in_flight"] == 0


def test_a_client_closing_a_stream_is_audited_stream_cancelled(
    gateway_factory: GatewayFactory, llama: LlamaServer
) -> None:
    """The stream's closing record, stream_cancelled, with the tokens it was sent."""
    node = gateway(gateway_factory, llama.url)
    disconnects = llama.disconnects()

    sock, request_id = open_stream(
        node,
        node.token(),
        chat_body("Tell me a long story about a lighthouse.", stream=True, max_tokens=200),
    )
    sock.close()
    wait_for("the engine seeing the disconnect", lambda: llama.disconnects() > disconnects, 30)
    time.sleep(1)

    phases = [r["phase"] for r in records_of(node, request_id)]
    assert phases == ["admitted", "stream_start", "stream_cancelled"]
    cancelled = records_of(node, request_id)[-1]
    assert (cancelled["status"], cancelled["replica"]) == (200, llama.url)
    assert cancelled["usage"]["completion_tokens"] >= 1


LINGER_S = 2.0


class LingeringUpstream(BaseHTTPRequestHandler):
    """An engine that sends one chunk and [DONE], then holds the connection LINGER_S before
    closing it (llama.cpp's server and others close a moment after [DONE], not at once)."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {
            "id": "chatcmpl-linger",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": "hello"}, "finish_reason": "stop"}],
        }
        self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        time.sleep(LINGER_S)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def lingering() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), LingeringUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_an_sdk_stream_read_to_done_always_gets_its_closing_record(
    gateway_factory: GatewayFactory, lingering: str
) -> None:
    """The openai SDK stops reading at [DONE] and closes; the stream must still be audited."""
    node = gateway(gateway_factory, lingering)
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token(), max_retries=0)

    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    request_id = streamed.response.headers["x-request-id"]
    time.sleep(LINGER_S + 1)

    assert pieces == ["hello"]
    phases = [r["phase"] for r in records_of(node, request_id)]
    assert phases[:2] == ["admitted", "stream_start"]
    # Everything up to [DONE] reached the client, so the stream ended, whoever closed first.
    assert phases[2:] == ["stream_end"], phases
    assert records_of(node, request_id)[-1]["usage"]["completion_tokens"] == 1
