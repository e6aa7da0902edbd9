"""The gateway skeleton: config loading, `/health` readiness, and 501 for the rest."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from sovereign_gateway.app import create_app
from sovereign_gateway.config import GatewayConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, opa_port: int) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "schema_version": 1,
            "profile": "t",
            "kind": "personal",
            "listen": {"host": "127.0.0.1", "port": 8000},
            "oidc": {
                "issuer": "http://127.0.0.1:8080/realms/sovereign",
                "audience": "sovereign-gateway",
                "realm": "sovereign",
                "algorithms": ["RS256"],
                "clock_skew_seconds": 30,
            },
            "roles": {"user": ["chat"]},
            "policy": {
                "opa_url": f"http://127.0.0.1:{opa_port}",
                "decision": "sovereign/gateway/decision",
                "dlp": "redact",
                "timeout_seconds": 1.0,
            },
            "models": [
                {
                    "name": "m",
                    "aliases": [],
                    "engine": "llamacpp",
                    "source": "pkg:m/m.gguf",
                    "sha256": None,
                    "quantization": "int4",
                    "context_length": 2048,
                    "allowed_roles": ["user"],
                }
            ],
            "memory": {
                "vector_store": "embedded",
                "qdrant_url": None,
                "key_source": "file",
                "data_dir": str(tmp_path / "memory"),
            },
            "audit": {
                "path": str(tmp_path / "audit"),
                "checkpoint_interval_seconds": 60,
                "retention_seconds": 86400,
            },
        }
    )


def _call(config: GatewayConfig, method: str, path: str) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": method, "path": path, "headers": []}
    asyncio.run(create_app(config)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_health_is_not_ready_while_the_policy_engine_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    status, body = _call(_config(tmp_path, _free_port()), "GET", "/health")
    assert status == 503
    assert body["ready"] is False
    assert body["components"]["policy_engine"]["ready"] is False
    assert body["components"]["audit_log"]["ready"] is True


def test_unimplemented_routes_answer_501_in_the_openai_error_shape(tmp_path: Path) -> None:
    status, body = _call(_config(tmp_path, _free_port()), "POST", "/v1/chat/completions")
    assert status == 501
    assert body["error"]["type"] == "not_implemented"
    assert set(body["error"]) == {"message", "type", "code"}


def test_invalid_config_exits_2_with_the_field_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    document = json.loads(_config(tmp_path, 1).model_dump_json())
    document["listen"]["port"] = "8000"
    path.write_text(json.dumps(document))
    proc = subprocess.run(
        [sys.executable, "-m", "sovereign_gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "listen.port: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sovereign_gateway", "--config", str(tmp_path / "absent.json")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr
