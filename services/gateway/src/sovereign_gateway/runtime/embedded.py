"""The embedded llama.cpp engine: a supervised worker process per replica.

Takes a model route with its weights file; gives a `Replica` that answers in OpenAI's
shapes. The model runs in `runtime.worker`, so a crash or a hang there costs one request,
not the gateway: a dead worker fails its request with a 502 and is started again, a silent
one is killed after the route's timeout. A weights file whose sha256 does not match is
refused and never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.errors import ApiError
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

log = logging.getLogger("sovereign_gateway.runtime")

LOAD_TIMEOUT_S = 300.0
RESTART_BACKOFF_S = (0.2, 10.0)
STABLE_AFTER_S = 60.0
# Parameters the embedded engine honours; any other one with a real value is refused (400)
# rather than silently ignored.
SUPPORTED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "n",
        "user",
        "frequency_penalty",
        "presence_penalty",
        "repeat_penalty",
    }
)


class WorkerDied(Exception):
    pass


def unsupported_parameter(payload: dict[str, Any]) -> str | None:
    """The first parameter the embedded engine cannot honour, if any."""
    for name, value in payload.items():
        if name not in SUPPORTED and value not in (None, False, [], {}):
            return name
    if payload.get("n", 1) != 1:
        return "n"
    return None


def worker_params(payload: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for message in payload["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        messages.append({"role": message["role"], "content": content or ""})
    params: dict[str, Any] = {"messages": messages}
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in (
        "temperature",
        "top_p",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "repeat_penalty",
    ):
        if payload.get(name) is not None:
            params[name] = payload[name]
    return params


class EmbeddedWorker(Replica):
    def __init__(
        self,
        route: ModelRoute,
        index: int,
        threads: int,
        on_change: Callable[[], None],
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        if route.weights is None:
            raise ValueError(f"model {route.name} has no weights file for the embedded engine")
        self.route = route
        self.label = f"worker-{index}"
        self.threads = threads
        self.restarts = 0
        self.pid: int | None = None
        self._on_change = on_change
        self._on_restart = on_restart
        self._state: ReplicaState = "starting"
        self._detail = "not started"
        self._process: asyncio.subprocess.Process | None = None
        self._pending: dict[str, asyncio.Queue[dict[str, Any] | WorkerDied]] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    def state(self) -> tuple[ReplicaState, str]:
        return self._state, self._detail

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pid": self.pid, "restarts": self.restarts}

    def _set(self, state: ReplicaState, detail: str) -> None:
        self._state, self._detail = state, detail
        self._on_change()

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.label}-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._terminate()

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    def kill(self) -> None:
        """Kill a stuck worker; the supervisor starts a new one."""
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGKILL)

    async def _supervise(self) -> None:
        backoff = RESTART_BACKOFF_S[0]
        while not self._stopping:
            started = time.monotonic()
            refused = await self._run_once()
            self._fail_pending()
            if refused or self._stopping:
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_S[0]
            code = None if self._process is None else self._process.returncode
            self._set("down", f"worker exited ({code}); restarting in {backoff:.1f} s")
            log.error("%s %s: worker exited with %s; restarting", self.route.name, self.label, code)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            self.restarts += 1
            self._on_restart()

    async def _run_once(self) -> bool:
        """Run one worker until it exits; True when it refused the model."""
        route = self.route
        command = [
            sys.executable,
            "-m",
            "sovereign_gateway.runtime.worker",
            "--weights",
            str(route.weights),
            "--n-ctx",
            str(route.context_length),
            "--threads",
            str(self.threads),
        ]
        if route.sha256 is not None:
            command += ["--sha256", route.sha256]
        self._set("starting", "verifying and loading the weights")
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 20,
        )
        self.pid = self._process.pid
        stdout = self._process.stdout
        if stdout is None:
            raise RuntimeError("the worker was started without a stdout pipe")
        refused = False
        try:
            ready = await asyncio.wait_for(stdout.readline(), LOAD_TIMEOUT_S)
        except TimeoutError:
            self._process.kill()
            ready = b""
        hello = _parse(ready)
        if hello.get("event") == "refused":
            refused = True
            reason = str(hello.get("reason"))
            log.error("model %s refused: %s", route.name, reason)
            self._set("refused", reason)
        elif hello.get("event") == "ready":
            self._set("ready", f"pid {self.pid}, {route.context_length} tokens of context")
            async for line in stdout:
                event = _parse(line)
                queue = self._pending.get(str(event.get("id")))
                if queue is not None:
                    queue.put_nowait(event)
        await self._process.wait()
        if not refused and self._state != "refused":
            self._set("down", f"worker exited ({self._process.returncode})")
        return refused

    def _fail_pending(self) -> None:
        for queue in self._pending.values():
            queue.put_nowait(WorkerDied())

    async def _events(self, request: InferenceRequest) -> AsyncGenerator[dict[str, Any], None]:
        """The worker's events for one request, ending with `done`; raises ApiError on failure."""
        process = self._process
        if self._state != "ready" or process is None or process.stdin is None:
            raise ReplicaDown(f"{self.label}: {self._detail}")
        queue: asyncio.Queue[dict[str, Any] | WorkerDied] = asyncio.Queue()
        self._pending[request.request_id] = queue
        finished = False
        try:
            message = {"op": "generate", "id": request.request_id, **worker_params(request.payload)}
            try:
                process.stdin.write(json.dumps(message).encode() + b"\n")
                await process.stdin.drain()
            except (ConnectionError, RuntimeError):
                raise ReplicaDown(f"{self.label}: its stdin is closed") from None
            timeout = request.route.timeout_seconds
            while True:
                try:
                    # Not wait_for: on 3.11 it drops a cancellation that arrives with a token,
                    # and the generation of a client that left would run on.
                    async with asyncio.timeout(timeout):
                        event = await queue.get()
                except TimeoutError:
                    log.error(
                        "%s %s: no progress in %s s; killing it",
                        self.route.name,
                        self.label,
                        timeout,
                    )
                    self.kill()
                    raise ApiError(
                        504,
                        f"the embedded engine made no progress in {timeout:.0f} s; its worker "
                        "was restarted",
                        "engine_timeout",
                    ) from None
                if isinstance(event, WorkerDied):
                    raise ApiError(
                        502,
                        "the embedded engine's worker died while serving this request; it is "
                        "being restarted",
                        "engine_crashed",
                    )
                if event.get("event") == "error":
                    finished = True
                    raise ApiError(
                        int(event.get("status", 500)),
                        str(event.get("message")),
                        str(event.get("code")),
                        param=event.get("param"),
                    )
                yield event
                if event.get("event") == "done":
                    finished = True
                    return
        finally:
            self._pending.pop(request.request_id, None)
            if not finished and process.returncode is None and process.stdin is not None:
                # The client left or the request failed: stop generating at the next token.
                with contextlib.suppress(ConnectionError, RuntimeError):
                    process.stdin.write(
                        json.dumps({"op": "cancel", "id": request.request_id}).encode() + b"\n"
                    )

    async def complete(self, request: InferenceRequest) -> Completion:
        parts: list[str] = []
        done: dict[str, Any] = {}
        async for event in self._events(request):
            if event["event"] == "delta":
                parts.append(event["text"])
            elif event["event"] == "done":
                done = event
        usage = Usage(done.get("prompt_tokens"), done.get("completion_tokens"))
        body = {
            "id": f"chatcmpl-{request.request_id}",
            "object": "chat.completion",
            "created": request.created,
            "model": request.route.name,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts)},
                    "logprobs": None,
                    "finish_reason": done.get("finish_reason", "stop"),
                }
            ],
            "usage": {k: v for k, v in usage.as_dict().items() if k != "source"},
        }
        return Completion(200, json.dumps(body).encode(), "application/json", usage)

    async def stream(self, request: InferenceRequest) -> EventStream:
        events = self._events(request)
        # Wait for the worker to take the request, so a refusal (e.g. a prompt over the
        # context window) is an HTTP error, not a failed 200 stream.
        first = await anext(events)
        return EmbeddedStream(self, request, first, events)

    @property
    def fingerprint(self) -> str:
        return f"llamacpp-{(self.route.sha256 or 'unpinned')[:12]}"


class EmbeddedStream(EventStream):
    def __init__(
        self,
        worker: EmbeddedWorker,
        request: InferenceRequest,
        first: dict[str, Any],
        rest: AsyncGenerator[dict[str, Any], None],
    ) -> None:
        self._worker = worker
        self._request = request
        self._first = first
        self._rest = rest

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        request = self._request
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{request.request_id}",
            "object": "chat.completion.chunk",
            "created": request.created,
            "model": request.route.name,
            "system_fingerprint": self._worker.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if request.include_usage:
            chunk["usage"] = None
        return sse.event(chunk)

    async def events(self) -> AsyncIterator[bytes]:
        prompt_tokens = self._first.get("prompt_tokens")
        yield self._chunk({"role": "assistant", "content": ""}, None)
        try:
            async for event in self._rest:
                if event["event"] == "delta":
                    yield self._chunk({"content": event["text"]}, None)
                elif event["event"] == "done":
                    self.usage = Usage(prompt_tokens, event.get("completion_tokens"))
                    yield self._chunk({}, event.get("finish_reason", "stop"))
        except ApiError as error:
            self.failed = error.message
            yield sse.error_event(error.message, error.code)
            return
        if self._request.include_usage and self.usage is not None:
            usage = {k: v for k, v in self.usage.as_dict().items() if k != "source"}
            yield sse.event(
                {
                    "id": f"chatcmpl-{self._request.request_id}",
                    "object": "chat.completion.chunk",
                    "created": self._request.created,
                    "model": self._request.route.name,
                    "system_fingerprint": self._worker.fingerprint,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield sse.DONE

    async def aclose(self) -> None:
        # Closing the generator runs its cleanup, which cancels generation in the worker.
        await self._rest.aclose()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)
