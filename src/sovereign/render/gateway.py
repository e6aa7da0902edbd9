"""Renderer `gateway`: the gateway's config file, built with the gateway's own model."""

from __future__ import annotations

from collections.abc import Mapping

from sovereign_gateway.contract import (
    OIDC,
    SCHEMA_VERSION,
    TLS,
    AuditLog,
    ComplianceLock,
    EmbeddingModel,
    GatewayConfig,
    Listen,
    MemoryStore,
    ModelRoute,
    PolicyEngine,
)

from sovereign.profile.model import ModelSpec, Profile
from sovereign.profile.types import duration_seconds, split_host_port
from sovereign.render import Renderer
from sovereign.render.artifacts import weights_path
from sovereign.render.vllm import vllm_service_url

# The signature algorithms RFC 8725 leaves us: asymmetric only, never `none` or HS*.
ALGORITHMS = ["RS256", "ES256", "EdDSA"]
CLOCK_SKEW_SECONDS = 30
POLICY_DECISION = "gateway/decision"
POLICY_TIMEOUT_SECONDS = 2.0
JWKS_CACHE_SECONDS = 300
JWKS_REFETCH_INTERVAL_SECONDS = 10.0
# Requests in flight per replica when the profile leaves `serving.concurrency` out: vLLM
# batches, so it takes many; a llama.cpp server, like the embedded engine, runs one at a
# time unless started with parallel slots (then raise serving.concurrency to match).
DEFAULT_CONCURRENCY = {"vllm": 64, "upstream": 16, "llamacpp": 1}
AUDIT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
WILDCARD_ADDRESSES = ("0.0.0.0", "::")  # noqa: S104 (names to leave out, not to bind)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# all-MiniLM-L6-v2's sentence embedding size.
MINILM_DIMENSIONS = 384


def gateway_config(profile: Profile) -> GatewayConfig:
    host, port = split_host_port(profile.gateway.listen)
    identity = profile.identity
    return GatewayConfig(
        schema_version=SCHEMA_VERSION,
        profile=profile.name,
        kind=profile.kind,
        listen=Listen(host=host, port=port, tls=tls_settings(profile)),
        max_body_bytes=profile.gateway.max_body_bytes,
        egress_default=profile.network.egress.default,
        oidc=OIDC(
            provider=identity.provider,
            issuer=str(identity.issuer).rstrip("/"),
            audience=identity.audience,
            realm=identity.realm,
            algorithms=list(ALGORITHMS),  # type: ignore[arg-type]
            clock_skew_seconds=CLOCK_SKEW_SECONDS,
            local_issuer_dir=identity.local_key_dir if identity.provider == "local" else None,
            jwks_cache_seconds=JWKS_CACHE_SECONDS,
            jwks_refetch_interval_seconds=JWKS_REFETCH_INTERVAL_SECONDS,
            service_clients=[client.name for client in identity.service_clients],
        ),
        roles={role: list(perms) for role, perms in identity.roles.items()},
        policy=PolicyEngine(
            engine=profile.policy.engine,
            opa_url=str(profile.policy.opa_url).rstrip("/"),
            decision=POLICY_DECISION,
            bundle="../policy",
            timeout_seconds=POLICY_TIMEOUT_SECONDS,
        ),
        models=[model_route(profile, model) for model in profile.models],
        memory=memory_store(profile),
        audit=AuditLog(
            path=profile.audit.path,
            checkpoint_interval_seconds=duration_seconds(profile.audit.checkpoint_interval),
            checkpoint_records=profile.audit.checkpoint_records,
            retention_seconds=duration_seconds(profile.audit.retention),
            signing_key=profile.audit.signing_key,
            capture_content=profile.audit.capture_content,
            segment_max_bytes=AUDIT_SEGMENT_MAX_BYTES,
        ),
        lock=ComplianceLock(
            required=profile.policy.lock.required,
            manifest=profile.policy.lock.manifest,
            public_key=profile.policy.lock.public_key,
        ),
    )


def tls_settings(profile: Profile) -> TLS | None:
    settings = profile.gateway.tls
    if settings is None:
        return None
    if not settings.local_ca:
        return TLS(
            mode="files", certificate=settings.certificate, key=settings.key, ca_dir=None, names=[]
        )
    return TLS(
        mode="local_ca",
        certificate=None,
        key=None,
        ca_dir=settings.ca_dir,
        names=server_names(profile),
    )


def server_names(profile: Profile) -> list[str]:
    """What a local CA's server certificate covers: the profile's names, each node's name,
    the listen address, and loopback, from where the node checks itself."""
    settings = profile.gateway.tls
    host = split_host_port(profile.gateway.listen)[0]
    listen = [] if host in WILDCARD_ADDRESSES else [host]
    names = [*(settings.names if settings else []), *(node.name for node in profile.nodes)]
    return list(dict.fromkeys([*names, *listen, *LOOPBACK_NAMES]))


def memory_store(profile: Profile) -> MemoryStore:
    memory = profile.memory
    embeddings = memory.embeddings
    embedded = embeddings.engine == "embedded"
    return MemoryStore(
        vector_store=memory.vector_store,
        qdrant_url=None if memory.qdrant_url is None else str(memory.qdrant_url),
        key_source=memory.key_source,
        key_file=memory.key_file,
        tpm_tcti=memory.tpm_tcti,
        tpm_pcrs=list(memory.tpm_pcrs),
        data_dir=memory.data_dir,
        embeddings=EmbeddingModel(
            engine=embeddings.engine,
            model=embeddings.model,
            weights=weights_path(embeddings.source) if embedded else None,
            sha256=embeddings.sha256 if embedded else None,
            tokenizer=weights_path(embeddings.tokenizer),
            url=None if embeddings.url is None else str(embeddings.url).rstrip("/"),
            dimensions=MINILM_DIMENSIONS if embedded else embeddings.dimensions or 0,
        ),
        chunk_tokens=memory.chunking.size,
        chunk_overlap=memory.chunking.overlap,
        rag_chat=memory.retrieval.chat,
        rag_top_k=memory.retrieval.top_k,
        rag_min_score=memory.retrieval.min_score,
        max_document_bytes=memory.max_document_bytes,
        default_retention_seconds=None
        if memory.retention is None
        else duration_seconds(memory.retention),
        retention_interval_seconds=duration_seconds(memory.retention_interval),
    )


def replicas(profile: Profile, model: ModelSpec) -> list[str]:
    """The servers that run the model; empty when the gateway runs it itself."""
    urls = [str(url).rstrip("/") for url in model.replicas]
    if model.engine == "upstream":
        return [model.source.rstrip("/"), *urls]
    if urls:
        return urls
    if model.engine == "vllm" and profile.kind == "datacenter":
        return [vllm_service_url(model)]
    if profile.gateway.upstream is not None:
        return [str(profile.gateway.upstream).rstrip("/")]
    return []


def model_route(profile: Profile, model: ModelSpec) -> ModelRoute:
    urls = replicas(profile, model)
    serving = model.serving
    embedded = not urls
    return ModelRoute(
        name=model.name,
        aliases=list(model.aliases),
        engine=model.engine,
        source=model.source,
        sha256=model.sha256,
        quantization=model.quantization,
        context_length=model.context_length,
        allowed_roles=list(model.allowed_roles),
        replicas=urls,
        weights=weights_path(model.source) if embedded else None,
        # One llama.cpp context serves one request at a time; more workers give more.
        concurrency=1 if embedded else serving.concurrency or DEFAULT_CONCURRENCY[model.engine],
        queue=serving.queue,
        queue_timeout_seconds=float(duration_seconds(serving.queue_timeout)),
        timeout_seconds=float(duration_seconds(serving.timeout)),
        workers=serving.workers,
        threads=serving.threads,
    )


def render(profile: Profile) -> Mapping[str, bytes]:
    return {"gateway/config.json": gateway_config(profile).model_dump_json(indent=2).encode()}


RENDERER = Renderer("gateway", "the gateway's config (sovereign-gateway --config)", render)
