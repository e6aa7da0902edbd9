"""Policy: the OPA servers the gateway asks for every authorization and DLP decision.

They load the gateway's Rego and its data.json, exactly the files `sovereign render` writes,
from a ConfigMap. They answer the gateway alone and make no connection of their own: the
policy is static, no bundle server, no decision-log sink, no telemetry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from sovereign.render.policy import render
from stacks import config
from stacks.components import base, workload_identity
from stacks.config import StackSettings

COMPONENT = "policy"
NAMESPACE = config.POLICY_NAMESPACE
OPA = config.OPA_SERVICE
# The account names the pods to SPIRE (their SPIFFE ID); OPA never calls the API server.
SERVICE_ACCOUNT = workload_identity.OPA_SERVICE_ACCOUNT
POLICY_CONFIG = "opa-policy"
POLICY_DIR = "/policy"
# What render() puts in front of every file; inside the pod the files sit under POLICY_DIR.
RENDERED_PREFIX = "policy/"
DIAGNOSTIC_PORT = 8282
ARGS = [
    "run",
    "--server",
    f"--addr=0.0.0.0:{config.OPA_PORT}",
    f"--diagnostic-addr=0.0.0.0:{DIAGNOSTIC_PORT}",
    "--disable-telemetry",
    "--log-level=info",
    # A ConfigMap volume keeps its files in hidden `..<timestamp>` directories and links
    # them in; loading those too would define every rule twice.
    "--ignore=.*",
    POLICY_DIR,
]


def policy_files(files: Mapping[str, bytes]) -> dict[str, tuple[str, str]]:
    """ConfigMap key -> (path under POLICY_DIR, text) for each rendered policy file.

    ConfigMap keys cannot hold "/", so the key flattens the path and the volume's `items`
    put each file back at its path.
    """
    entries: dict[str, tuple[str, str]] = {}
    for name, content in sorted(files.items()):
        if not name.startswith(RENDERED_PREFIX):
            raise ValueError(f"policy renderer gave {name}, outside {RENDERED_PREFIX}")
        path = name.removeprefix(RENDERED_PREFIX)
        key = path.replace("/", "__")
        if key in entries:
            raise ValueError(f"policy files {entries[key][0]} and {path} share key {key}")
        entries[key] = (path, content.decode("utf-8"))
    return entries


@dataclass(frozen=True)
class PolicyArgs:
    settings: StackSettings


class Policy(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: PolicyArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:policy:Policy", name, None, opts)
        settings = args.settings
        entries = policy_files(render(settings.profile))
        data = {key: text for key, (_, text) in entries.items()}
        k8s.core.v1.ConfigMap(
            f"{NAMESPACE}-{POLICY_CONFIG}",
            metadata=base.metadata(POLICY_CONFIG, NAMESPACE, COMPONENT, OPA),
            data=data,
            opts=base.child(self),
        )
        # OPA reads the files once; a new digest in the template rolls the pods onto new policy.
        digest = hashlib.sha256(
            "".join(f"{key}\0{text}\0" for key, text in sorted(data.items())).encode()
        ).hexdigest()

        container = base.container(
            OPA,
            settings.image("opa"),
            base.Resources(cpu="250m", memory="256Mi", cpu_limit="1", memory_limit="512Mi"),
            args=ARGS,
            ports=[("http", config.OPA_PORT), ("diagnostic", DIAGNOSTIC_PORT)],
            env=[workload_identity.workload_api_env()],
            mounts=[
                base.volume_mount("policy", POLICY_DIR, read_only=True),
                workload_identity.workload_api_mount(),
            ],
            readiness=base.http_probe("/health", DIAGNOSTIC_PORT, period=5),
            liveness=base.http_probe("/health", DIAGNOSTIC_PORT, failures=6),
        )
        base.service_account(SERVICE_ACCOUNT, NAMESPACE, COMPONENT, self)
        k8s.apps.v1.Deployment(
            f"{NAMESPACE}-{OPA}",
            metadata=base.metadata(OPA, NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=2,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(OPA)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=base.labels(COMPONENT, OPA),
                        annotations={"sovereign/policy-sha256": digest},
                    ),
                    spec=base.pod_spec(
                        [container],
                        runtime_class=settings.runtime_class(),
                        priority_class=base.PRIORITY_CONTROL,
                        service_account=SERVICE_ACCOUNT,
                        automount_token=False,
                        volumes=[
                            k8s.core.v1.VolumeArgs(
                                name="policy",
                                config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(
                                    name=POLICY_CONFIG,
                                    default_mode=0o444,
                                    items=[
                                        k8s.core.v1.KeyToPathArgs(key=key, path=path)
                                        for key, (path, _) in entries.items()
                                    ],
                                ),
                            ),
                            workload_identity.workload_api_volume(),
                        ],
                    ),
                ),
            ),
            opts=base.child(self),
        )
        base.service(OPA, NAMESPACE, COMPONENT, [("http", config.OPA_PORT)], self)
        base.pdb(OPA, NAMESPACE, COMPONENT, self, min_available=1)
        base.allow(
            OPA,
            NAMESPACE,
            OPA,
            COMPONENT,
            self,
            ingress=[
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[base.pod_peer(config.GATEWAY_NAMESPACE, base.GATEWAY_APP)],
                    ports=base.tcp(config.OPA_PORT),
                )
            ],
        )
        self.register_outputs(
            {"url": f"http://{OPA}.{NAMESPACE}.svc.cluster.local:{config.OPA_PORT}"}
        )
