"""The router's admission, queueing and failover rules, and SSE framing.

The replicas here are small in-process engines that answer after a given delay, so the
slot and queue arithmetic can be driven exactly; the same router against real llama.cpp
servers is covered in tests/integration/test_runtime_upstream.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.errors import ApiError
from sovereign_gateway.metrics import Metrics
from sovereign_gateway.runtime import sse
from sovereign_gateway.runtime.base import (
    Completion,
    EventStream,
    InferenceRequest,
    Replica,
    ReplicaDown,
    ReplicaState,
    Usage,
)
from sovereign_gateway.runtime.embedded import unsupported_parameter, worker_params
from sovereign_gateway.runtime.router import ModelBackend
from sovereign_gateway.runtime.upstream import UpstreamReplica
from sovereign_gateway.runtime.worker import release_safe_text


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def route(**overrides: object) -> ModelRoute:
    fields: dict[str, object] = {
        "name": "m",
        "aliases": [],
        "engine": "upstream",
        "source": "http://127.0.0.1:9/v1",
        "sha256": None,
        "quantization": "none",
        "context_length": 2048,
        "allowed_roles": ["user"],
        "replicas": ["http://127.0.0.1:9/v1"],
        "weights": None,
        "concurrency": 1,
        "queue": 1,
        "queue_timeout_seconds": 5.0,
        "timeout_seconds": 30.0,
        "workers": 1,
        "threads": None,
    }
    fields.update(overrides)
    return ModelRoute.model_validate(fields)


class TimedReplica(Replica):
    """Answers every request after `delay` seconds, or refuses it while `down`."""

    def __init__(self, label: str, delay: float = 0.0, down: bool = False) -> None:
        self.label = label
        self.delay = delay
        self.down = down
        self.served: list[str] = []
        self.running = 0
        self.most_running = 0

    def state(self) -> tuple[ReplicaState, str]:
        return ("down", "stopped") if self.down else ("ready", "ok")

    async def complete(self, request: InferenceRequest) -> Completion:
        if self.down:
            raise ReplicaDown(f"{self.label}: connection refused")
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        self.served.append(request.request_id)
        return Completion(200, b"{}", "application/json", Usage(3, 4))

    async def stream(self, request: InferenceRequest) -> EventStream:
        if self.down:
            raise ReplicaDown(f"{self.label}: connection refused")
        return _Events([sse.event({"n": 1}), sse.DONE])


class _Events(EventStream):
    def __init__(self, events: list[bytes]) -> None:
        self._events = events
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event

    async def aclose(self) -> None:
        self.closed = True


def request(n: int = 0, model: ModelRoute | None = None) -> InferenceRequest:
    return InferenceRequest.chat(f"r{n}", model or route(), {"messages": []}, False)


@pytest.mark.anyio
async def test_requests_beyond_the_slots_wait_in_the_queue_and_all_complete() -> None:
    replica = TimedReplica("a", delay=0.05)
    backend = ModelBackend(route(concurrency=2, queue=4), [replica], Metrics())

    results = await asyncio.gather(*(backend.complete(request(n)) for n in range(6)))

    assert [completion.status for completion, _ in results] == [200] * 6
    assert replica.most_running == 2
    assert backend.in_flight == {"a": 0}
    assert backend.waiting == 0


@pytest.mark.anyio
async def test_a_full_queue_is_429_with_retry_after() -> None:
    backend = ModelBackend(route(concurrency=1, queue=1), [TimedReplica("a", 0.2)], Metrics())

    outcomes = await asyncio.gather(
        *(backend.complete(request(n)) for n in range(3)), return_exceptions=True
    )

    refused = [o for o in outcomes if isinstance(o, ApiError)]
    assert len(refused) == 1
    assert refused[0].status == 429
    assert refused[0].code == "queue_full"
    assert int(refused[0].headers["Retry-After"]) >= 1


@pytest.mark.anyio
async def test_a_waiter_cancelled_as_its_slot_frees_does_not_take_the_slot() -> None:
    """A client that leaves while queued must not be served.

    The cancel lands at every point of the wake-up in turn; wherever the router accepted it,
    the waiter ends cancelled and the freed slot stays free.
    """
    for steps in range(12):
        backend = ModelBackend(route(concurrency=1, queue=1), [TimedReplica("a")], Metrics())
        held = await backend.acquire(set(), [])
        waiter = asyncio.ensure_future(backend.acquire(set(), []))
        while backend.waiting == 0:
            await asyncio.sleep(0)
        backend.release(held, None)
        for _ in range(steps):
            await asyncio.sleep(0)
        accepted = waiter.cancel()
        outcome = await asyncio.gather(waiter, return_exceptions=True)

        if accepted:
            assert isinstance(outcome[0], asyncio.CancelledError), f"after {steps} steps"
            assert backend.in_flight == {"a": 0}
        else:
            assert backend.in_flight == {"a": 1}
        assert backend.waiting == 0


@pytest.mark.anyio
async def test_waiting_past_the_queue_timeout_is_429() -> None:
    model = route(concurrency=1, queue=5, queue_timeout_seconds=0.05)
    backend = ModelBackend(model, [TimedReplica("a", 0.3)], Metrics())

    outcomes = await asyncio.gather(
        backend.complete(request(1)), backend.complete(request(2)), return_exceptions=True
    )

    assert isinstance(outcomes[1], ApiError)
    assert (outcomes[1].status, outcomes[1].code) == (429, "queue_timeout")
    assert backend.waiting == 0


@pytest.mark.anyio
async def test_a_down_replica_is_skipped_and_the_next_one_serves() -> None:
    dead, live = TimedReplica("dead", down=True), TimedReplica("live")
    backend = ModelBackend(route(), [dead, live], Metrics())
    dead.down = False  # looks ready until it refuses

    original = dead.complete

    async def refuse(req: InferenceRequest) -> Completion:
        dead.down = True
        return await original(req)

    dead.complete = refuse  # type: ignore[method-assign]
    completion, label = await backend.complete(request())

    assert (completion.status, label) == (200, "live")
    assert backend.in_flight == {"dead": 0, "live": 0}


@pytest.mark.anyio
async def test_every_replica_failing_is_502_and_none_left_is_503() -> None:
    replicas = [TimedReplica("a"), TimedReplica("b")]
    backend = ModelBackend(route(), replicas, Metrics())

    async def refuse(replica: TimedReplica, req: InferenceRequest) -> Completion:
        replica.down = True
        raise ReplicaDown(f"{replica.label}: connection refused")

    for replica in replicas:
        replica.complete = lambda req, r=replica: refuse(r, req)  # type: ignore[method-assign]

    with pytest.raises(ApiError) as failed:
        await backend.complete(request())
    assert (failed.value.status, failed.value.code) == (502, "upstream_unreachable")
    assert "a: connection refused" in failed.value.message
    assert "b: connection refused" in failed.value.message

    with pytest.raises(ApiError) as unavailable:
        await backend.complete(request())
    assert (unavailable.value.status, unavailable.value.code) == (503, "backend_unavailable")


@pytest.mark.anyio
async def test_a_stream_holds_its_slot_until_it_is_closed() -> None:
    backend = ModelBackend(route(concurrency=1, queue=0), [TimedReplica("a")], Metrics())

    stream, _ = await backend.stream(request(1))
    with pytest.raises(ApiError) as busy:
        await backend.complete(request(2))
    events = [event async for event in stream.events()]
    await stream.aclose()
    await stream.aclose()  # closing twice gives the slot back once

    assert busy.value.status == 429
    assert events[-1] == sse.DONE
    assert backend.in_flight == {"a": 0}
    assert (await backend.complete(request(3)))[0].status == 200


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    backend = ModelBackend(route(concurrency=1, queue=2), [TimedReplica("a", 0.2)], Metrics())
    first = asyncio.create_task(backend.complete(request(1)))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(backend.complete(request(2)))
    await asyncio.sleep(0.01)
    assert backend.waiting == 1

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await first

    assert backend.waiting == 0
    assert backend.in_flight == {"a": 0}


def test_events_are_released_whole_however_tcp_cuts_them() -> None:
    splitter = sse.EventSplitter()
    stream = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n'
    events = [event for i in range(len(stream)) for event in splitter.feed(stream[i : i + 1])]

    assert events == [
        b'data: {"a":1}\n\n',
        b'data: {"b":2}\r\n\r\n',
        b": keep-alive\n\n",
        b"data: [DONE]\n\n",
    ]
    assert [sse.data_of(e) for e in events] == ['{"a":1}', '{"b":2}', None, "[DONE]"]
    assert splitter.leftover == b""


def test_error_events_have_the_openai_shape() -> None:
    event = sse.error_event("the engine died", "engine_crashed")
    payload = json.loads(sse.data_of(event) or "")
    assert payload == {
        "error": {
            "message": "the engine died",
            "type": "server_error",
            "param": None,
            "code": "engine_crashed",
        }
    }


@pytest.mark.parametrize(
    ("pending", "stops", "safe"),
    [
        ("Hello wor", ["world"], 6),  # "wor" may start "world"
        ("Hello", ["world"], 5),
        ("abc", [], 3),
        ("end.\n", ["\n\n", "."], 4),
        ("ab xy", ["xyz", "yq"], 3),
    ],
)
def test_text_that_may_start_a_stop_sequence_is_held_back(
    pending: str, stops: list[str], safe: int
) -> None:
    assert release_safe_text(pending, stops) == safe


def test_the_embedded_engine_refuses_what_it_cannot_honour() -> None:
    assert unsupported_parameter({"model": "m", "messages": [], "temperature": 0.2}) is None
    assert unsupported_parameter({"messages": [], "tools": [{"type": "function"}]}) == "tools"
    assert unsupported_parameter({"messages": [], "tools": []}) is None
    assert unsupported_parameter({"messages": [], "n": 2}) == "n"
    assert unsupported_parameter({"messages": [], "logprobs": True}) == "logprobs"


def test_worker_params_flatten_text_parts_and_prefer_max_completion_tokens() -> None:
    params = worker_params(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_tokens": 10,
            "max_completion_tokens": 5,
            "seed": 3,
            "user": "ignored",
        }
    )
    assert params == {"messages": [{"role": "user", "content": "ab"}], "max_tokens": 5, "seed": 3}


@pytest.mark.anyio
async def test_a_busy_replica_is_not_probed_and_an_idle_dead_one_is_marked_down() -> None:
    """A one-request server answers a probe only after its generation, or aborts it."""
    async with aiohttp.ClientSession() as session:
        replica = UpstreamReplica(f"http://127.0.0.1:{_closed_port()}/v1", lambda: session)

        await replica.probe(busy=True)
        assert replica.state()[0] == "ready"
        await replica.probe(busy=False)
        assert replica.state()[0] == "down"
        await replica.probe(busy=True)  # a down replica is probed even with requests on it
        assert "ClientConnectorError" in replica.state()[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.anyio
async def test_a_slow_replica_stays_in_until_it_is_silent_for_three_probes() -> None:
    """A server busy with another client answers /models late; that alone is not down."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepts connections, never answers
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.getsockname()[1]}/v1"
            replica = UpstreamReplica(url, lambda: session)
            states = []
            for _ in range(3):
                await replica.probe()
                states.append(replica.state()[0])
    finally:
        server.close()

    assert states == ["ready", "ready", "down"]
    assert replica.state()[1] == "no answer on /models in 3 probe(s)"
