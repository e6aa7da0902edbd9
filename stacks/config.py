"""The stack's config, checked whole before the program creates any resource.

`sovereign render` writes `Pulumi.<stack>.yaml`; its `sovereign:profile` key holds the
resolved datacenter profile, whose `cluster` section says where and how to deploy. The
profile is validated with the same model and rules as `sovereign profile validate`, so an
error names the field and the line of the stack file. Secrets come from
`pulumi config set --secret` and never from the profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pulumi
from ruamel.yaml import YAML

from sovereign.profile.loader import ProfileError, parse_embedded_profile
from sovereign.profile.model import Cluster, Profile
from sovereign.render.pulumi import SECRET_KEYS
from sovereign.render.resolved import dump_yaml

NAMESPACE = "sovereign"
PROFILE_KEY = "profile"

# Where each component runs. The profile's service URLs must point here.
IDENTITY_NAMESPACE = "sovereign-identity"
POLICY_NAMESPACE = "sovereign-policy"
SPIRE_NAMESPACE = "sovereign-spire"
# The SPIRE agent and the SPIFFE CSI driver are node agents: they need host paths, the
# host PID namespace and (the CSI driver) privilege. They live apart so that every other
# namespace can enforce Pod Security `restricted`.
SPIRE_NODE_NAMESPACE = "sovereign-spire-node"
MEMORY_NAMESPACE = "sovereign-memory"
RUNTIME_NAMESPACE = "sovereign-runtime"
GATEWAY_NAMESPACE = "sovereign-gateway"

QDRANT_SERVICE = "qdrant"
QDRANT_PORT = 6333
OPA_SERVICE = "opa"
OPA_PORT = 8181
KEYCLOAK_SERVICE = "keycloak"


@dataclass(frozen=True)
class SecretKey:
    key: str
    description: str


SECRETS = tuple(
    SecretKey(key, description)
    for key, description in zip(
        SECRET_KEYS,
        (
            "the Keycloak bootstrap admin's password",
            "the password Keycloak uses for its PostgreSQL",
            "the passphrase the gateway derives its memory KEK from",
        ),
        strict=True,
    )
)


class ConfigError(Exception):
    """The stack config cannot be deployed; the message names the key, file and line."""


@dataclass(frozen=True)
class StackSettings:
    profile: Profile
    cluster: Cluster
    protect: bool
    secrets: Mapping[str, pulumi.Output[str]]

    def image(self, name: str) -> str:
        """An image of `cluster.images` as a full, digest-pinned reference."""
        return f"{self.cluster.registry}/{getattr(self.cluster.images, name)}"

    def runtime_class(self, *, gpu: bool = False) -> str | None:
        """The RuntimeClass a pod runs under; None means the node's default (runc)."""
        runtime = self.cluster.gpu_runtime if gpu and self.cluster.gpu_runtime else None
        chosen = runtime or self.profile.sandbox.runtime
        return None if chosen == "runc" else chosen


def stack_file(project_dir: Path, stack: str) -> Path:
    return project_dir / f"Pulumi.{stack}.yaml"


def load(
    config: pulumi.Config, stack: str, project_dir: Path, *, protect: bool | None = None
) -> StackSettings:
    """Read and check the whole config; raises ConfigError on the first file it cannot use."""
    raw = _profile_object(config.get_object(PROFILE_KEY), stack)
    profile = _parse(raw, stack_file(project_dir, stack))
    cluster = _cluster_of(profile, stack_file(project_dir, stack))
    secrets: dict[str, pulumi.Output[str]] = {}
    missing: list[str] = []
    for secret in SECRETS:
        value = config.get_secret(secret.key)
        if value is None:
            missing.append(secret.key)
        else:
            secrets[secret.key] = value
    if missing:
        commands = "; ".join(f"pulumi config set --secret {NAMESPACE}:{key}" for key in missing)
        raise ConfigError(
            f"stack {stack}: secret config {', '.join(f'{NAMESPACE}:{k}' for k in missing)} "
            f"not set; run: {commands}"
        )
    chosen = config.get_bool("protect")
    return StackSettings(
        profile=profile,
        cluster=cluster,
        protect=(True if chosen is None else chosen) if protect is None else protect,
        secrets=secrets,
    )


def _profile_object(value: Any, stack: str) -> dict[str, Any]:
    if value is None:
        raise ConfigError(
            f"stack {stack}: config {NAMESPACE}:{PROFILE_KEY} is not set; write it with "
            f"`sovereign render PROFILE --only pulumi --out DIR` and copy "
            f"DIR/Pulumi.{stack}.yaml next to Pulumi.yaml"
        )
    if not isinstance(value, dict):
        raise ConfigError(
            f"stack {stack}: config {NAMESPACE}:{PROFILE_KEY} must be a mapping (the resolved "
            f"profile), got {type(value).__name__}"
        )
    return value


def _parse(raw: dict[str, Any], path: Path) -> Profile:
    """Validate with the stack file's lines when the file holds this very profile."""
    at = ("config", f"{NAMESPACE}:{PROFILE_KEY}")
    text, filename = (
        dump_yaml({"config": {f"{NAMESPACE}:{PROFILE_KEY}": raw}}),
        (f"<config {NAMESPACE}:{PROFILE_KEY}>"),
    )
    if path.is_file():
        on_disk = path.read_text(encoding="utf-8")
        if _subtree(on_disk, at) == raw:
            text, filename = on_disk, str(path)
    try:
        return parse_embedded_profile(text, filename, at)
    except ProfileError as error:
        raise ConfigError(_prefixed(error)) from None


def _subtree(text: str, at: tuple[str, ...]) -> Any:
    try:
        data: Any = YAML(typ="safe", pure=True).load(text)
        for part in at:
            data = data[part]
    except Exception:
        return None
    return data


def _prefixed(error: ProfileError) -> str:
    return "\n".join(
        f"{issue.file}:{issue.line}:{issue.column}: {NAMESPACE}:{PROFILE_KEY}.{issue.path}: "
        f"{issue.message}"
        for issue in error.issues
    )


def _cluster_of(profile: Profile, path: Path) -> Cluster:
    where = f"{path.name}: {NAMESPACE}:{PROFILE_KEY}"
    if profile.kind != "datacenter":
        raise ConfigError(f"{where}.kind: the stack deploys kind datacenter, not {profile.kind}")
    if profile.cluster is None:
        raise ConfigError(f"{where}.cluster: missing; the stack needs the cluster section")
    expected: list[tuple[str, str | None, Callable[[], str], str]] = [
        (
            "memory.qdrant_url",
            None if profile.memory.qdrant_url is None else str(profile.memory.qdrant_url),
            lambda: f"{QDRANT_SERVICE}.{MEMORY_NAMESPACE}.svc.cluster.local:{QDRANT_PORT}",
            "the Memory component's Qdrant Service",
        ),
        (
            "policy.opa_url",
            str(profile.policy.opa_url),
            lambda: f"{OPA_SERVICE}.{POLICY_NAMESPACE}.svc.cluster.local:{OPA_PORT}",
            "the Policy component's OPA Service",
        ),
    ]
    for field, url, target, what in expected:
        if url is None or urlsplit(url).netloc != target():
            raise ConfigError(f"{where}.{field}: {url} is not {what}; use http://{target()}")
    if profile.memory.vector_store != "qdrant":
        raise ConfigError(f"{where}.memory.vector_store: the stack runs qdrant")
    if profile.policy.engine != "remote":
        raise ConfigError(f"{where}.policy.engine: the stack runs OPA; use remote")
    return profile.cluster
