"""Gateway: the sovereign gateway, the only way in from outside the cluster.

A Deployment runs `sovereign-gateway --config` on the config the shared renderer writes
(`sovereign.render.gateway`), behind a Service and a TLS Ingress, scaled by an HPA and
guarded by a PodDisruptionBudget. Its pods share one ReadWriteMany volume: each keeps its
own audit chain in a directory named after the pod, and all share the sealed memory. The
imported bundle's embedding model and tokenizer come read-only from a ReadOnlyMany volume
at the bundle root, where the config's bundle: and hf: paths point. The
compliance lock and the audit signing key come from objects the operator creates, so no
private key passes through Pulumi. Its NetworkPolicy admits the ingress controller alone
and lets the gateway reach exactly DNS, OPA, Keycloak, each vLLM server and Qdrant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import combinations
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pulumi
import pulumi_kubernetes as k8s

from sovereign.profile.derived import BUNDLE_ROOT
from sovereign.profile.types import split_host_port
from sovereign.render.gateway import gateway_config
from sovereign.render.vllm import vllm_launches, vllm_service_name
from stacks.components import base, workload_identity
from stacks.config import (
    GATEWAY_CONFIG_DIR,
    GATEWAY_NAMESPACE,
    IDENTITY_NAMESPACE,
    MEMORY_NAMESPACE,
    OPA_PORT,
    OPA_SERVICE,
    POLICY_NAMESPACE,
    QDRANT_PORT,
    QDRANT_SERVICE,
    RUNTIME_NAMESPACE,
    StackSettings,
)

COMPONENT = "gateway"
APP = base.GATEWAY_APP
KEYCLOAK_APP = "keycloak"
CONFIG_DIR = GATEWAY_CONFIG_DIR
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
DATA_CLAIM = "gateway-data"
MEMORY_SECRET = "gateway-memory"  # noqa: S105 - an object name
PASSPHRASE_KEY = "passphrase"  # noqa: S105 - a key name, not a secret
PASSPHRASE_VARIABLE = "SOVEREIGN_MEMORY_PASSPHRASE"  # noqa: S105 - a variable name
# Created by the operator (docs/datacenter.md): `sovereign lock` output and the audit key.
LOCK_CONFIG_MAP = "sovereign-compliance-lock"
LOCK_MANIFEST_KEY = "lock.json"
LOCK_PUBLIC_KEY_KEY = "lock.pub"
SIGNING_KEY_SECRET = "sovereign-audit-signing-key"  # noqa: S105 - an object name
SIGNING_KEY_KEY = "audit.key"
CONFIG_CHECKSUM = "sovereign.dev/config-sha256"
RESOURCES = base.Resources(cpu="1", memory="2Gi", cpu_limit="2", memory_limit="4Gi")
# Keeps chat streams flowing token by token; the body limit matches the gateway's own.
INGRESS_BUFFERING = "nginx.ingress.kubernetes.io/proxy-buffering"
INGRESS_BODY_SIZE = "nginx.ingress.kubernetes.io/proxy-body-size"


@dataclass(frozen=True)
class GatewayArgs:
    settings: StackSettings
    # Keycloak's Service address: the gateway resolves the issuer's host to it, so token
    # verification reaches Keycloak's own TLS listener, never the public ingress.
    keycloak_ip: pulumi.Input[str] | None = None


def lock_mounts(
    manifest: str, public_key: str, required: bool
) -> tuple[list[k8s.core.v1.VolumeArgs], list[k8s.core.v1.VolumeMountArgs]]:
    """The lock ConfigMap's two files at the profile's paths, one volume per directory."""
    by_dir: dict[str, list[k8s.core.v1.KeyToPathArgs]] = {}
    for key, path in ((LOCK_MANIFEST_KEY, manifest), (LOCK_PUBLIC_KEY_KEY, public_key)):
        where = PurePosixPath(path)
        by_dir.setdefault(str(where.parent), []).append(
            k8s.core.v1.KeyToPathArgs(key=key, path=where.name)
        )
    volumes, mounts = [], []
    for index, (directory, items) in enumerate(by_dir.items()):
        name = f"lock-{index}"
        volumes.append(
            k8s.core.v1.VolumeArgs(
                name=name,
                config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(
                    name=LOCK_CONFIG_MAP, items=items, default_mode=0o444, optional=not required
                ),
            )
        )
        mounts.append(base.volume_mount(name, directory, read_only=True))
    return volumes, mounts


class Gateway(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: GatewayArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:gateway:Gateway", name, None, opts)
        settings = args.settings
        profile = settings.profile
        cluster = settings.cluster
        ns = GATEWAY_NAMESPACE
        _, port = split_host_port(profile.gateway.listen)
        config_json = gateway_config(profile).model_dump_json()

        self.service_account = base.service_account(APP, ns, COMPONENT, self)
        self.config_map = k8s.core.v1.ConfigMap(
            f"{ns}-{APP}",
            metadata=base.metadata(APP, ns, COMPONENT),
            data={CONFIG_KEY: config_json},
            opts=base.child(self),
        )
        self.memory_secret = k8s.core.v1.Secret(
            f"{ns}-{MEMORY_SECRET}",
            metadata=base.metadata(MEMORY_SECRET, ns, COMPONENT, APP),
            type="Opaque",
            string_data={PASSPHRASE_KEY: settings.secrets["memoryPassphrase"]},
            opts=base.child(self),
        )
        self.data_claim = k8s.core.v1.PersistentVolumeClaim(
            f"{ns}-{DATA_CLAIM}",
            metadata=base.metadata(DATA_CLAIM, ns, COMPONENT, APP),
            spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                access_modes=["ReadWriteMany"],
                storage_class_name=cluster.gateway.data_storage_class,
                resources=k8s.core.v1.VolumeResourceRequirementsArgs(
                    requests={"storage": cluster.gateway.data_storage}
                ),
            ),
            opts=base.child(self, protect=settings.protect),
        )

        lock = profile.policy.lock
        lock_volumes, lock_volume_mounts = lock_mounts(
            lock.manifest, lock.public_key, lock.required
        )
        signing_key = PurePosixPath(profile.audit.signing_key)
        mounts = [
            base.volume_mount("config", CONFIG_DIR, read_only=True),
            # One hash chain per pod: two writers on one chain would fork it.
            base.volume_mount("data", profile.audit.path, sub_path_expr="audit/$(POD_NAME)"),
            base.volume_mount("data", profile.memory.data_dir, sub_path="memory"),
            *lock_volume_mounts,
            base.volume_mount("signing-key", str(signing_key.parent), read_only=True),
            # The embedding model and tokenizer (bundle: and hf: sources) of the bundle.
            base.volume_mount("models", BUNDLE_ROOT, read_only=True),
            workload_identity.workload_api_mount(),
            base.volume_mount("tmp", "/tmp"),  # noqa: S108 - an emptyDir of its own
        ]
        paths = [PurePosixPath(str(mount.mount_path)) for mount in mounts]
        # A mount inside another would hide part of it. The bundle root and the SPIFFE
        # socket directory are fixed; the profile's paths must stay clear of them.
        overlaps = [
            f"{a} and {b}"
            for a, b in combinations(paths, 2)
            if a.is_relative_to(b) or b.is_relative_to(a)
        ]
        if overlaps:
            raise ValueError(
                f"gateway mounts overlap ({'; '.join(overlaps)}): give the lock, the audit "
                "signing key, the audit log and memory their own directories, outside "
                f"{BUNDLE_ROOT} and {workload_identity.WORKLOAD_API_DIR}"
            )
        container = base.container(
            APP,
            settings.image("gateway"),
            RESOURCES,
            command=["sovereign-gateway", "--config", CONFIG_PATH],
            ports=[("http", port)],
            env=[
                k8s.core.v1.EnvVarArgs(
                    name="POD_NAME",
                    value_from=k8s.core.v1.EnvVarSourceArgs(
                        field_ref=k8s.core.v1.ObjectFieldSelectorArgs(field_path="metadata.name")
                    ),
                ),
                k8s.core.v1.EnvVarArgs(
                    name=PASSPHRASE_VARIABLE,
                    value_from=k8s.core.v1.EnvVarSourceArgs(
                        secret_key_ref=k8s.core.v1.SecretKeySelectorArgs(
                            name=MEMORY_SECRET, key=PASSPHRASE_KEY
                        )
                    ),
                ),
                workload_identity.workload_api_env(),
            ],
            mounts=mounts,
            # /health answers 503 until OPA, Keycloak, the audit log, the lock and memory
            # are ready; /metrics answers whenever the process serves at all.
            readiness=base.http_probe("/health", "http"),
            liveness=base.http_probe("/metrics", "http", period=20),
            startup=base.http_probe("/metrics", "http", period=5, failures=60),
        )
        host_aliases: list[k8s.core.v1.HostAliasArgs] = []
        if args.keycloak_ip is not None:
            issuer_host = urlsplit(str(profile.identity.issuer)).hostname or ""
            host_aliases.append(
                k8s.core.v1.HostAliasArgs(ip=args.keycloak_ip, hostnames=[issuer_host])
            )
        pod = base.pod_spec(
            [container],
            runtime_class=settings.runtime_class(),
            # The account names the pod to SPIRE; the gateway never calls the API server,
            # so it gets no token.
            service_account=APP,
            automount_token=False,
            host_aliases=host_aliases,
            volumes=[
                base.config_map_volume("config", APP),
                k8s.core.v1.VolumeArgs(
                    name="data",
                    persistent_volume_claim=k8s.core.v1.PersistentVolumeClaimVolumeSourceArgs(
                        claim_name=DATA_CLAIM
                    ),
                ),
                *lock_volumes,
                k8s.core.v1.VolumeArgs(
                    name="signing-key",
                    secret=k8s.core.v1.SecretVolumeSourceArgs(
                        secret_name=SIGNING_KEY_SECRET,
                        items=[
                            k8s.core.v1.KeyToPathArgs(key=SIGNING_KEY_KEY, path=signing_key.name)
                        ],
                        default_mode=0o440,
                    ),
                ),
                k8s.core.v1.VolumeArgs(
                    name="models",
                    persistent_volume_claim=k8s.core.v1.PersistentVolumeClaimVolumeSourceArgs(
                        claim_name=cluster.gateway.models_claim, read_only=True
                    ),
                ),
                workload_identity.workload_api_volume(),
                base.empty_dir("tmp", "256Mi"),
            ],
            priority_class=base.PRIORITY_SERVING,
        )
        self.deployment = k8s.apps.v1.Deployment(
            f"{ns}-{APP}",
            metadata=base.metadata(APP, ns, COMPONENT),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=cluster.gateway.replicas,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(APP)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=base.labels(COMPONENT, APP),
                        # A new config rolls the pods; the file alone would change under them.
                        annotations={
                            CONFIG_CHECKSUM: hashlib.sha256(config_json.encode()).hexdigest()
                        },
                    ),
                    spec=pod,
                ),
            ),
            # The HPA owns the replica count once the Deployment exists.
            opts=base.child(self, ignore_changes=["spec.replicas"]),
        )
        self.service = base.service(APP, ns, COMPONENT, [("http", port)], self)
        self.ingress = base.ingress(
            APP,
            ns,
            COMPONENT,
            self,
            host=cluster.ingress.host,
            tls_secret=cluster.ingress.tls_secret,
            class_name=cluster.ingress.class_name,
            port_name="http",
            annotations={
                INGRESS_BUFFERING: "off",
                INGRESS_BODY_SIZE: str(profile.gateway.max_body_bytes),
            },
        )
        self.autoscaler = k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{ns}-{APP}",
            metadata=base.metadata(APP, ns, COMPONENT),
            spec=k8s.autoscaling.v2.HorizontalPodAutoscalerSpecArgs(
                scale_target_ref=k8s.autoscaling.v2.CrossVersionObjectReferenceArgs(
                    api_version="apps/v1", kind="Deployment", name=APP
                ),
                min_replicas=cluster.gateway.replicas,
                max_replicas=cluster.gateway.max_replicas,
                metrics=[
                    k8s.autoscaling.v2.MetricSpecArgs(
                        type="Resource",
                        resource=k8s.autoscaling.v2.ResourceMetricSourceArgs(
                            name="cpu",
                            target=k8s.autoscaling.v2.MetricTargetArgs(
                                type="Utilization",
                                average_utilization=cluster.gateway.cpu_utilization,
                            ),
                        ),
                    )
                ],
            ),
            opts=base.child(self),
        )
        self.disruption_budget = base.pdb(APP, ns, COMPONENT, self, max_unavailable=1)
        self.network_policy = base.allow(
            APP,
            ns,
            APP,
            COMPONENT,
            self,
            ingress=[
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[base.namespace_peer(cluster.ingress.controller_namespace)],
                    ports=base.tcp(port),
                )
            ],
            egress=self._egress(settings),
        )
        self.url = f"https://{cluster.ingress.host}/v1"
        self.register_outputs({"url": self.url})

    @staticmethod
    def _egress(settings: StackSettings) -> list[k8s.networking.v1.NetworkPolicyEgressRuleArgs]:
        def to(
            namespace: str, app: str, *ports: int
        ) -> k8s.networking.v1.NetworkPolicyEgressRuleArgs:
            return k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                to=[base.pod_peer(namespace, app)], ports=base.tcp(*ports)
            )

        models = {model.name: model for model in settings.profile.models}
        return [
            base.dns_egress(),
            to(POLICY_NAMESPACE, OPA_SERVICE, OPA_PORT),
            to(IDENTITY_NAMESPACE, KEYCLOAK_APP, base.KEYCLOAK_HTTPS_PORT),
            *(
                to(RUNTIME_NAMESPACE, vllm_service_name(models[launch.model]), launch.port)
                for launch in vllm_launches(settings.profile)
            ),
            to(MEMORY_NAMESPACE, QDRANT_SERVICE, QDRANT_PORT, base.QDRANT_GRPC_PORT),
        ]
