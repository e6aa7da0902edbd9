"""The stack's config, checked whole before the program creates any resource.

`sovereign stack config` (or `sovereign render --only pulumi`) writes `Pulumi.<stack>.yaml`;
its `sovereign:profile` key holds the resolved datacenter profile, whose `cluster` section
says where and how to deploy. The profile is validated with the same model and rules as
`sovereign profile validate`, and then for what this stack can deploy, so an error names
the field and the line of the stack file. Secrets come from `pulumi config set --secret`
and never from the profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pulumi
from ruamel.yaml import YAML

from sovereign.profile.derived import BUNDLE_ROOT
from sovereign.profile.loader import ProfileError, locate_embedded, parse_embedded_profile
from sovereign.profile.model import Cluster, Profile
from sovereign.profile.rules import Loc
from sovereign.render.pulumi import SECRET_KEYS
from sovereign.render.resolved import dump_yaml

NAMESPACE = "sovereign"
PROFILE_KEY = "profile"
PROFILE_AT = ("config", f"{NAMESPACE}:{PROFILE_KEY}")

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
# Fixed mounts of the gateway pod, which the profile's paths must stay clear of.
GATEWAY_CONFIG_DIR = "/etc/sovereign-gateway"
WORKLOAD_API_DIR = "/run/spire/sockets"
SCRATCH_DIR = "/tmp"  # noqa: S108 - an emptyDir of the pod's own


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
        if chosen == "runc":
            return None
        if gpu and self.cluster.gpu_runtime_class is not None:
            return self.cluster.gpu_runtime_class
        return chosen


def stack_file(project_dir: Path, stack: str) -> Path:
    return project_dir / f"Pulumi.{stack}.yaml"


def load(config: pulumi.Config, stack: str, project_dir: Path) -> StackSettings:
    """Read and check the whole config; raises ConfigError naming every problem found."""
    raw = _profile_object(config.get_object(PROFILE_KEY), stack)
    text, filename = _source(raw, stack_file(project_dir, stack))
    try:
        profile = parse_embedded_profile(text, filename, PROFILE_AT)
        problems = deployment_problems(profile)
        if problems:
            raise locate_embedded(text, filename, PROFILE_AT, problems)
    except ProfileError as error:
        raise ConfigError(_prefixed(error)) from None
    cluster = profile.cluster
    if cluster is None:  # deployment_problems reported it; this narrows the type
        raise ConfigError("sovereign:profile.cluster: missing")
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
    protect = config.get_bool("protect")
    return StackSettings(
        profile=profile,
        cluster=cluster,
        protect=True if protect is None else protect,
        secrets=secrets,
    )


def _profile_object(value: Any, stack: str) -> dict[str, Any]:
    if value is None:
        raise ConfigError(
            f"stack {stack}: config {NAMESPACE}:{PROFILE_KEY} is not set; write it with "
            f"`sovereign stack config PROFILE` (see docs/datacenter.md)"
        )
    if not isinstance(value, dict):
        raise ConfigError(
            f"stack {stack}: config {NAMESPACE}:{PROFILE_KEY} must be a mapping (the resolved "
            f"profile), got {type(value).__name__}"
        )
    return value


def _source(raw: dict[str, Any], path: Path) -> tuple[str, str]:
    """The stack file when it holds this very profile (its lines are the user's);
    otherwise the config value alone, as YAML."""
    if path.is_file():
        on_disk = path.read_text(encoding="utf-8")
        if _subtree(on_disk, PROFILE_AT) == raw:
            return on_disk, str(path)
    return dump_yaml({"config": {f"{NAMESPACE}:{PROFILE_KEY}": raw}}), (
        f"<config {NAMESPACE}:{PROFILE_KEY}>"
    )


def _subtree(text: str, at: tuple[str, ...]) -> Any:
    try:
        data: Any = YAML(typ="safe", pure=True).load(text)
        for part in at:
            data = data[part]
    except Exception:  # a file we cannot read simply is not the source
        return None
    return data


def _prefixed(error: ProfileError) -> str:
    return "\n".join(
        f"{issue.file}:{issue.line}:{issue.column}: {NAMESPACE}:{PROFILE_KEY}.{issue.path}: "
        f"{issue.message}"
        for issue in error.issues
    )


# Directories the gateway image needs as they are: a volume mounted on one, or (for the
# first group) anywhere inside one, would hide what the image keeps there.
SYSTEM_TREES = ("/bin", "/boot", "/lib", "/lib64", "/sbin", "/usr", "/proc", "/sys", "/dev")
SYSTEM_DIRS = ("/", "/etc", "/opt", "/run", "/var", "/var/lib", "/home", "/root")


def deployment_problems(profile: Profile) -> list[tuple[Loc, str]]:
    """What keeps a valid datacenter profile from deploying with this stack, field by field."""
    if profile.kind != "datacenter":
        return [(("kind",), f"the stack deploys kind datacenter, not {profile.kind}")]
    if profile.cluster is None:
        return [((), "no cluster section; the stack needs one (see docs/datacenter.md)")]
    problems: list[tuple[Loc, str]] = []
    services = (
        (
            ("memory", "qdrant_url"),
            profile.memory.qdrant_url,
            f"{QDRANT_SERVICE}.{MEMORY_NAMESPACE}.svc.cluster.local:{QDRANT_PORT}",
            "the Memory component's Qdrant Service",
        ),
        (
            ("policy", "opa_url"),
            profile.policy.opa_url,
            f"{OPA_SERVICE}.{POLICY_NAMESPACE}.svc.cluster.local:{OPA_PORT}",
            "the Policy component's OPA Service",
        ),
    )
    for loc, url, target, what in services:
        parts = urlsplit(str(url))
        if url is None or parts.scheme != "http" or parts.netloc != target:
            problems.append((loc, f"{url} is not {what}; use http://{target}"))
    if profile.memory.vector_store != "qdrant":
        problems.append((("memory", "vector_store"), "the stack runs qdrant"))
    if profile.policy.engine != "remote":
        problems.append((("policy", "engine"), "the stack runs OPA servers; use remote"))
    issuer = urlsplit(str(profile.identity.issuer))
    realm_path = f"/realms/{profile.identity.realm}"
    # Keycloak serves realms at the root; a prefix would need an ingress rewrite this
    # stack does not set up, and tokens would name another issuer.
    # The gateway reaches the issuer at Keycloak's Service and people at the Ingress, both
    # on 443.
    if (
        issuer.scheme != "https"
        or issuer.port not in (None, 443)
        or issuer.path.rstrip("/") != realm_path
    ):
        problems.append(
            (
                ("identity", "issuer"),
                f"{profile.identity.issuer} is not https://HOST{realm_path}, which the "
                "cluster's Keycloak serves",
            )
        )
    problems += _gateway_mounts(profile)
    return problems


def _gateway_mounts(profile: Profile) -> list[tuple[Loc, str]]:
    """The gateway pod mounts one volume per directory; they must not collide or hide
    the image's own directories."""
    fixed: list[tuple[Loc, PurePosixPath]] = [
        (("cluster", "gateway", "models_claim"), PurePosixPath(BUNDLE_ROOT)),
        (("<gateway config>",), PurePosixPath(GATEWAY_CONFIG_DIR)),
        (("<SPIFFE Workload API>",), PurePosixPath(WORKLOAD_API_DIR)),
        (("<scratch>",), PurePosixPath(SCRATCH_DIR)),
    ]
    directories: list[tuple[Loc, PurePosixPath]] = [
        *fixed,
        (("audit", "path"), PurePosixPath(profile.audit.path)),
        (("memory", "data_dir"), PurePosixPath(profile.memory.data_dir)),
        (("audit", "signing_key"), PurePosixPath(profile.audit.signing_key).parent),
        (("policy", "lock", "manifest"), PurePosixPath(profile.policy.lock.manifest).parent),
        (("policy", "lock", "public_key"), PurePosixPath(profile.policy.lock.public_key).parent),
    ]
    problems: list[tuple[Loc, str]] = []
    seen: dict[PurePosixPath, Loc] = {}
    for loc, directory in directories:
        field = ".".join(str(part) for part in loc)
        in_system_tree = any(directory.is_relative_to(tree) for tree in SYSTEM_TREES)
        if str(directory) in SYSTEM_DIRS or in_system_tree:
            problems.append(
                (
                    loc,
                    f"{directory} would be mounted over the image's own directory; use a "
                    "directory of its own, e.g. /etc/sovereign or /var/lib/sovereign/...",
                )
            )
            continue
        for other, other_loc in seen.items():
            lock_pair = {loc[-1], other_loc[-1]} == {"manifest", "public_key"}
            if lock_pair and directory == other:
                continue  # the lock's two files share one ConfigMap mount
            if (
                directory == other
                or directory.is_relative_to(other)
                or other.is_relative_to(directory)
            ):
                other_field = ".".join(str(part) for part in other_loc)
                problems.append(
                    (
                        loc,
                        f"{field} ({directory}) overlaps {other_field} ({other}); the gateway "
                        "mounts each from its own volume",
                    )
                )
                break
        seen.setdefault(directory, loc)
    return problems
