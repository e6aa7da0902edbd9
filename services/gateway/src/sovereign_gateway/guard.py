"""The one pipeline every API route passes: body, identity, policy, lock, then audit.

Takes a request, its action, body model and handler; gives the answer or the refusal,
audited; compute is admitted durably first, and a client's disconnect cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sovereign_gateway.authentication import AuthError, KeySourceError, Principal
from sovereign_gateway.components import Components
from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.errors import ApiError
from sovereign_gateway.memory.errors import MemoryFailure
from sovereign_gateway.policy import Decision, PolicyUnavailable
from sovereign_gateway.runtime.base import Usage
from sovereign_gateway.schemas import IngestRequest, parse, parse_ingest

log = logging.getLogger("sovereign_gateway")

# nginx's "client closed request": the status audited for work the client walked away from.
CLIENT_CLOSED = 499
# Actions that start compute: their allow decision is made durable before the work starts,
# and the outcome gets a second record when the response is ready.
ADMITTED_BEFORE_WORK = frozenset({"chat", "embeddings", "embed", "ingest", "query", "delete"})
# Of those, the ones a client's disconnect cancels; an ingest or delete runs to its end.
CANCELLABLE = frozenset({"chat", "embeddings", "embed", "query"})
# Base64 grows a document by a third; the JSON around it and multipart headers are small.
INGEST_ENVELOPE_BYTES = 64 * 1024
AUDIT_UNAVAILABLE = "the audit log is unavailable; the request was not served"


@dataclass
class Call:
    """What one request did, for its audit record."""

    request_id: str
    action: str
    resource: str
    started: float
    request_digest: str = hashlib.sha256(b"").hexdigest()
    principal: Principal | None = None
    decision: Decision | None = None
    engine: str | None = None
    model: str | None = None
    response_digest: str | None = None
    refusal: str | None = None
    usage: Usage | None = None
    replica: str | None = None
    content: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    route: str = ""  # the route's template: metrics label by it, never by a raw path
    memory: dict[str, Any] | None = None


Handler = Callable[[Call, Any, ModelRoute | None, Decision], Awaitable[Response]]


class Guard:
    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self.config = parts.config
        self.metrics = parts.metrics

    def route(
        self, path: str, action: str, body: type[Any] | None, handler: Handler, method: str
    ) -> Route:
        """A route whose every request passes this pipeline before `handler` sees it."""

        async def endpoint(request: Request) -> Response:
            return await self.run(request, action, body, handler)

        return Route(path, endpoint, methods=[method])

    async def run(
        self, request: Request, action: str, body_model: type[Any] | None, handler: Handler
    ) -> Response:
        call = Call(
            request_id=uuid.uuid4().hex,
            action=action,
            resource=request.url.path,
            started=time.perf_counter(),
        )
        try:
            call.params = dict(request.path_params)
            template = request.scope.get("route")
            if template is not None:
                call.route = template.path
            raw = await self._read_body(request, action)
            call.request_digest = hashlib.sha256(raw).hexdigest()
            call.principal = await self._authenticate(request)
            body: Any = None
            if body_model is IngestRequest:
                body = parse_ingest(raw, request.headers.get("content-type", ""))
            elif body_model is not None:
                body = parse(raw, body_model)
            route = self._route(body) if action == "chat" else None
            call.model = None if route is None else route.name
            texts: list[str] = [] if body is None else body.texts()
            resource = (
                body.resource(call.principal.sub) if isinstance(body, IngestRequest) else None
            )
            decision = await self._decide(call, route, texts, resource)
            await self.require_lock()
            if self.config.audit.capture_content and texts:
                call.content["request"] = texts
            if action in ADMITTED_BEFORE_WORK:
                await self._admit(call)
            if action in CANCELLABLE:
                response = await _unless_disconnected(request, handler(call, body, route, decision))
            else:
                response = await handler(call, body, route, decision)
        except MemoryFailure as failure:
            error = memory_error(failure)
            call.refusal = error.code
            response = error.response()
        except ApiError as error:
            call.refusal = error.code
            response = error.response()
        response.headers["x-request-id"] = call.request_id
        if isinstance(response, StreamingResponse):
            return response
        call.response_digest = hashlib.sha256(bytes(response.body)).hexdigest()
        return await self._audited(call, response)

    async def ask(
        self,
        principal: Principal | None,
        action: str,
        route: ModelRoute | None,
        texts: list[str],
        path: str,
        resource: dict[str, Any] | None = None,
    ) -> Decision:
        """The policy's decision for one question; no engine or no answer is 503."""
        engine = self.parts.policy
        name = self.config.policy.engine
        if engine is None:
            self.metrics.decisions.labels(name, "error").inc()
            raise ApiError(
                503,
                f"the policy engine is unavailable: {self.parts.policy_error}",
                "policy_unavailable",
            )
        if principal is None:
            raise ApiError(401, "a bearer token is required", "invalid_request")
        document = {
            "action": action,
            "path": path,
            "subject": {
                "sub": principal.sub,
                "client": principal.client,
                "roles": list(principal.roles),
                "service": principal.service,
            },
            "model": None if route is None else route.name,
            "texts": texts,
            "resource": resource,
        }
        started = time.perf_counter()
        try:
            decision = await engine.decide(document)
        except PolicyUnavailable as exc:
            self.metrics.decisions.labels(name, "error").inc()
            raise ApiError(
                503, f"the policy engine is unavailable: {exc}", "policy_unavailable"
            ) from None
        self.metrics.decision_latency.labels(name).observe(time.perf_counter() - started)
        self.metrics.decisions.labels(name, "allow" if decision.allow else "deny").inc()
        return decision

    async def require_lock(self) -> None:
        status = await self.parts.lock_status()
        if not status.ok:
            raise ApiError(
                503,
                "the node's compliance lock does not hold; requests are refused until an "
                "administrator restores it (see /health)",
                "compliance_lock_violation",
            )

    async def append_or_refuse(self, record: dict[str, Any]) -> None:
        """Make a record durable, or refuse the request: nothing is served unaudited."""
        try:
            await self.parts.audit.append(record)
        except Exception:
            log.exception("audit append failed; refusing the request")
            self.metrics.audit_failures.inc()
            raise ApiError(503, AUDIT_UNAVAILABLE, "audit_unavailable") from None
        self.metrics.audit_records.inc()

    async def append_after(self, call: Call, status: int, phase: str) -> None:
        """The record of work already answered (a finished stream): logged if it fails."""
        try:
            await self.parts.audit.append(self.record(call, status, phase=phase))
        except Exception:
            log.exception("audit append for a finished stream failed")
            self.metrics.audit_failures.inc()
        self.observe(call, status)

    def record(self, call: Call, status: int | None, phase: str = "complete") -> dict[str, Any]:
        principal = call.principal
        decision = call.decision
        record: dict[str, Any] = {
            "type": "event",
            "request_id": call.request_id,
            "phase": phase,
            "action": call.action,
            "resource": call.resource,
            "model": call.model,
            "actor": None
            if principal is None
            else {"sub": principal.sub, "client": principal.client, "roles": list(principal.roles)},
            "decision": None
            if decision is None
            else {
                "allow": decision.allow,
                "reasons": list(decision.reasons),
                "engine": call.engine,
                "dlp_findings": decision.obligations.get("dlp_findings", []),
                "redactions": len(decision.redactions),
            },
            "refusal": call.refusal,
            "replica": call.replica,
            "usage": None if call.usage is None else call.usage.as_dict(),
            "memory": call.memory,
            "request_digest": call.request_digest,
            "response_digest": call.response_digest,
            "status": status,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        }
        if call.content:
            record["content"] = call.content
        return record

    def observe(self, call: Call, status: int) -> None:
        route = call.route or call.resource
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - call.started)

    async def _admit(self, call: Call) -> None:
        """Make the decision durable before any compute starts (trust boundary 1)."""
        await self.append_or_refuse(self.record(call, None, phase="admitted"))

    async def _audited(self, call: Call, response: Response) -> Response:
        try:
            await self.append_or_refuse(self.record(call, response.status_code))
        except ApiError as error:
            response = error.response()
        self.observe(call, response.status_code)
        return response

    async def _read_body(self, request: Request, action: str) -> bytes:
        limit = self.config.max_body_bytes
        if action == "ingest":
            limit = self.config.memory.max_document_bytes * 4 // 3 + INGEST_ENVELOPE_BYTES
        too_large = ApiError(413, f"the request body exceeds {limit} bytes", "body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _authenticate(self, request: Request) -> Principal:
        try:
            _, principal = await self.parts.identity.authenticate(request)
        except AuthError as error:
            self.metrics.auth_failures.labels(error.error).inc()
            raise ApiError(
                401,
                error.description,
                error.error,
                headers={"WWW-Authenticate": error.challenge(self.config.oidc.realm)},
            ) from None
        except KeySourceError:
            self.metrics.auth_failures.labels("issuer_unavailable").inc()
            raise ApiError(
                503, "the identity provider's keys are unavailable", "identity_unavailable"
            ) from None
        request.scope["user"] = principal
        return principal

    def _route(self, body: Any) -> ModelRoute | None:
        name = getattr(body, "model", None)
        if name is None:
            return None
        backend = self.parts.runtime.backend(name)
        if backend is None:
            raise ApiError(
                404,
                f"the model {name!r} does not exist on this node",
                "model_not_found",
                param="model",
            )
        return backend.route

    async def _decide(
        self,
        call: Call,
        route: ModelRoute | None,
        texts: list[str],
        resource: dict[str, Any] | None = None,
    ) -> Decision:
        decision = await self.ask(
            call.principal, call.action, route, texts, call.resource, resource
        )
        call.decision = decision
        call.engine = self.config.policy.engine
        if not decision.allow:
            raise ApiError(403, f"request denied by policy: {denied(decision)}", "policy_denied")
        return decision


def denied(decision: Decision) -> str:
    return "; ".join(decision.reasons) or "no rule allows it"


def memory_error(failure: MemoryFailure) -> ApiError:
    return ApiError(
        failure.status, str(failure), failure.code, param=getattr(failure, "param", None)
    )


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run the work, cancelling it (and so the engine's generation) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ApiError):
        await task
    raise ApiError(
        CLIENT_CLOSED,
        "the client closed the connection; the request was cancelled",
        "client_disconnected",
    )


async def _disconnected(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect, if it comes.
    while (await request.receive())["type"] != "http.disconnect":
        pass
