"""Platform: the namespaces, guard rails and scheduling classes every other component runs in.

Each namespace enforces Pod Security `restricted` and starts from a NetworkPolicy that
denies all ingress and egress, so a component only gets the traffic its own explicit allows
name. The RuntimeClasses let the profile put pods in a gVisor or Kata sandbox; the quotas
and limit ranges keep one runaway workload from starving the rest of the cluster; the
PriorityClasses make the control plane (identity, policy, workload identity) the last to be
evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from stacks import config
from stacks.components import base
from stacks.config import StackSettings

COMPONENT = "platform"
NAMESPACES = (
    config.IDENTITY_NAMESPACE,
    config.POLICY_NAMESPACE,
    config.SPIRE_NAMESPACE,
    config.SPIRE_NODE_NAMESPACE,
    config.MEMORY_NAMESPACE,
    config.RUNTIME_NAMESPACE,
    config.GATEWAY_NAMESPACE,
)
PSS = "pod-security.kubernetes.io"
DEFAULT_DENY = "default-deny"

# Kata boots a small VM per pod; its memory and vCPU are charged to the pod so that the
# scheduler and the quotas see what the node really spends.
KATA_OVERHEAD = {"cpu": "250m", "memory": "160Mi"}

PRIORITIES = (
    # name, value, preemption policy
    (base.PRIORITY_CONTROL, 100000, "PreemptLowerPriority"),
    (base.PRIORITY_SERVING, 50000, "PreemptLowerPriority"),
    # Batch work waits for room rather than evicting anything already running.
    (base.PRIORITY_BATCH, 1000, "Never"),
)


@dataclass(frozen=True)
class Budget:
    """What one namespace may spend: a pod count times a per-pod ceiling.

    The per-pod ceiling includes the Kata overhead, and doubles as the LimitRange's
    largest container, so a pod that fits the ceiling always fits the quota.
    """

    pods: int
    cpu_m: int
    memory_mi: int
    cpu_limit_m: int
    memory_limit_mi: int
    gpus: int | None = None
    # The extended resource the GPUs are counted in (cluster.gpu_resource).
    gpu_resource: str = "nvidia.com/gpu"
    # Added to the pod figures: the GPU pods' CPU and memory scale with the GPUs.
    extra_cpu_m: int = 0
    extra_memory_mi: int = 0
    max_cpu_m: int | None = None
    max_memory_mi: int | None = None

    def hard(self) -> dict[str, str]:
        hard = {
            "pods": str(self.pods),
            "requests.cpu": f"{self.pods * self.cpu_m + self.extra_cpu_m}m",
            "requests.memory": f"{self.pods * self.memory_mi + self.extra_memory_mi}Mi",
            "limits.cpu": f"{self.pods * self.cpu_limit_m + self.extra_cpu_m}m",
            "limits.memory": f"{self.pods * self.memory_limit_mi + self.extra_memory_mi}Mi",
            # Outside traffic comes in through the ingress controller only.
            "services.loadbalancers": "0",
            "services.nodeports": "0",
        }
        if self.gpus is not None:
            hard[f"requests.{self.gpu_resource}"] = str(self.gpus)
        return hard

    def container_max(self) -> dict[str, str]:
        return {
            "cpu": f"{self.max_cpu_m or self.cpu_limit_m}m",
            "memory": f"{self.max_memory_mi or self.memory_limit_mi}Mi",
        }


# What a container gets when it names no resources of its own (every component's pods do,
# these only catch stray ones); both fit inside every namespace's container maximum.
DEFAULT_LIMIT = {"cpu": "500m", "memory": "512Mi"}
DEFAULT_REQUEST = {"cpu": "100m", "memory": "128Mi"}
# The CPU and memory a vLLM pod may use per GPU it holds (tokenizer workers, pinned host
# memory for the KV cache swap, the /dev/shm tensor-parallel workers share).
CPU_PER_GPU_M = 16000
MEMORY_PER_GPU_MI = 128 * 1024


def gpu_total(settings: StackSettings) -> int:
    """The NVIDIA GPUs the profile's nodes hold: the most the runtime namespace may request."""
    return sum(node.gpu_count for node in settings.profile.nodes if node.gpu == "nvidia")


def budgets(settings: StackSettings) -> dict[str, Budget]:
    cluster = settings.cluster
    nodes = len(settings.profile.nodes)
    gpus = gpu_total(settings)
    per_node = max(
        (node.gpu_count for node in settings.profile.nodes if node.gpu == "nvidia"), default=0
    )
    return {
        # Keycloak (2 and one in a rollout) and its PostgreSQL.
        config.IDENTITY_NAMESPACE: Budget(8, 1000, 2048, 2500, 4096),
        config.POLICY_NAMESPACE: Budget(6, 500, 512, 1500, 1024),
        config.SPIRE_NAMESPACE: Budget(6, 500, 1024, 2000, 2048),
        # Two DaemonSets (agent, CSI driver): a pod each per node, and a rollout's spare.
        config.SPIRE_NODE_NAMESPACE: Budget(2 * nodes + 4, 500, 512, 1000, 1024),
        # Qdrant replicas, a rollout's spare and the snapshot jobs.
        config.MEMORY_NAMESPACE: Budget(2 * cluster.qdrant.replicas + 4, 4000, 16384, 8000, 32768),
        # Every GPU a pod of its own at most, plus room for CPU-only helpers.
        config.RUNTIME_NAMESPACE: Budget(
            gpus + 4,
            500,
            1024,
            2000,
            4096,
            gpus=gpus,
            gpu_resource=cluster.gpu_resource,
            extra_cpu_m=gpus * CPU_PER_GPU_M,
            extra_memory_mi=gpus * MEMORY_PER_GPU_MI,
            max_cpu_m=max(per_node * CPU_PER_GPU_M, 2000),
            max_memory_mi=max(per_node * MEMORY_PER_GPU_MI, 4096),
        ),
        # The HPA's ceiling plus a rollout's surge.
        config.GATEWAY_NAMESPACE: Budget(cluster.gateway.max_replicas + 4, 1500, 3072, 3000, 5120),
    }


def pod_security(namespace: str) -> dict[str, str]:
    # The SPIRE agent and SPIFFE CSI driver need host paths, host PID and (the CSI driver)
    # privilege, which no Pod Security level short of `privileged` admits. Their namespace
    # alone is exempt; audit and warn stay `restricted` so anything else landing there is
    # still reported.
    enforce = "privileged" if namespace == config.SPIRE_NODE_NAMESPACE else "restricted"
    return {
        f"{PSS}/enforce": enforce,
        f"{PSS}/enforce-version": "latest",
        f"{PSS}/audit": "restricted",
        f"{PSS}/audit-version": "latest",
        f"{PSS}/warn": "restricted",
        f"{PSS}/warn-version": "latest",
    }


@dataclass(frozen=True)
class PlatformArgs:
    settings: StackSettings


class Platform(pulumi.ComponentResource):
    namespaces: dict[str, k8s.core.v1.Namespace]

    def __init__(
        self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:platform:Platform", name, None, opts)
        settings = args.settings
        self.namespaces = {}
        plan = budgets(settings)
        for namespace in NAMESPACES:
            ns = k8s.core.v1.Namespace(
                namespace,
                metadata=k8s.meta.v1.ObjectMetaArgs(
                    name=namespace,
                    labels={**base.labels(COMPONENT, namespace), **pod_security(namespace)},
                ),
                # Deleting a namespace deletes its volumes with it.
                opts=base.child(self, protect=settings.protect),
            )
            self.namespaces[namespace] = ns
            inside = base.child(self, depends_on=[ns])
            k8s.networking.v1.NetworkPolicy(
                f"{namespace}-{DEFAULT_DENY}",
                metadata=base.metadata(DEFAULT_DENY, namespace, COMPONENT),
                spec=k8s.networking.v1.NetworkPolicySpecArgs(
                    pod_selector=k8s.meta.v1.LabelSelectorArgs(),
                    policy_types=["Ingress", "Egress"],
                ),
                opts=inside,
            )
            budget = plan[namespace]
            k8s.core.v1.ResourceQuota(
                f"{namespace}-quota",
                metadata=base.metadata("quota", namespace, COMPONENT),
                spec=k8s.core.v1.ResourceQuotaSpecArgs(hard=budget.hard()),
                opts=inside,
            )
            k8s.core.v1.LimitRange(
                f"{namespace}-limits",
                metadata=base.metadata("limits", namespace, COMPONENT),
                spec=k8s.core.v1.LimitRangeSpecArgs(
                    limits=[
                        k8s.core.v1.LimitRangeItemArgs(
                            type="Container",
                            default=DEFAULT_LIMIT,
                            default_request=DEFAULT_REQUEST,
                            max=budget.container_max(),
                        )
                    ]
                ),
                opts=inside,
            )

        k8s.node.v1.RuntimeClass(
            "gvisor",
            metadata=base.metadata("gvisor", None, COMPONENT),
            handler="runsc",
            opts=base.child(self),
        )
        k8s.node.v1.RuntimeClass(
            "kata",
            metadata=base.metadata("kata", None, COMPONENT),
            handler="kata",
            overhead=k8s.node.v1.OverheadArgs(pod_fixed=KATA_OVERHEAD),
            opts=base.child(self),
        )
        for priority, value, preemption in PRIORITIES:
            k8s.scheduling.v1.PriorityClass(
                priority,
                metadata=base.metadata(priority, None, COMPONENT),
                value=value,
                global_default=False,
                preemption_policy=preemption,
                description=f"SovereignStack {priority.removeprefix('sovereign-')} workloads",
                opts=base.child(self),
            )
        self.register_outputs(
            {"namespaces": {key: ns.metadata.name for key, ns in self.namespaces.items()}}
        )
