"""The gateway's configuration, as written by `sovereign render` (renderer `gateway`).

Takes the rendered JSON file; gives a strict, frozen `GatewayConfig`. Unknown keys are
refused so a config rendered by a newer toolkit fails loudly rather than half-applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


class OIDC(_Strict):
    provider: Literal["keycloak", "local"]
    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    realm: str = Field(min_length=1)
    algorithms: list[Literal["RS256", "ES256", "EdDSA"]] = Field(min_length=1)
    clock_skew_seconds: int = Field(ge=0, le=300)
    jwks_file: str | None = Field(
        description="provider local: the JWKS file of the local issuer; else discovery is used"
    )
    jwks_cache_seconds: int = Field(gt=0)
    jwks_refetch_interval_seconds: float = Field(
        ge=0, description="at most one JWKS fetch per interval when an unknown kid arrives"
    )
    service_clients: list[str] = Field(
        description="client ids (azp) whose tokens may call /embed and /query"
    )


class PolicyEngine(_Strict):
    engine: Literal["embedded", "remote"]
    opa_url: str = Field(min_length=1)
    decision: str = Field(min_length=1, description="the OPA rule path asked for each request")
    bundle: str = Field(
        min_length=1, description="directory with the Rego files and data.json; relative to here"
    )
    dlp: Literal["block", "redact", "log"]
    timeout_seconds: float = Field(gt=0, le=30)


class ComplianceLock(_Strict):
    required: bool
    manifest: str
    public_key: str


class ModelRoute(_Strict):
    name: str
    aliases: list[str]
    engine: Literal["vllm", "llamacpp", "upstream"]
    source: str
    sha256: str | None
    quantization: Literal[
        "int4", "awq", "gptq", "compressed-tensors", "bitsandbytes", "fp8", "none"
    ]
    context_length: int = Field(gt=0)
    allowed_roles: list[str] = Field(min_length=1)
    replicas: list[str] = Field(
        description="OpenAI-compatible base URLs serving this model; empty: `weights` is run "
        "by the embedded engine (or sent to `upstream.url` when that is set)"
    )
    weights: str | None = Field(
        description="embedded engine: the weights file, checked against sha256 before loading"
    )
    concurrency: int = Field(gt=0, description="requests in flight per replica or worker")
    queue: int = Field(ge=0, description="requests that may wait for a slot; beyond it, 429")
    queue_timeout_seconds: float = Field(gt=0)
    timeout_seconds: float = Field(gt=0)
    workers: int = Field(gt=0, description="embedded engine: worker processes")
    threads: int | None = Field(gt=0, description="embedded engine: threads per worker")


class EmbeddingModel(_Strict):
    engine: Literal["embedded", "upstream"]
    model: str = Field(min_length=1, description="the name /v1/embeddings answers to")
    weights: str | None = Field(description="embedded: the ONNX file, checked against sha256")
    sha256: str | None
    tokenizer: str = Field(description="tokenizer.json: chunk sizes are counted in its tokens")
    url: str | None = Field(description="upstream: the OpenAI-compatible base URL (…/v1)")
    dimensions: int = Field(gt=0)


class MemoryStore(_Strict):
    vector_store: Literal["embedded", "qdrant"]
    qdrant_url: str | None
    key_source: Literal["tpm", "passphrase", "file"]
    key_file: str | None
    tpm_tcti: str
    tpm_pcrs: list[int]
    data_dir: str
    embeddings: EmbeddingModel
    chunk_tokens: int = Field(gt=0)
    chunk_overlap: int = Field(ge=0)
    rag_chat: bool = Field(description="ground every chat completion on retrieved chunks")
    rag_top_k: int = Field(gt=0)
    rag_min_score: float = Field(ge=-1, le=1)
    max_document_bytes: int = Field(gt=0)
    default_retention_seconds: int | None = Field(gt=0)
    retention_interval_seconds: int = Field(gt=0)


class AuditLog(_Strict):
    path: str
    checkpoint_interval_seconds: int = Field(gt=0)
    checkpoint_records: int = Field(gt=0)
    retention_seconds: int = Field(gt=0)
    signing_key: str
    capture_content: bool
    segment_max_bytes: int = Field(gt=0, description="rotate to a new segment past this size")


class GatewayConfig(_Strict):
    schema_version: Literal[1]
    profile: str
    kind: Literal["personal", "edge", "air-gapped", "datacenter"]
    listen: Listen
    max_body_bytes: int = Field(gt=0)
    egress_default: Literal["deny"]
    oidc: OIDC
    roles: dict[str, list[str]]
    policy: PolicyEngine
    models: list[ModelRoute] = Field(min_length=1)
    memory: MemoryStore
    audit: AuditLog
    lock: ComplianceLock


def load_config(path: Path) -> GatewayConfig:
    """Read a rendered config; relative paths in it are relative to the file's directory."""
    return GatewayConfig.model_validate_json(path.read_bytes())


def resolve(config_path: Path, value: str) -> Path:
    candidate = Path(value)
    return candidate if candidate.is_absolute() else (config_path.parent / candidate).resolve()
