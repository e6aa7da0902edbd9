"""`GET /health`, `/metrics` and `/openapi.json`, unauthenticated: each component's
readiness and why (503 until all are ready), the Prometheus metrics, the OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sovereign_gateway import __version__, tls
from sovereign_gateway.endpoints import Endpoints
from sovereign_gateway.metrics import CONTENT_TYPE
from sovereign_gateway.schemas import openapi_document


class HealthEndpoints(Endpoints):
    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]

    async def health(self, request: Request) -> Response:
        parts = self.parts
        components: dict[str, dict[str, Any]] = {}
        if parts.policy is None:
            components["policy_engine"] = {"ready": False, "detail": parts.policy_error}
        else:
            ready, detail = await parts.policy.ready()
            components["policy_engine"] = {"ready": ready, "detail": detail}
        ready, detail = await parts.identity.ready()
        components["identity"] = {"ready": ready, "detail": detail}
        ready, detail = parts.audit.status()
        components["audit_log"] = {"ready": ready, "detail": detail}
        lock = await parts.lock_status()
        components["compliance_lock"] = {
            "ready": lock.ok,
            "detail": lock.state
            if not lock.reasons
            else f"{lock.state}: {'; '.join(lock.reasons)}",
        }
        models = {name: backend.health() for name, backend in parts.runtime.backends.items()}
        # Models the gateway runs itself count towards readiness; remote engines are
        # reported but deployed and watched on their own.
        embedded = [name for name, b in parts.runtime.backends.items() if b.embedded]
        loading = [name for name in embedded if not models[name]["ready"]]
        components["runtime"] = {
            "ready": not loading,
            "detail": f"not ready: {', '.join(loading)}"
            if loading
            else f"{len(embedded)} embedded model(s) loaded",
        }
        components["memory"] = self._memory()
        if parts.tls_files is not None:
            ready, detail = tls.certificate_state(parts.tls_files.certificate)
            components["tls"] = {"ready": ready, "detail": detail}
        ready = all(component["ready"] for component in components.values())
        body = {
            "status": "ok",
            "ready": ready,
            "profile": parts.config.profile,
            "components": components,
            "models": models,
            "lock": {"state": lock.state, "reasons": list(lock.reasons)},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    def _memory(self) -> dict[str, Any]:
        memory = self.parts.memory
        if memory is None:
            return {"ready": False, "detail": self.parts.memory_error}
        counts = memory.counts()
        settings = self.parts.config.memory
        return {
            "ready": True,
            "detail": f"{counts['documents']} document(s), {counts['chunks']} chunk(s); "
            f"{settings.vector_store} store; {settings.key_source} key "
            f"v{memory.keyring.current.version}; embeddings {settings.embeddings.model}",
        }

    async def metrics(self, request: Request) -> Response:
        return Response(self.parts.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))
