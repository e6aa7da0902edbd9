"""Memory: the Qdrant vector store the gateway keeps sealed memory in, and its snapshots.

A StatefulSet (one PersistentVolumeClaim each for the collections and the snapshots),
a Service the gateway reaches it through, a headless Service that gives each pod a
stable name (Qdrant's peers find each other by it when clustered), a PodDisruptionBudget,
and a CronJob that asks every Qdrant peer for a full snapshot on the profile's schedule
and keeps each peer's newest few. Only the gateway and the snapshot job may reach Qdrant;
Qdrant itself talks to nothing but its peers. The chunks Qdrant stores are sealed by the
gateway, so the store never holds plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from stacks.components import base
from stacks.config import (
    GATEWAY_NAMESPACE,
    MEMORY_NAMESPACE,
    QDRANT_PORT,
    QDRANT_SERVICE,
    StackSettings,
)

COMPONENT = "memory"
APP = QDRANT_SERVICE
HEADLESS = f"{QDRANT_SERVICE}-headless"
SNAPSHOT = "qdrant-snapshot"
GRPC_PORT = base.QDRANT_GRPC_PORT
P2P_PORT = 6335
# The qdrant image's unprivileged user; its files in /qdrant belong to it.
QDRANT_UID = 1000
STORAGE_PATH = "/qdrant/storage"
SNAPSHOTS_PATH = "/qdrant/snapshots"
# Qdrant writes a marker file on first start; by default next to its binary, which the
# read-only root file system forbids.
INIT_PATH = "/qdrant/init"
QDRANT_RESOURCES = base.Resources(cpu="2", memory="8Gi")
SNAPSHOT_RESOURCES = base.Resources(cpu="50m", memory="32Mi", cpu_limit="200m", memory_limit="64Mi")
JOB_HISTORY = 3
# A snapshot of a large collection takes a while; a job still running after this is stuck.
SNAPSHOT_DEADLINE_SECONDS = 3600
# Full snapshots each peer keeps; the job deletes older ones so the volume never fills.
SNAPSHOTS_KEPT = 7
# Takes a full snapshot on each host given as an argument, then deletes all but that
# host's newest SNAPSHOTS_KEPT. Full snapshots are node-local, so a cluster needs every
# peer's. POSIX sh with grep and sed (the curl image has no jq). Qdrant names full
# snapshots full-snapshot-YYYY-MM-DD-HH-MM-SS.snapshot, so sorting by name sorts by age.
SNAPSHOT_SCRIPT = (
    "set -eu\n"
    f"keep={SNAPSHOTS_KEPT}\n"
    'for host in "$@"; do\n'
    f'  url="http://$host:{QDRANT_PORT}/snapshots"\n'
    '  curl -fsS --retry 3 -X POST "$url?wait=true" >/dev/null\n'
    '  list=$(curl -fsS --retry 3 "$url")\n'
    '  old=$(printf \'%s\\n\' "$list" | grep -o \'"name": *"[^"]*"\' \\\n'
    '    | sed \'s/^"name": *"//; s/"$//\' | sort -r | sed "1,${keep}d")\n'
    "  for name in $old; do\n"
    '    curl -fsS --retry 3 -X DELETE "$url/$name?wait=true" >/dev/null\n'
    "  done\n"
    '  echo "$host: snapshot taken, older than the newest $keep deleted"\n'
    "done\n"
)


@dataclass(frozen=True)
class MemoryArgs:
    settings: StackSettings


def peer_url(ordinal: int | str) -> str:
    """The p2p address of StatefulSet pod `ordinal` through the headless Service."""
    return f"http://{APP}-{ordinal}.{HEADLESS}.{MEMORY_NAMESPACE}.svc.cluster.local:{P2P_PORT}"


def cluster_script() -> str:
    """Pod 0 founds the cluster; every other pod joins it through pod 0."""
    return (
        'ordinal="${POD_NAME##*-}"\n'
        f'uri="{peer_url("${ordinal}")}"\n'
        'if [ "$ordinal" = "0" ]; then\n'
        '  exec ./entrypoint.sh --uri "$uri"\n'
        "fi\n"
        f'exec ./entrypoint.sh --bootstrap "{peer_url(0)}" --uri "$uri"\n'
    )


def snapshot_hosts(replicas: int) -> list[str]:
    """Every peer by its own name: the Service would snapshot whichever pod it picked."""
    return [
        f"{APP}-{ordinal}.{HEADLESS}.{MEMORY_NAMESPACE}.svc.cluster.local"
        for ordinal in range(replicas)
    ]


class Memory(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: MemoryArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:memory:Memory", name, None, opts)
        settings = args.settings
        qdrant = settings.cluster.qdrant
        clustered = qdrant.replicas > 1
        ns = MEMORY_NAMESPACE

        self.service = base.service(
            QDRANT_SERVICE, ns, COMPONENT, [("http", QDRANT_PORT), ("grpc", GRPC_PORT)], self
        )
        # Peers must resolve each other before any is ready (a Qdrant node reports ready
        # only once it has joined the cluster's consensus).
        self.headless = base.service(
            HEADLESS,
            ns,
            COMPONENT,
            self._ports(clustered),
            self,
            app=APP,
            headless=True,
            publish_not_ready=True,
        )

        env = [
            k8s.core.v1.EnvVarArgs(name="QDRANT__TELEMETRY_DISABLED", value="true"),
            k8s.core.v1.EnvVarArgs(
                name="QDRANT_INIT_FILE_PATH", value=f"{INIT_PATH}/.qdrant-initialized"
            ),
        ]
        command: list[str] | None = None
        if clustered:
            env += [
                k8s.core.v1.EnvVarArgs(name="QDRANT__CLUSTER__ENABLED", value="true"),
                k8s.core.v1.EnvVarArgs(name="QDRANT__CLUSTER__P2P__PORT", value=str(P2P_PORT)),
                k8s.core.v1.EnvVarArgs(
                    name="POD_NAME",
                    value_from=k8s.core.v1.EnvVarSourceArgs(
                        field_ref=k8s.core.v1.ObjectFieldSelectorArgs(field_path="metadata.name")
                    ),
                ),
            ]
            command = ["/bin/bash", "-c", cluster_script()]
        container = base.container(
            APP,
            settings.image("qdrant"),
            QDRANT_RESOURCES,
            command=command,
            ports=self._ports(clustered),
            env=env,
            mounts=[
                base.volume_mount("storage", STORAGE_PATH),
                base.volume_mount("snapshots", SNAPSHOTS_PATH),
                base.volume_mount("init", INIT_PATH),
                base.volume_mount("tmp", "/tmp"),  # noqa: S108 - an emptyDir of its own
            ],
            readiness=base.http_probe("/readyz", QDRANT_PORT),
            liveness=base.http_probe("/livez", QDRANT_PORT, period=20, delay=10),
            run_as_user=QDRANT_UID,
        )
        self.stateful_set = k8s.apps.v1.StatefulSet(
            f"{ns}-{APP}",
            metadata=base.metadata(APP, ns, COMPONENT),
            spec=k8s.apps.v1.StatefulSetSpecArgs(
                replicas=qdrant.replicas,
                service_name=HEADLESS,
                # Peers start together; each waits for the founder on its own. Parallel
                # whatever the replica count: the field is immutable, so scaling a single
                # node out to a cluster must not need it changed.
                pod_management_policy="Parallel",
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(APP)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, APP)),
                    spec=base.pod_spec(
                        [container],
                        runtime_class=settings.runtime_class(),
                        volumes=[base.empty_dir("init", "1Mi"), base.empty_dir("tmp", "1Gi")],
                        priority_class=base.PRIORITY_SERVING,
                        run_as_user=QDRANT_UID,
                        termination_grace_seconds=60,
                    ),
                ),
                volume_claim_templates=[
                    self._claim("storage", qdrant.storage, settings),
                    # A full snapshot can be as large as the collections themselves. The
                    # profile has no size of its own for snapshots (cluster.qdrant holds
                    # storage alone), so they get as much; the job prunes to SNAPSHOTS_KEPT.
                    self._claim("snapshots", qdrant.storage, settings),
                ],
            ),
            opts=base.child(self, protect=settings.protect),
        )
        self.disruption_budget = base.pdb(APP, ns, COMPONENT, self, max_unavailable=1)
        self.snapshot_job = self._snapshot_cron_job(settings)

        ingress = [
            k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                from_=[base.pod_peer(GATEWAY_NAMESPACE, base.GATEWAY_APP)],
                ports=base.tcp(QDRANT_PORT, GRPC_PORT),
            ),
            k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                from_=[base.pod_peer(ns, SNAPSHOT)], ports=base.tcp(QDRANT_PORT)
            ),
        ]
        egress: list[k8s.networking.v1.NetworkPolicyEgressRuleArgs] = []
        if clustered:
            ingress.append(
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[base.pod_peer(ns, APP)], ports=base.tcp(P2P_PORT)
                )
            )
            egress = [
                base.dns_egress(),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=[base.pod_peer(ns, APP)], ports=base.tcp(P2P_PORT)
                ),
            ]
        self.qdrant_policy = base.allow(
            APP, ns, APP, COMPONENT, self, ingress=ingress, egress=egress
        )
        self.snapshot_policy = base.allow(
            SNAPSHOT,
            ns,
            SNAPSHOT,
            COMPONENT,
            self,
            egress=[
                base.dns_egress(),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=[base.pod_peer(ns, APP)], ports=base.tcp(QDRANT_PORT)
                ),
            ],
        )
        self.url = f"http://{QDRANT_SERVICE}.{ns}.svc.cluster.local:{QDRANT_PORT}"
        self.register_outputs({"url": self.url})

    @staticmethod
    def _ports(clustered: bool) -> list[tuple[str, int]]:
        ports = [("http", QDRANT_PORT), ("grpc", GRPC_PORT)]
        return [*ports, ("p2p", P2P_PORT)] if clustered else ports

    @staticmethod
    def _claim(
        name: str, size: str, settings: StackSettings
    ) -> k8s.core.v1.PersistentVolumeClaimArgs:
        return k8s.core.v1.PersistentVolumeClaimArgs(
            metadata=k8s.meta.v1.ObjectMetaArgs(name=name, labels=base.labels(COMPONENT, APP)),
            spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                access_modes=["ReadWriteOnce"],
                storage_class_name=settings.cluster.storage_class,
                resources=k8s.core.v1.VolumeResourceRequirementsArgs(requests={"storage": size}),
            ),
        )

    def _snapshot_cron_job(self, settings: StackSettings) -> k8s.batch.v1.CronJob:
        ns = MEMORY_NAMESPACE
        container = base.container(
            SNAPSHOT,
            settings.image("snapshot"),
            SNAPSHOT_RESOURCES,
            command=[
                "/bin/sh",
                "-c",
                SNAPSHOT_SCRIPT,
                SNAPSHOT,
                *snapshot_hosts(settings.cluster.qdrant.replicas),
            ],
        )
        return k8s.batch.v1.CronJob(
            f"{ns}-{SNAPSHOT}",
            metadata=base.metadata(SNAPSHOT, ns, COMPONENT),
            spec=k8s.batch.v1.CronJobSpecArgs(
                schedule=settings.cluster.qdrant.snapshot_schedule,
                concurrency_policy="Forbid",
                successful_jobs_history_limit=JOB_HISTORY,
                failed_jobs_history_limit=JOB_HISTORY,
                job_template=k8s.batch.v1.JobTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, SNAPSHOT)),
                    spec=k8s.batch.v1.JobSpecArgs(
                        backoff_limit=2,
                        active_deadline_seconds=SNAPSHOT_DEADLINE_SECONDS,
                        template=k8s.core.v1.PodTemplateSpecArgs(
                            metadata=k8s.meta.v1.ObjectMetaArgs(
                                labels=base.labels(COMPONENT, SNAPSHOT)
                            ),
                            spec=base.pod_spec(
                                [container],
                                runtime_class=settings.runtime_class(),
                                priority_class=base.PRIORITY_BATCH,
                                restart_policy="Never",
                            ),
                        ),
                    ),
                ),
            ),
            opts=base.child(self),
        )
