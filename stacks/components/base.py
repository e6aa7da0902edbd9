"""What every component builds its pods and policies from.

Each pod built here runs as a non-root user with a read-only root file system, no
privilege escalation, no capabilities and the RuntimeDefault seccomp profile, and every
container sets requests and limits. `policies/k8s/` enforces the same rules on the
rendered manifests, so a component cannot quietly opt out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

PART_OF = "sovereign"
# The distroless `nonroot` user; images that need another uid pass theirs.
NON_ROOT_UID = 65532
DNS_NAMESPACE = "kube-system"
DNS_PORTS = (53,)

# Names and ports more than one component needs: the gateway's pods (which the others
# admit), Keycloak's TLS listener, Qdrant's gRPC listener, and the taint GPU nodes carry.
GATEWAY_APP = "sovereign-gateway"
KEYCLOAK_HTTPS_PORT = 8443
QDRANT_GRPC_PORT = 6334
# The NVIDIA GPU operator taints GPU nodes with this key whatever resource they expose
# (nvidia.com/gpu, or nvidia.com/pgpu for Kata passthrough).
GPU_TOLERATION_KEY = "nvidia.com/gpu"


def labels(component: str, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": PART_OF}


def metadata(
    name: str, namespace: str | None, component: str, app: str | None = None
) -> k8s.meta.v1.ObjectMetaArgs:
    return k8s.meta.v1.ObjectMetaArgs(
        name=name, namespace=namespace, labels=labels(component, app or name)
    )


def child(
    parent: pulumi.Resource, *, protect: bool = False, **extra: object
) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(parent=parent, protect=protect, **extra)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Resources:
    """Requests and limits; limits default to the requests (Guaranteed QoS)."""

    cpu: str
    memory: str
    cpu_limit: str | None = None
    memory_limit: str | None = None
    extended: Mapping[str, str] = field(default_factory=dict)

    def args(self) -> k8s.core.v1.ResourceRequirementsArgs:
        return k8s.core.v1.ResourceRequirementsArgs(
            requests={"cpu": self.cpu, "memory": self.memory, **self.extended},
            limits={
                "cpu": self.cpu_limit or self.cpu,
                "memory": self.memory_limit or self.memory,
                **self.extended,
            },
        )


def container_security(
    *, run_as_user: int | None = None, privileged: bool = False
) -> k8s.core.v1.SecurityContextArgs:
    if privileged:
        # Only the SPIFFE CSI driver: Bidirectional mount propagation needs it.
        return k8s.core.v1.SecurityContextArgs(
            privileged=True,
            read_only_root_filesystem=True,
            seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
        )
    return k8s.core.v1.SecurityContextArgs(
        run_as_non_root=run_as_user != 0,
        run_as_user=run_as_user,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        privileged=False,
        capabilities=k8s.core.v1.CapabilitiesArgs(drop=["ALL"]),
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )


def container(
    name: str,
    image: str,
    resources: Resources,
    *,
    args: Sequence[str] | None = None,
    command: Sequence[str] | None = None,
    ports: Sequence[tuple[str, int]] = (),
    env: Sequence[k8s.core.v1.EnvVarArgs] = (),
    mounts: Sequence[k8s.core.v1.VolumeMountArgs] = (),
    readiness: k8s.core.v1.ProbeArgs | None = None,
    liveness: k8s.core.v1.ProbeArgs | None = None,
    startup: k8s.core.v1.ProbeArgs | None = None,
    run_as_user: int | None = None,
    privileged: bool = False,
) -> k8s.core.v1.ContainerArgs:
    return k8s.core.v1.ContainerArgs(
        name=name,
        image=image,
        image_pull_policy="IfNotPresent",
        command=list(command) if command is not None else None,
        args=list(args) if args is not None else None,
        ports=[
            k8s.core.v1.ContainerPortArgs(name=port_name, container_port=number)
            for port_name, number in ports
        ]
        or None,
        env=list(env) or None,
        volume_mounts=list(mounts) or None,
        resources=resources.args(),
        readiness_probe=readiness,
        liveness_probe=liveness,
        startup_probe=startup,
        security_context=container_security(run_as_user=run_as_user, privileged=privileged),
    )


def http_probe(
    path: str,
    port: int | str,
    *,
    period: int = 10,
    failures: int = 3,
    delay: int = 0,
    scheme: str | None = None,
) -> k8s.core.v1.ProbeArgs:
    """An HTTP GET probe; `scheme="HTTPS"` for a listener that serves TLS only."""
    return k8s.core.v1.ProbeArgs(
        http_get=k8s.core.v1.HTTPGetActionArgs(path=path, port=port, scheme=scheme),
        period_seconds=period,
        failure_threshold=failures,
        initial_delay_seconds=delay,
        timeout_seconds=5,
    )


def pod_spec(
    containers: Sequence[k8s.core.v1.ContainerArgs],
    *,
    runtime_class: str | None,
    service_account: str | None = None,
    volumes: Sequence[k8s.core.v1.VolumeArgs] = (),
    init_containers: Sequence[k8s.core.v1.ContainerArgs] = (),
    priority_class: str | None = None,
    run_as_user: int = NON_ROOT_UID,
    fs_group: int | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[k8s.core.v1.TolerationArgs] = (),
    host_pid: bool = False,
    restart_policy: str | None = None,
    termination_grace_seconds: int | None = None,
    automount_token: bool | None = None,
    host_aliases: Sequence[k8s.core.v1.HostAliasArgs] = (),
) -> k8s.core.v1.PodSpecArgs:
    """A hardened pod. A named service account gets its API token mounted unless
    `automount_token` says otherwise: an account that only names the pod (to SPIRE) needs
    none."""
    return k8s.core.v1.PodSpecArgs(
        containers=list(containers),
        init_containers=list(init_containers) or None,
        volumes=list(volumes) or None,
        runtime_class_name=runtime_class,
        service_account_name=service_account,
        # Pods that do not talk to the API server get no token to steal.
        automount_service_account_token=(
            service_account is not None if automount_token is None else automount_token
        ),
        host_aliases=list(host_aliases) or None,
        enable_service_links=False,
        priority_class_name=priority_class,
        node_selector=dict(node_selector) if node_selector else None,
        tolerations=list(tolerations) or None,
        host_pid=host_pid or None,
        restart_policy=restart_policy,
        termination_grace_period_seconds=termination_grace_seconds,
        security_context=k8s.core.v1.PodSecurityContextArgs(
            run_as_non_root=run_as_user != 0,
            run_as_user=run_as_user,
            run_as_group=run_as_user,
            fs_group=fs_group if fs_group is not None else run_as_user,
            seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
        ),
    )


def volume_mount(
    name: str,
    path: str,
    *,
    read_only: bool = False,
    sub_path: str | None = None,
    sub_path_expr: str | None = None,
) -> k8s.core.v1.VolumeMountArgs:
    return k8s.core.v1.VolumeMountArgs(
        name=name,
        mount_path=path,
        read_only=read_only,
        sub_path=sub_path,
        sub_path_expr=sub_path_expr,
    )


def empty_dir(name: str, size: str = "64Mi", *, memory: bool = False) -> k8s.core.v1.VolumeArgs:
    """Scratch space for a read-only root file system (/tmp, caches, sockets)."""
    return k8s.core.v1.VolumeArgs(
        name=name,
        empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(
            size_limit=size, medium="Memory" if memory else None
        ),
    )


def config_map_volume(name: str, config_map: str) -> k8s.core.v1.VolumeArgs:
    return k8s.core.v1.VolumeArgs(
        name=name,
        config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(name=config_map, default_mode=0o444),
    )


def secret_volume(name: str, secret: str) -> k8s.core.v1.VolumeArgs:
    return k8s.core.v1.VolumeArgs(
        name=name, secret=k8s.core.v1.SecretVolumeSourceArgs(secret_name=secret, default_mode=0o440)
    )


def pod_peer(namespace: str, name: str) -> k8s.networking.v1.NetworkPolicyPeerArgs:
    """The pods of app `name` in `namespace`."""
    return k8s.networking.v1.NetworkPolicyPeerArgs(
        namespace_selector=k8s.meta.v1.LabelSelectorArgs(
            match_labels={"kubernetes.io/metadata.name": namespace}
        ),
        pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=selector(name)),
    )


def namespace_peer(namespace: str) -> k8s.networking.v1.NetworkPolicyPeerArgs:
    return k8s.networking.v1.NetworkPolicyPeerArgs(
        namespace_selector=k8s.meta.v1.LabelSelectorArgs(
            match_labels={"kubernetes.io/metadata.name": namespace}
        )
    )


def tcp(*ports: int) -> list[k8s.networking.v1.NetworkPolicyPortArgs]:
    return [k8s.networking.v1.NetworkPolicyPortArgs(protocol="TCP", port=port) for port in ports]


def dns_egress() -> k8s.networking.v1.NetworkPolicyEgressRuleArgs:
    """Cluster DNS, which every pod that resolves a Service name needs."""
    return k8s.networking.v1.NetworkPolicyEgressRuleArgs(
        to=[
            k8s.networking.v1.NetworkPolicyPeerArgs(
                namespace_selector=k8s.meta.v1.LabelSelectorArgs(
                    match_labels={"kubernetes.io/metadata.name": DNS_NAMESPACE}
                ),
                pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels={"k8s-app": "kube-dns"}),
            )
        ],
        ports=[
            k8s.networking.v1.NetworkPolicyPortArgs(protocol=protocol, port=port)
            for port in DNS_PORTS
            for protocol in ("UDP", "TCP")
        ],
    )


def allow(
    name: str,
    namespace: str,
    app: str,
    component: str,
    parent: pulumi.Resource,
    *,
    ingress: Sequence[k8s.networking.v1.NetworkPolicyIngressRuleArgs] = (),
    egress: Sequence[k8s.networking.v1.NetworkPolicyEgressRuleArgs] = (),
) -> k8s.networking.v1.NetworkPolicy:
    """An explicit allow for app `app`, on top of the namespace's default deny.

    Both directions are listed in policyTypes, so an empty list still means "nothing".
    """
    return k8s.networking.v1.NetworkPolicy(
        f"{namespace}-{name}",
        metadata=metadata(name, namespace, component, app),
        spec=k8s.networking.v1.NetworkPolicySpecArgs(
            pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=selector(app)),
            policy_types=["Ingress", "Egress"],
            ingress=list(ingress) or None,
            egress=list(egress) or None,
        ),
        opts=child(parent),
    )


def service(
    name: str,
    namespace: str,
    component: str,
    ports: Sequence[tuple[str, int]],
    parent: pulumi.Resource,
    *,
    app: str | None = None,
    headless: bool = False,
    publish_not_ready: bool = False,
) -> k8s.core.v1.Service:
    """A ClusterIP Service for app `app` (default `name`); `publish_not_ready` lists pods
    before they are ready, which peers that must find each other to become ready need."""
    return k8s.core.v1.Service(
        f"{namespace}-{name}",
        metadata=metadata(name, namespace, component, app),
        spec=k8s.core.v1.ServiceSpecArgs(
            type="ClusterIP",
            cluster_ip="None" if headless else None,
            publish_not_ready_addresses=publish_not_ready or None,
            selector=selector(app or name),
            ports=[
                k8s.core.v1.ServicePortArgs(name=port_name, port=port, target_port=port_name)
                for port_name, port in ports
            ],
        ),
        opts=child(parent),
    )


def service_account(
    name: str, namespace: str, component: str, parent: pulumi.Resource
) -> k8s.core.v1.ServiceAccount:
    return k8s.core.v1.ServiceAccount(
        f"{namespace}-{name}",
        metadata=metadata(name, namespace, component),
        automount_service_account_token=False,
        opts=child(parent),
    )


def pdb(
    name: str,
    namespace: str,
    component: str,
    parent: pulumi.Resource,
    *,
    min_available: int | None = None,
    max_unavailable: int | None = None,
) -> k8s.policy.v1.PodDisruptionBudget:
    """A PodDisruptionBudget for app `name`; give exactly one of the two bounds."""
    if (min_available is None) == (max_unavailable is None):
        raise ValueError(f"pdb {namespace}/{name}: give min_available or max_unavailable")
    return k8s.policy.v1.PodDisruptionBudget(
        f"{namespace}-{name}",
        metadata=metadata(name, namespace, component),
        spec=k8s.policy.v1.PodDisruptionBudgetSpecArgs(
            min_available=min_available,
            max_unavailable=max_unavailable,
            selector=k8s.meta.v1.LabelSelectorArgs(match_labels=selector(name)),
        ),
        opts=child(parent),
    )


def ingress(
    name: str,
    namespace: str,
    component: str,
    parent: pulumi.Resource,
    *,
    host: str,
    tls_secret: str,
    class_name: str | None,
    port_name: str,
    annotations: Mapping[str, str] | None = None,
) -> k8s.networking.v1.Ingress:
    """A TLS Ingress sending every path of `host` to the Service `name`'s port `port_name`."""
    meta = k8s.meta.v1.ObjectMetaArgs(
        name=name,
        namespace=namespace,
        labels=labels(component, name),
        annotations=dict(annotations) if annotations else None,
    )
    backend = k8s.networking.v1.IngressBackendArgs(
        service=k8s.networking.v1.IngressServiceBackendArgs(
            name=name, port=k8s.networking.v1.ServiceBackendPortArgs(name=port_name)
        )
    )
    return k8s.networking.v1.Ingress(
        f"{namespace}-{name}",
        metadata=meta,
        spec=k8s.networking.v1.IngressSpecArgs(
            ingress_class_name=class_name,
            tls=[k8s.networking.v1.IngressTLSArgs(hosts=[host], secret_name=tls_secret)],
            rules=[
                k8s.networking.v1.IngressRuleArgs(
                    host=host,
                    http=k8s.networking.v1.HTTPIngressRuleValueArgs(
                        paths=[
                            k8s.networking.v1.HTTPIngressPathArgs(
                                path="/", path_type="Prefix", backend=backend
                            )
                        ]
                    ),
                )
            ],
        ),
        opts=child(parent),
    )


# The PriorityClasses the Platform creates: the control plane of the stack (identity,
# policy, workload identity) outranks serving, which outranks batch jobs.
PRIORITY_CONTROL = "sovereign-control"
PRIORITY_SERVING = "sovereign-serving"
PRIORITY_BATCH = "sovereign-batch"
