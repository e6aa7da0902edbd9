"""The gateway's ASGI application: trust boundary 1 in front of inference and memory.

Takes a `GatewayConfig` and its path; gives a Starlette app whose API routes all pass the
guard (identity, policy with DLP, compliance lock, audit) before their endpoint runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sovereign_gateway.components import Components
from sovereign_gateway.contract import GatewayConfig
from sovereign_gateway.endpoints.chat import ChatEndpoints
from sovereign_gateway.endpoints.embeddings import EmbeddingEndpoints
from sovereign_gateway.endpoints.health import HealthEndpoints
from sovereign_gateway.endpoints.memory import MemoryEndpoints
from sovereign_gateway.endpoints.models import ModelEndpoints
from sovereign_gateway.errors import ApiError
from sovereign_gateway.guard import Guard

log = logging.getLogger("sovereign_gateway")


def create_app(config: GatewayConfig, config_path: Path) -> Starlette:
    parts = Components(config, config_path)
    guard = Guard(parts)

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
        await parts.start()
        try:
            yield
        finally:
            await parts.stop()

    routes = [
        *ChatEndpoints(parts, guard).routes(),
        *ModelEndpoints(parts, guard).routes(),
        *EmbeddingEndpoints(parts, guard).routes(),
        *MemoryEndpoints(parts, guard).routes(),
        *HealthEndpoints(parts, guard).routes(),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: refuse, Exception: refuse},
    )
