"""The embedded llama.cpp engine behind the gateway: SmolLM2 answering real requests.

Every test runs the real gateway with its worker process loading the real GGUF file; the
clients are the unmodified `openai` SDK, LangChain's `ChatOpenAI`, and raw HTTP.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI

from sovereign import tools
from tests.integration.conftest import GatewayFactory, RunningGateway, http

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SHA256 = tools.SMOLLM2_GGUF_SHA256
QUESTION = "Which city is the capital of France?"
# Greedy decoding keeps SmolLM2 going on this one for well over a thousand tokens.
STORY = "Write a long story about a dragon."


def embedded_model(
    *, context_length: int = 2048, serving: str = "", sha256: str = SHA256, name: str = MODEL
) -> str:
    return f"""
  - name: {name}
    aliases: [default]
    engine: llamacpp
    source: pkg:smollm2/{tools.SMOLLM2_GGUF}
    sha256: {sha256}
    quantization: int4
    context_length: {context_length}
    allowed_roles: [admin, user]
{serving}"""


def embedded(gateway_factory: GatewayFactory, **options: Any) -> RunningGateway:
    """A gateway whose embedded worker has loaded the model."""
    serving = options.pop("serving", "")
    context_length = options.pop("context_length", 2048)
    node = gateway_factory(
        models=embedded_model(context_length=context_length, serving=serving), **options
    )
    wait_for_worker(node, "ready")
    return node


@pytest.fixture
def node(gateway_factory: GatewayFactory) -> RunningGateway:
    return embedded(gateway_factory)


def client(node: RunningGateway, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=node.token(), **options)


def chat_records(node: RunningGateway) -> list[dict[str, Any]]:
    return [r for r in node.records() if r.get("action") == "chat"]


def worker(node: RunningGateway) -> dict[str, Any]:
    health = json.loads(node.call("GET", "/health")[2])
    replica: dict[str, Any] = health["models"][MODEL]["replicas"][0]
    return replica


def wait_for_worker(node: RunningGateway, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = worker(node)
        if found["state"] == state:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"worker did not become {state}: {found}")
        time.sleep(0.1)


def wait_for_restart(node: RunningGateway, old_pid: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = worker(node)
        if found["state"] == "ready" and found["pid"] != old_pid:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"worker {old_pid} was not replaced: {found}")
        time.sleep(0.1)


def wait_for_record(
    node: RunningGateway, key: str, value: str, timeout: float = 10
) -> list[dict[str, Any]]:
    """The chat records once one has `key` == `value`: a stream's last record follows its
    last byte, a cancelled request's follows the disconnect."""
    deadline = time.monotonic() + timeout
    while not any(r[key] == value for r in chat_records(node)):
        if time.monotonic() > deadline:
            pytest.fail(f"no record with {key} {value} in {chat_records(node)}")
        time.sleep(0.05)
    return chat_records(node)


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


def test_the_openai_sdk_gets_a_real_answer_with_usage_and_no_plaintext_in_the_audit(
    node: RunningGateway,
) -> None:
    answer = client(node).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=24,
    )

    text = answer.choices[0].message.content or ""
    assert "Paris" in text
    assert answer.model == MODEL
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 5
    assert 0 < answer.usage.completion_tokens <= 24
    final = chat_records(node)[-1]
    assert final["phase"] == "complete"
    assert final["status"] == 200
    assert final["replica"] == "worker-0"
    assert final["usage"] == {
        "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens,
        "total_tokens": answer.usage.total_tokens,
        "source": "engine",
    }
    audit = b"".join(p.read_bytes() for p in node.audit_dir.iterdir() if p.is_file())
    assert QUESTION.encode() not in audit
    assert text.strip().encode() not in audit


def test_content_capture_puts_the_prompt_and_answer_in_the_audit(
    gateway_factory: GatewayFactory,
) -> None:
    node = embedded(gateway_factory, capture_content=True)
    answer = client(node).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, seed=1
    )

    final = chat_records(node)[-1]
    assert final["content"]["request"] == [QUESTION]
    assert answer.choices[0].message.content in final["content"]["response"]


def test_a_stream_arrives_chunk_by_chunk(node: RunningGateway) -> None:
    """Chunks are forwarded as the worker makes them, not gathered and sent at the end."""
    started = time.monotonic()
    stream = client(node).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short story about a lighthouse."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            pieces.append(chunk.choices[0].delta.content)

    assert len(pieces) >= 20
    assert usage is not None
    assert usage.completion_tokens == 64
    span = arrivals[-1] - arrivals[0]
    # Generating 64 tokens takes hundreds of milliseconds here; chunks that arrive one by
    # one spread over that time, a buffered answer arrives within a few milliseconds.
    assert span > 0.2
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert sum(1 for gap in gaps if gap > 0.002) >= len(gaps) // 2
    records = wait_for_record(node, "phase", "stream_end")
    assert [r["phase"] for r in records] == ["admitted", "stream_start", "stream_end"]
    assert records[-1]["usage"]["completion_tokens"] == 64


def test_raw_stream_framing_and_usage_only_on_request(node: RunningGateway) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "stream": True,
    }
    status, headers, raw = node.call("POST", "/v1/chat/completions", body, token=node.token())

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all("usage" not in chunk for chunk in chunks)


def test_langchain_chat_openai_works_unmodified(node: RunningGateway) -> None:
    llm = ChatOpenAI(
        model="default",
        base_url=f"{node.url}/v1",
        api_key=node.token(),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=16,  # type: ignore[call-arg]
    )

    reply = llm.invoke(QUESTION)
    streamed = "".join(str(chunk.content) for chunk in llm.stream(QUESTION))

    assert "Paris" in str(reply.content)
    assert streamed == reply.content
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] > 0


def test_sampling_parameters_are_honoured(node: RunningGateway) -> None:
    sdk = client(node)

    def ask(**options: Any) -> tuple[str, str, int]:
        answer = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "List five animals."}],
            **options,
        )
        assert answer.usage is not None
        return (
            answer.choices[0].message.content or "",
            answer.choices[0].finish_reason,
            answer.usage.completion_tokens,
        )

    greedy, _, _ = ask(temperature=0, max_tokens=32)
    assert ask(temperature=0, max_tokens=32)[0] == greedy
    seeded = ask(temperature=1.0, top_p=0.9, seed=7, max_tokens=32)
    assert ask(temperature=1.0, top_p=0.9, seed=7, max_tokens=32) == seeded
    others = {ask(temperature=1.5, seed=seed, max_tokens=32)[0] for seed in (1, 2, 3)}
    assert len(others) > 1

    text, finish, tokens = ask(temperature=0, max_tokens=5)
    assert (finish, tokens) == ("length", 5)
    assert greedy.startswith(text)

    words = greedy.split()
    stop = words[len(words) // 2]
    text, finish, _ = ask(temperature=0, max_tokens=32, stop=[stop])
    assert finish == "stop"
    assert stop not in text
    assert greedy.startswith(text)


def test_unseeded_sampling_differs_after_a_restart(node: RunningGateway) -> None:
    """Without a seed llama-cpp-python would replay the same seeds in every new worker."""

    def first_answer() -> str:
        pid = wait_for_worker(node, "ready")["pid"]
        status, body = node.chat(
            "Tell me a story.", node.token(), model=MODEL, temperature=1.5, max_tokens=24
        )
        assert status == 200, body
        os.kill(pid, signal.SIGKILL)
        wait_for_restart(node, pid)
        return str(body["choices"][0]["message"]["content"])

    assert first_answer() != first_answer()


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop.0"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"max_tokens": 2048}, "max_tokens"),
    ],
)
def test_invalid_sampling_is_400_naming_the_parameter_and_audited(
    node: RunningGateway, options: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **options}
    status, _, raw = node.call("POST", "/v1/chat/completions", body, token=node.token())

    error = error_of(raw)
    assert status == 400, error
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    record = chat_records(node)[-1]
    assert (record["status"], record["refusal"]) == (400, error["code"])


def test_a_prompt_over_the_context_window_is_400_naming_the_limit(
    gateway_factory: GatewayFactory,
) -> None:
    node = embedded(gateway_factory, context_length=512)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 80
    status, body = node.chat(long_prompt, node.token(), model=MODEL)

    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert "512 tokens" in body["error"]["message"]
    assert body["error"]["param"] == "messages"
    record = chat_records(node)[-1]
    assert (record["status"], record["refusal"]) == (400, "context_length_exceeded")

    status, body = node.chat("hello " * 200, node.token(), model=MODEL, max_tokens=400)
    assert status == 400
    assert body["error"]["param"] == "max_tokens"
    assert "512" in body["error"]["message"]

    streamed = node.call(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": long_prompt}], "stream": True},
        token=node.token(),
    )
    assert streamed[0] == 400
    assert error_of(streamed[2])["code"] == "context_length_exceeded"


def test_an_unknown_model_is_404_and_audited(node: RunningGateway) -> None:
    status, body = node.chat("hi", node.token(), model="gpt-5")

    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    assert chat_records(node)[-1]["status"] == 404


def test_a_killed_worker_fails_its_request_cleanly_and_is_restarted(
    node: RunningGateway,
) -> None:
    before = worker(node)
    outcome: dict[str, Any] = {}

    def long_request() -> None:
        outcome["status"], _, outcome["body"] = node.call(
            "POST",
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": STORY}],
                "max_tokens": 1500,
                "temperature": 0,
            },
            token=node.token(),
            timeout=120,
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    _wait_until_busy(node)
    os.kill(before["pid"], signal.SIGKILL)
    thread.join(60)

    assert outcome["status"] == 502
    error = error_of(outcome["body"])
    assert error["code"] == "engine_crashed"
    assert error["type"] == "upstream_error"
    assert chat_records(node)[-1]["status"] == 502
    after = wait_for_restart(node, before["pid"])
    assert after["pid"] != before["pid"]
    assert after["restarts"] == 1
    status, body = node.chat(QUESTION, node.token(), model=MODEL, max_tokens=8)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    assert node.process.poll() is None


def test_a_hung_worker_is_killed_after_the_timeout_and_restarted(
    gateway_factory: GatewayFactory,
) -> None:
    node = embedded(gateway_factory, serving="    serving:\n      timeout: 3s\n")
    stuck = worker(node)
    os.kill(stuck["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body = node.chat(QUESTION, node.token(), model=MODEL, max_tokens=8)
        waited = time.monotonic() - started
    finally:
        # The gateway may have killed and reaped it already, which is what is tested.
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck["pid"], signal.SIGCONT)

    assert status == 504
    assert body["error"]["code"] == "engine_timeout"
    assert waited < 30
    wait_for_restart(node, stuck["pid"])
    assert node.chat(QUESTION, node.token(), model=MODEL, max_tokens=8)[0] == 200


def test_a_full_queue_is_429_with_retry_after(gateway_factory: GatewayFactory) -> None:
    node = embedded(gateway_factory, serving="    serving:\n      queue: 0\n")
    long_story = {
        "model": MODEL,
        "messages": [{"role": "user", "content": STORY}],
        "max_tokens": 100,
        "temperature": 0,
    }
    busy = threading.Thread(
        target=node.call,
        args=("POST", "/v1/chat/completions", long_story),
        kwargs={"token": node.token(), "timeout": 120},
    )
    busy.start()
    _wait_until_busy(node)
    status, headers, raw = node.call(
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        token=node.token(),
    )
    busy.join(120)

    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert error_of(raw)["code"] == "queue_full"
    assert error_of(raw)["type"] == "rate_limit_error"
    refusals = [r["refusal"] for r in chat_records(node) if r["status"] == 429]
    assert refusals == ["queue_full"]


def test_a_client_that_disconnects_cancels_its_generation(node: RunningGateway) -> None:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": STORY}],
            "max_tokens": 1500,
            "temperature": 0,
        }
    ).encode()
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {node.token()}\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body)
        _wait_until_busy(node)
    records = wait_for_record(node, "refusal", "client_disconnected")
    # 1500 tokens take well over 10 s here; a cancelled generation frees the worker at once.
    started = time.monotonic()
    status, _ = node.chat(QUESTION, node.token(), model=MODEL, max_tokens=4)
    assert status == 200
    assert time.monotonic() - started < 8
    assert [r["status"] for r in records if r["refusal"] == "client_disconnected"] == [499]


def test_a_stream_whose_client_leaves_stops_generating(node: RunningGateway) -> None:
    sdk = client(node)
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": STORY}],
        max_tokens=1500,
        temperature=0,
        stream=True,
    )
    received = [chunk for _, chunk in zip(range(5), stream, strict=False)]
    stream.close()

    records = wait_for_record(node, "phase", "stream_cancelled")
    started = time.monotonic()
    status, _ = node.chat(QUESTION, node.token(), model=MODEL, max_tokens=4)
    assert status == 200
    assert time.monotonic() - started < 8
    assert len(received) == 5
    assert [r["phase"] for r in records][-1] == "stream_cancelled"
    assert records[-1]["response_digest"] is not None


def test_weights_with_the_wrong_digest_are_refused_and_named(
    gateway_factory: GatewayFactory,
) -> None:
    node = gateway_factory(models=embedded_model(sha256="f" * 64))
    wait_for_worker(node, "refused")
    status, _, raw = http("GET", f"{node.url}/health")

    health = json.loads(raw)
    detail = health["models"][MODEL]["replicas"][0]["detail"]
    assert status == 503
    assert "sha256 mismatch" in detail
    assert SHA256 in detail
    assert health["components"]["runtime"]["ready"] is False
    status, body = node.chat(QUESTION, node.token(), model=MODEL)
    assert status == 503
    assert body["error"]["code"] == "model_unavailable"
    assert MODEL in body["error"]["message"]
    assert "sha256 mismatch" in body["error"]["message"]
    time.sleep(1)
    assert worker(node)["restarts"] == 0


def _wait_until_busy(node: RunningGateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(node.call("GET", "/health")[2])["models"][MODEL]["in_flight"] == 0:
        if time.monotonic() > deadline:
            pytest.fail("the request never reached the worker")
        time.sleep(0.05)
    time.sleep(0.3)  # past prompt evaluation, into generation


def test_llama_cpp_is_the_portable_build() -> None:
    """uv builds llama-cpp-python with GGML_NATIVE=OFF (pyproject's extra-build-variables).

    The native build turns on AMX where the build machine has it, and segfaults on the first
    generation on these CPUs; the portable one stops at AVX2.
    """
    # In a child: importing llama_cpp here would leave its /dev/null handles to pytest.
    features = subprocess.run(
        [sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "AVX2 = 1" in features
    assert "AMX" not in features
    assert "AVX512" not in features
