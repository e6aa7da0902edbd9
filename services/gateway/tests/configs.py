"""A gateway config document for the gateway's own tests, written as the toolkit renders one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovereign_gateway.contract import SCHEMA_VERSION


def config_document(tmp_path: Path) -> dict[str, Any]:
    """A personal node's config, its files under `tmp_path`; a test changes what it needs."""
    return {
        "schema_version": SCHEMA_VERSION,
        "profile": "t",
        "kind": "personal",
        "listen": {"host": "127.0.0.1", "port": 8000, "tls": None},
        "max_body_bytes": 1048576,
        "egress_default": "deny",
        "oidc": {
            "provider": "local",
            "issuer": "http://127.0.0.1:8000/local",
            "audience": "sovereign-gateway",
            "realm": "sovereign",
            "algorithms": ["EdDSA"],
            "clock_skew_seconds": 30,
            "local_issuer_dir": str(tmp_path / "issuer"),
            "jwks_cache_seconds": 300,
            "jwks_refetch_interval_seconds": 10.0,
            "service_clients": [],
        },
        "roles": {"user": ["chat"]},
        "policy": {
            "engine": "embedded",
            "opa_url": "http://127.0.0.1:8181",
            "decision": "gateway/decision",
            "bundle": "../policy",
            "timeout_seconds": 2.0,
        },
        "models": [
            {
                "name": "m",
                "aliases": [],
                "engine": "llamacpp",
                "source": "pkg:m/m.gguf",
                "sha256": "a" * 64,
                "quantization": "int4",
                "context_length": 2048,
                "allowed_roles": ["user"],
                "replicas": ["http://127.0.0.1:9/v1"],
                "weights": None,
                "concurrency": 16,
                "queue": 32,
                "queue_timeout_seconds": 30.0,
                "timeout_seconds": 120.0,
                "workers": 1,
                "threads": None,
            }
        ],
        "memory": {
            "vector_store": "embedded",
            "qdrant_url": None,
            "key_source": "file",
            "key_file": str(tmp_path / "memory.kek"),
            "tpm_tcti": "device:/dev/tpmrm0",
            "tpm_pcrs": [7],
            "data_dir": str(tmp_path / "memory"),
            "embeddings": {
                "engine": "embedded",
                "model": "all-minilm-l6-v2",
                "weights": str(tmp_path / "model.onnx"),
                "sha256": "c" * 64,
                "tokenizer": str(tmp_path / "tokenizer.json"),
                "url": None,
                "dimensions": 384,
            },
            "chunk_tokens": 200,
            "chunk_overlap": 32,
            "rag_chat": False,
            "rag_top_k": 4,
            "rag_min_score": 0.25,
            "max_document_bytes": 1 << 25,
            "default_retention_seconds": None,
            "retention_interval_seconds": 3600,
        },
        "audit": {
            "path": str(tmp_path / "audit"),
            "checkpoint_interval_seconds": 300,
            "checkpoint_records": 1000,
            "retention_seconds": 86400,
            "signing_key": str(tmp_path / "audit.key"),
            "capture_content": False,
            "segment_max_bytes": 1048576,
        },
        "lock": {
            "required": False,
            "manifest": str(tmp_path / "lock.json"),
            "public_key": str(tmp_path / "lock.pub"),
        },
    }
