"""A replica that is an OpenAI-compatible HTTP server: vLLM, llama.cpp's server, or others.

Takes the server's base URL (ending in /v1) and the gateway's aiohttp session; gives
completions and relayed SSE streams. Connection failures and 502/503/504 answers before
any body raise `ReplicaDown`, so the router fails over; later failures are the request's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

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

PROBE_TIMEOUT_S = 2.0
# Probes run every 5 s, so a replica that stays silent for about 15 s is taken out.
SILENT_PROBES_TO_DOWN = 3
# Answers that say "this server cannot take requests now", not "this request is wrong".
UNAVAILABLE = frozenset({502, 503, 504})


class UpstreamReplica(Replica):
    def __init__(self, base_url: str, session: Callable[[], aiohttp.ClientSession]) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = self.base_url
        self._session = session
        self._state: ReplicaState = "ready"
        self._detail = "not probed yet"
        self._silent = 0

    def state(self) -> tuple[ReplicaState, str]:
        return self._state, self._detail

    def mark(self, state: ReplicaState, detail: str) -> None:
        self._state, self._detail = state, detail

    async def probe(self, busy: bool = False) -> None:
        if busy and self._state == "ready":
            # Traffic is proving it alive, and a probe would queue behind the generation on
            # a one-request server (llama.cpp's Python server even interrupts it).
            return
        try:
            async with self._session().get(
                f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            ) as reply:
                status = reply.status
        except TimeoutError:
            # Slow is not dead: a server busy with another client's generation answers late.
            # Only a run of silent probes takes a ready replica out.
            self._silent += 1
            if self._state == "ready" and self._silent < SILENT_PROBES_TO_DOWN:
                self._detail = f"slow on /models ({self._silent} silent probe(s))"
            else:
                self.mark("down", f"no answer on /models in {self._silent} probe(s)")
            return
        except aiohttp.ClientError as exc:
            self.mark("down", f"{type(exc).__name__} on /models")
            return
        self._silent = 0
        if status == 200:
            self.mark("ready", "HTTP 200 on /models")
        else:
            self.mark("down", f"HTTP {status} on /models")

    async def _post(self, request: InferenceRequest, payload: dict[str, Any]) -> Any:
        timeout = aiohttp.ClientTimeout(total=request.route.timeout_seconds, connect=5.0)
        try:
            reply = await self._session().post(
                f"{self.base_url}/chat/completions", json=payload, timeout=timeout
            )
        except (aiohttp.ClientConnectionError, OSError) as exc:
            # Nothing reached the engine, or it dropped the connection before answering.
            self.mark("down", f"{type(exc).__name__}: {exc}")
            raise ReplicaDown(f"{self.label}: {type(exc).__name__}") from None
        except TimeoutError:
            raise ApiError(504, "the inference backend timed out", "upstream_timeout") from None
        if reply.status in UNAVAILABLE:
            reply.close()
            self.mark("down", f"answered HTTP {reply.status}")
            raise ReplicaDown(f"{self.label}: HTTP {reply.status}")
        return reply

    async def complete(self, request: InferenceRequest) -> Completion:
        reply = await self._post(request, request.payload)
        try:
            body = await reply.read()
        except TimeoutError:
            raise ApiError(504, "the inference backend timed out", "upstream_timeout") from None
        except aiohttp.ClientError:
            raise ApiError(502, "the inference backend failed", "upstream_error") from None
        finally:
            reply.release()
        if reply.status >= 500:
            raise ApiError(
                502, f"the inference backend failed (HTTP {reply.status})", "upstream_error"
            )
        if reply.status != 200:
            return Completion(
                reply.status, _openai_error(reply.status, body), "application/json", None
            )
        return Completion(200, body, "application/json", _usage_of(body))

    async def stream(self, request: InferenceRequest) -> EventStream:
        # Always ask for usage, so the audit record has it; the client sees it only if it asked.
        payload = {**request.payload, "stream": True, "stream_options": {"include_usage": True}}
        reply = await self._post(request, payload)
        if reply.status != 200:
            try:
                body = await reply.read()
            except (TimeoutError, aiohttp.ClientError):
                body = b""
            finally:
                reply.release()
            if reply.status >= 500:
                raise ApiError(
                    502, f"the inference backend failed (HTTP {reply.status})", "upstream_error"
                )
            raise _as_api_error(reply.status, body)
        return UpstreamStream(reply, request.include_usage)


class UpstreamStream(EventStream):
    def __init__(self, reply: aiohttp.ClientResponse, include_usage: bool) -> None:
        self._reply = reply
        self._include_usage = include_usage
        self._clean = False
        self._deltas = 0
        self._last: dict[str, Any] = {}

    async def events(self) -> AsyncIterator[bytes]:
        splitter = sse.EventSplitter()
        self._deltas = 0
        done = False
        try:
            async for chunk in self._reply.content.iter_any():
                for raw in splitter.feed(chunk):
                    data = sse.data_of(raw)
                    if data is None:
                        yield raw  # a comment, e.g. a keep-alive
                        continue
                    if data == "[DONE]":
                        done = True
                        if self._include_usage and self.usage is None:
                            yield sse.event(self._usage_chunk())
                        yield sse.DONE
                        continue
                    relayed, counted = self._relayed(raw, data)
                    self._deltas += counted
                    if relayed is not None:
                        yield relayed
        except TimeoutError:
            self.failed = "the inference backend timed out mid-stream"
        except aiohttp.ClientError as exc:
            self.failed = f"the inference backend failed mid-stream: {type(exc).__name__}"
        finally:
            # Also when the client leaves mid-stream: what was generated so far is counted.
            if self.usage is None:
                self.usage = Usage(None, self._deltas, "counted")
        if self.failed is None and not done:
            self.failed = "the inference backend ended the stream without [DONE]"
        if self.failed is not None:
            yield sse.error_event(self.failed, "upstream_error")
        else:
            self._clean = True

    def _usage_chunk(self) -> dict[str, Any]:
        usage = Usage(None, self._deltas, "counted")
        return {
            **self._last,
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {k: v for k, v in usage.as_dict().items() if k != "source"},
        }

    def _relayed(self, raw: bytes, data: str) -> tuple[bytes | None, int]:
        try:
            chunk = json.loads(data)
        except ValueError:
            return raw, 0
        if not isinstance(chunk, dict):
            return raw, 0
        self._last = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        choices = chunk.get("choices") or []
        counted = sum(
            1
            for choice in choices
            if isinstance(choice, dict) and (choice.get("delta") or {}).get("content")
        )
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
        if self._include_usage or "usage" not in chunk:
            return raw, counted
        if not choices:
            return None, counted  # the usage-only chunk the client did not ask for
        return sse.event({k: v for k, v in chunk.items() if k != "usage"}), counted

    async def aclose(self) -> None:
        if self.usage is None:  # the client left mid-stream: count what it was sent
            self.usage = Usage(None, self._deltas, "counted")
        # release returns a finished connection to the pool; close aborts an unfinished one,
        # which is what tells the engine to stop generating.
        if self._clean:
            self._reply.release()
        else:
            self._reply.close()


def _usage_of(body: bytes) -> Usage | None:
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    return Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))


def _openai_error(status: int, body: bytes) -> bytes:
    """The engine's refusal, in OpenAI's error shape whatever shape it came in."""
    return json.dumps(_as_api_error(status, body).body()).encode()


def _as_api_error(status: int, body: bytes) -> ApiError:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        param = error.get("param")
        return ApiError(
            status,
            error["message"],
            str(error.get("code") or "upstream_refused"),
            param=param if isinstance(param, str) else None,
        )
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    message = str(detail) if detail else body.decode(errors="replace")[:500] or f"HTTP {status}"
    return ApiError(
        status, f"the inference backend refused the request: {message}", "upstream_refused"
    )
