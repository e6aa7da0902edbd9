"""The gateway's ASGI application.

Takes a `GatewayConfig`; gives an ASGI app. This skeleton serves `GET /health`
(liveness plus per-component readiness) and answers every other route 501.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from sovereign_gateway.config import GatewayConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _policy_engine_ready(opa_url: str, timeout: float) -> tuple[bool, str]:
    url = opa_url.rstrip("/") + "/health"
    if not url.startswith(("http://", "https://")):
        return False, f"unsupported policy engine URL {opa_url!r}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status == 200, f"HTTP {response.status}"
    except OSError as exc:
        return False, str(getattr(exc, "reason", exc))


def _audit_writable(path: str) -> tuple[bool, str]:
    directory = Path(path)
    probe = directory if directory.is_dir() else directory.parent
    if os.access(probe, os.W_OK):
        return True, f"{probe} is writable"
    return False, f"{probe} is missing or not writable"


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def create_app(config: GatewayConfig) -> ASGIApp:
    async def health(send: Send) -> None:
        policy_ok, policy_detail = await asyncio.to_thread(
            _policy_engine_ready, config.policy.opa_url, config.policy.timeout_seconds
        )
        audit_ok, audit_detail = _audit_writable(config.audit.path)
        components = {
            "policy_engine": {"ready": policy_ok, "detail": policy_detail},
            "audit_log": {"ready": audit_ok, "detail": audit_detail},
        }
        ready = all(component["ready"] for component in components.values())
        body = {"status": "ok", "ready": ready, "profile": config.profile, "components": components}
        await _send_json(send, 200 if ready else 503, body)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health" and scope["method"] in ("GET", "HEAD"):
            await health(send)
            return
        error = {
            "message": f"{scope['method']} {scope['path']} is not implemented by this gateway yet",
            "type": "not_implemented",
            "code": "not_implemented",
        }
        await _send_json(send, 501, {"error": error})

    return app
