"""Renderer `gateway`: the gateway's config file, built with the gateway's own model."""

from __future__ import annotations

from collections.abc import Mapping

from sovereign_gateway.config import (
    OIDC,
    SCHEMA_VERSION,
    AuditLog,
    GatewayConfig,
    Listen,
    MemoryStore,
    ModelRoute,
    PolicyEngine,
)

from sovereign.profile.model import Profile
from sovereign.profile.types import duration_seconds, split_host_port
from sovereign.render import Renderer

# The signature algorithms RFC 8725 leaves us: asymmetric only, never `none` or HS*.
ALGORITHMS = ["RS256", "ES256", "EdDSA"]
CLOCK_SKEW_SECONDS = 30
POLICY_DECISION = "sovereign/gateway/decision"
POLICY_TIMEOUT_SECONDS = 2.0


def gateway_config(profile: Profile) -> GatewayConfig:
    host, port = split_host_port(profile.gateway.listen)
    return GatewayConfig(
        schema_version=SCHEMA_VERSION,
        profile=profile.name,
        kind=profile.kind,
        listen=Listen(host=host, port=port),
        oidc=OIDC(
            issuer=str(profile.identity.issuer).rstrip("/"),
            audience=profile.identity.audience,
            realm=profile.identity.realm,
            algorithms=list(ALGORITHMS),  # type: ignore[arg-type]
            clock_skew_seconds=CLOCK_SKEW_SECONDS,
        ),
        roles={role: list(perms) for role, perms in profile.identity.roles.items()},
        policy=PolicyEngine(
            opa_url=str(profile.policy.opa_url).rstrip("/"),
            decision=POLICY_DECISION,
            dlp=profile.policy.dlp,
            timeout_seconds=POLICY_TIMEOUT_SECONDS,
        ),
        models=[
            ModelRoute(
                name=model.name,
                aliases=list(model.aliases),
                engine=model.engine,
                source=model.source,
                sha256=model.sha256,
                quantization=model.quantization,
                context_length=model.context_length,
                allowed_roles=list(model.allowed_roles),
            )
            for model in profile.models
        ],
        memory=MemoryStore(
            vector_store=profile.memory.vector_store,
            qdrant_url=None
            if profile.memory.qdrant_url is None
            else str(profile.memory.qdrant_url),
            key_source=profile.memory.key_source,
            data_dir=profile.memory.data_dir,
        ),
        audit=AuditLog(
            path=profile.audit.path,
            checkpoint_interval_seconds=duration_seconds(profile.audit.checkpoint_interval),
            retention_seconds=duration_seconds(profile.audit.retention),
        ),
    )


def render(profile: Profile) -> Mapping[str, bytes]:
    return {"gateway/config.json": gateway_config(profile).model_dump_json(indent=2).encode()}


RENDERER = Renderer("gateway", "the gateway's config (sovereign-gateway --config)", render)
