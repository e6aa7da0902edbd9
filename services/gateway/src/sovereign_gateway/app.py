"""The gateway's ASGI application: trust boundary 1 in front of inference and memory.

Takes a `GatewayConfig` and its path; gives a Starlette app. Every API request passes
auth -> policy (with DLP) -> compliance lock -> handler, and gets a durable audit record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sovereign_gateway import __version__
from sovereign_gateway.audit import AuditLog
from sovereign_gateway.authentication import (
    AuthError,
    KeySourceError,
    OIDCAuthenticator,
    Principal,
)
from sovereign_gateway.config import GatewayConfig, ModelRoute, resolve
from sovereign_gateway.errors import ApiError
from sovereign_gateway.keyfiles import load_or_create_private_key
from sovereign_gateway.lock import LockStatus, LockWatcher, facts_for
from sovereign_gateway.metrics import CONTENT_TYPE, Metrics
from sovereign_gateway.policy import Decision, PolicyEngine, PolicyUnavailable, create_engine
from sovereign_gateway.schemas import (
    ChatCompletionRequest,
    EmbeddingsRequest,
    EmbedRequest,
    IngestRequest,
    QueryRequest,
    openapi_document,
    parse,
)

log = logging.getLogger("sovereign_gateway")

UPSTREAM_HEALTH_TIMEOUT_S = 2.0
UPSTREAM_CONNECT_TIMEOUT_S = 5.0
# Actions that start compute: their allow decision is made durable before the work starts,
# and the outcome gets a second record when the response is ready.
ADMITTED_BEFORE_WORK = frozenset({"chat"})


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
    content: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Call, Any, ModelRoute | None, Decision], Awaitable[Response]]


class Gateway:
    def __init__(self, config: GatewayConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.models: dict[str, ModelRoute] = {}
        for route in config.models:
            for name in (route.name, *route.aliases):
                self.models[name] = route
        # aiohttp for the hop to the engines: it costs about 0.1 ms of CPU per request here,
        # httpx about 1.8 ms (docs/benchmarks.md). Created in start(), inside the loop.
        self.upstream: aiohttp.ClientSession | None = None
        jwks_file = config.oidc.jwks_file
        self.auth = OIDCAuthenticator(
            config.oidc,
            httpx.AsyncClient(timeout=5.0, trust_env=False),
            None if jwks_file is None else resolve(config_path, jwks_file),
        )
        self.policy: PolicyEngine | None = None
        self.policy_error = "not started"
        self.audit = AuditLog(
            resolve(config_path, config.audit.path),
            load_or_create_private_key(resolve(config_path, config.audit.signing_key)),
            checkpoint_records=config.audit.checkpoint_records,
            checkpoint_interval_seconds=config.audit.checkpoint_interval_seconds,
            segment_max_bytes=config.audit.segment_max_bytes,
            profile=config.profile,
        )
        self.lock = LockWatcher(config.lock, facts_for(config_path, config))

    async def start(self) -> None:
        self.upstream = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=UPSTREAM_CONNECT_TIMEOUT_S,
                sock_read=self.config.upstream.timeout_seconds,
            ),
            trust_env=False,
        )  # fmt: skip
        await self.audit.open()
        for note in self.audit.recovered:
            log.warning("audit log: %s", note)
        try:
            self.policy = create_engine(
                self.config.policy.engine,
                bundle_dir=resolve(self.config_path, self.config.policy.bundle),
                opa_url=self.config.policy.opa_url,
                decision_path=self.config.policy.decision,
                timeout_seconds=self.config.policy.timeout_seconds,
            )
        except PolicyUnavailable as exc:
            # Fail closed but stay up, so /health can say why and every refusal is audited.
            self.policy_error = str(exc)
            log.error("policy engine unavailable: %s", exc)
        await self._lock_status(startup=True)

    async def stop(self) -> None:
        await self.audit.close()
        if self.policy is not None:
            await self.policy.aclose()
        if self.upstream is not None:
            await self.upstream.close()

    # -- the boundary -----------------------------------------------------------------

    async def guarded(
        self, request: Request, action: str, body_model: type[Any] | None, handler: Handler
    ) -> Response:
        call = Call(
            request_id=uuid.uuid4().hex,
            action=action,
            resource=request.url.path,
            started=time.perf_counter(),
        )
        try:
            raw = await self._read_body(request)
            call.request_digest = hashlib.sha256(raw).hexdigest()
            call.principal = await self._authenticate(request)
            body = None if body_model is None else parse(raw, body_model)
            route = self._route(body)
            call.model = None if route is None else route.name
            texts: list[str] = [] if body is None else body.texts()
            decision = await self._decide(call, route, texts)
            await self._require_lock()
            if self.config.audit.capture_content and texts:
                call.content["request"] = texts
            if action in ADMITTED_BEFORE_WORK:
                await self._admit(call)
            response = await handler(call, body, route, decision)
        except ApiError as error:
            call.refusal = error.code
            response = error.response()
        response.headers["x-request-id"] = call.request_id
        if isinstance(response, StreamingResponse):
            return response
        call.response_digest = hashlib.sha256(bytes(response.body)).hexdigest()
        return await self._audited(call, response)

    async def _admit(self, call: Call) -> None:
        """Make the decision durable before any compute starts (trust boundary 1)."""
        try:
            await self.audit.append(self._record(call, None, phase="admitted"))
        except Exception:
            log.exception("audit append failed; refusing the request")
            self.metrics.audit_failures.inc()
            raise ApiError(
                503, "the audit log is unavailable; the request was not served", "audit_unavailable"
            ) from None
        self.metrics.audit_records.inc()

    async def _audited(self, call: Call, response: Response) -> Response:
        try:
            await self.audit.append(self._record(call, response.status_code))
        except Exception:
            log.exception("audit append failed; refusing the response")
            self.metrics.audit_failures.inc()
            response = ApiError(
                503, "the audit log is unavailable; the request was not served", "audit_unavailable"
            ).response()
        else:
            self.metrics.audit_records.inc()
        self._observe(call, response.status_code)
        return response

    def _observe(self, call: Call, status: int) -> None:
        self.metrics.requests.labels(call.resource, str(status)).inc()
        self.metrics.latency.labels(call.resource).observe(time.perf_counter() - call.started)

    def _record(self, call: Call, status: int | None, phase: str = "complete") -> dict[str, Any]:
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
            "request_digest": call.request_digest,
            "response_digest": call.response_digest,
            "status": status,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        }
        if call.content:
            record["content"] = call.content
        return record

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
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
            return await self.auth.authenticate(request.headers.get("authorization"))
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

    def _route(self, body: Any) -> ModelRoute | None:
        name = getattr(body, "model", None)
        if name is None:
            return None
        route = self.models.get(name)
        if route is None:
            raise ApiError(
                404,
                f"the model {name!r} does not exist on this node",
                "model_not_found",
                param="model",
            )
        return route

    async def _decide(self, call: Call, route: ModelRoute | None, texts: list[str]) -> Decision:
        decision = await self._ask(call.principal, call.action, route, texts, call.resource)
        call.decision = decision
        call.engine = self.config.policy.engine
        if not decision.allow:
            reasons = "; ".join(decision.reasons) or "no rule allows it"
            raise ApiError(403, f"request denied by policy: {reasons}", "policy_denied")
        return decision

    async def _ask(
        self,
        principal: Principal | None,
        action: str,
        route: ModelRoute | None,
        texts: list[str],
        path: str,
    ) -> Decision:
        engine = self.policy
        name = self.config.policy.engine
        if engine is None:
            self.metrics.decisions.labels(name, "error").inc()
            raise ApiError(
                503, f"the policy engine is unavailable: {self.policy_error}", "policy_unavailable"
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
            "resource": None,
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

    async def _require_lock(self) -> None:
        status = await self._lock_status()
        if not status.ok:
            raise ApiError(
                503,
                "the node's compliance lock does not hold; requests are refused until an "
                "administrator restores it (see /health)",
                "compliance_lock_violation",
            )

    async def _lock_status(self, startup: bool = False) -> LockStatus:
        status, changed = self.lock.check()
        self.metrics.lock_ok.set(1 if status.ok else 0)
        if changed or startup:
            if not status.ok:
                log.error("compliance lock violation: %s", "; ".join(status.reasons))
            await self.audit.append(
                {
                    "type": "event",
                    "action": "lock.state",
                    "resource": self.config.lock.manifest,
                    "lock": {
                        "state": status.state,
                        "ok": status.ok,
                        "reasons": list(status.reasons),
                    },
                }
            )
        return status

    # -- handlers ---------------------------------------------------------------------

    def _upstream_url(self, route: ModelRoute) -> str:
        if route.engine == "upstream":
            return route.source.rstrip("/")
        if self.config.upstream.url is not None:
            return self.config.upstream.url
        raise ApiError(
            503,
            f"the model {route.name!r} has no inference backend on this node yet",
            "backend_unavailable",
        )

    async def chat(
        self, call: Call, body: ChatCompletionRequest, route: ModelRoute | None, decision: Decision
    ) -> Response:
        if route is None:
            raise ApiError(400, "model: field required", "invalid_type", param="model")
        payload = body.model_dump(exclude_unset=True)
        payload["model"] = route.name
        if decision.redactions:
            payload["messages"] = [_redact(m, decision) for m in payload["messages"]]
        url = f"{self._upstream_url(route)}/chat/completions"
        if body.stream:
            return await self._stream(call, url, payload)
        upstream = await self._send(url, payload)
        try:
            content = await upstream.read()
        except TimeoutError:
            raise ApiError(504, "the inference backend timed out", "upstream_timeout") from None
        except aiohttp.ClientError:
            raise ApiError(502, "the inference backend failed", "upstream_error") from None
        finally:
            upstream.release()
        if upstream.status >= 500:
            raise ApiError(502, "the inference backend failed", "upstream_error")
        if self.config.audit.capture_content:
            call.content["response"] = content.decode(errors="replace")
        return Response(
            content,
            status_code=upstream.status,
            media_type=upstream.headers.get("content-type", "application/json"),
        )

    async def _send(self, url: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST with the body left unread, so a stream can be relayed as it arrives."""
        if self.upstream is None:
            raise ApiError(503, "the gateway is not started", "not_ready")
        try:
            return await self.upstream.post(url, json=payload)
        except TimeoutError:
            raise ApiError(504, "the inference backend timed out", "upstream_timeout") from None
        except aiohttp.ClientError:
            raise ApiError(502, "the inference backend is unreachable", "upstream_error") from None

    async def _stream(self, call: Call, url: str, payload: dict[str, Any]) -> Response:
        upstream = await self._send(url, payload)
        if upstream.status != 200:
            try:
                content = await upstream.read()
            except (TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                upstream.release()
            if upstream.status >= 500 or not content:
                raise ApiError(502, "the inference backend failed", "upstream_error")
            return Response(content, status_code=upstream.status, media_type="application/json")
        # The stream is admitted: its record is durable before the first byte goes out.
        try:
            await self.audit.append(self._record(call, 200, phase="stream_start"))
        except Exception:
            upstream.close()
            self.metrics.audit_failures.inc()
            raise ApiError(
                503, "the audit log is unavailable; the request was not served", "audit_unavailable"
            ) from None
        return StreamingResponse(
            self._relay(call, upstream),
            media_type=upstream.headers.get("content-type", "text/event-stream"),
            headers={"cache-control": "no-cache", "x-request-id": call.request_id},
        )

    async def _relay(self, call: Call, upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        captured: list[bytes] = []
        status = "stream_end"
        try:
            async for chunk in upstream.content.iter_any():
                digest.update(chunk)
                if self.config.audit.capture_content:
                    captured.append(chunk)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            status = "stream_cancelled"
            raise
        except (TimeoutError, aiohttp.ClientError):
            # Headers are sent; the client sees the stream end without [DONE].
            status = "stream_failed"
        finally:
            # close, not release: a cancelled or failed stream must not go back to the pool,
            # and closing it is what tells the engine to stop generating.
            if status == "stream_end":
                upstream.release()
            else:
                upstream.close()
            call.response_digest = digest.hexdigest()
            if captured:
                call.content["response"] = b"".join(captured).decode(errors="replace")
            record = self._record(call, 200, phase=status)
            try:
                await asyncio.shield(self.audit.append(record))
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("audit append for a finished stream failed")
                self.metrics.audit_failures.inc()
            self._observe(call, 200)

    async def models_list(
        self, call: Call, body: None, route: ModelRoute | None, decision: Decision
    ) -> Response:
        visible = []
        for model in self.config.models:
            verdict = await self._ask(call.principal, "chat", model, [], call.resource)
            if verdict.allow:
                visible.append(
                    {"id": model.name, "object": "model", "created": 0, "owned_by": "sovereign"}
                )
        return JSONResponse({"object": "list", "data": visible})

    async def not_yet(
        self, call: Call, body: Any, route: ModelRoute | None, decision: Decision
    ) -> Response:
        raise ApiError(
            501, f"{call.resource} is not served by this gateway version yet", "not_implemented"
        )

    # -- unauthenticated --------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        components: dict[str, dict[str, Any]] = {}
        if self.policy is None:
            components["policy_engine"] = {"ready": False, "detail": self.policy_error}
        else:
            ready, detail = await self.policy.ready()
            components["policy_engine"] = {"ready": ready, "detail": detail}
        ready, detail = await self.auth.ready()
        components["identity"] = {"ready": ready, "detail": detail}
        ready, detail = self.audit.status()
        components["audit_log"] = {"ready": ready, "detail": detail}
        lock = await self._lock_status()
        components["compliance_lock"] = {
            "ready": lock.ok,
            "detail": lock.state
            if not lock.reasons
            else f"{lock.state}: {'; '.join(lock.reasons)}",
        }
        upstreams = await self._upstream_health()
        ready = all(component["ready"] for component in components.values())
        body = {
            "status": "ok",
            "ready": ready,
            "profile": self.config.profile,
            "components": components,
            "upstreams": upstreams,
            "lock": {"state": lock.state, "reasons": list(lock.reasons)},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _upstream_health(self) -> dict[str, dict[str, Any]]:
        answers: dict[str, dict[str, Any]] = {}
        for route in self.config.models:
            try:
                base = self._upstream_url(route)
            except ApiError:
                answers[route.name] = {
                    "ready": False,
                    "detail": f"no backend for engine {route.engine} on this node yet",
                }
                continue
            if self.upstream is None:
                answers[route.name] = {"ready": False, "detail": "not started"}
                continue
            try:
                async with self.upstream.get(
                    f"{base}/models",
                    timeout=aiohttp.ClientTimeout(total=UPSTREAM_HEALTH_TIMEOUT_S),
                ) as reply:
                    answers[route.name] = {
                        "ready": reply.status == 200,
                        "detail": f"HTTP {reply.status}",
                    }
            except (TimeoutError, aiohttp.ClientError) as exc:
                answers[route.name] = {"ready": False, "detail": type(exc).__name__}
        return answers

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))


def _redact(message: dict[str, Any], decision: Decision) -> dict[str, Any]:
    # Longest first, so a match inside a longer one cannot leave part of the longer exposed.
    redactions = sorted(decision.redactions, key=lambda r: len(r.text), reverse=True)

    def mask(text: str) -> str:
        for redaction in redactions:
            if redaction.text:
                text = text.replace(redaction.text, f"[REDACTED:{redaction.type}]")
        return text

    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": mask(content)}
    if isinstance(content, list):
        parts = [
            {**part, "text": mask(part["text"])} if isinstance(part.get("text"), str) else part
            for part in content
        ]
        return {**message, "content": parts}
    return message


def create_app(config: GatewayConfig, config_path: Path) -> Starlette:
    gateway = Gateway(config, config_path)

    def endpoint(action: str, body: type[Any] | None, handler: Handler) -> Any:
        async def run(request: Request) -> Response:
            return await gateway.guarded(request, action, body, handler)

        return run

    async def refuse(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            error = ApiError(404, f"no route {request.url.path}", "not_found")
        elif status == 405:
            error = ApiError(405, f"{request.method} is not allowed here", "method_not_allowed")
        else:
            log.error("unhandled error on %s", request.url.path, exc_info=exc)
            error = ApiError(status, "internal error", "internal_error")
        return error.response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route(
            "/v1/chat/completions",
            endpoint("chat", ChatCompletionRequest, gateway.chat),
            methods=["POST"],
        ),
        Route("/v1/models", endpoint("models:read", None, gateway.models_list), methods=["GET"]),
        Route(
            "/v1/embeddings",
            endpoint("embeddings", EmbeddingsRequest, gateway.not_yet),
            methods=["POST"],
        ),
        Route("/ingest", endpoint("ingest", IngestRequest, gateway.not_yet), methods=["POST"]),
        Route("/embed", endpoint("embed", EmbedRequest, gateway.not_yet), methods=["POST"]),
        Route("/query", endpoint("query", QueryRequest, gateway.not_yet), methods=["POST"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: refuse, Exception: refuse},
    )
    app.state.gateway = gateway
    return app
