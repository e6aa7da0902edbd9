"""SPIRE: the SPIFFE identities the gateway, vLLM and OPA prove themselves with.

Deploys the SPIRE server (a StatefulSet with its sqlite datastore on a volume, and the
spire-controller-manager beside it turning ClusterSPIFFEID resources into registration
entries), the SPIRE agent on every node, the SPIFFE CSI driver that hands the agent's
Workload API socket to pods without hostPath volumes, and one ClusterSPIFFEID each for
the gateway, vLLM and OPA. The ClusterSPIFFEID CRD is vendored from
spire-controller-manager so the stack needs nothing installed beforehand.

The two node agents (the SPIRE agent and the CSI driver) are the only pods in the stack
that run as root, on host paths, and (the CSI driver alone) privileged; they live in
SPIRE_NODE_NAMESPACE so every other namespace keeps Pod Security `restricted`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from ruamel.yaml import YAML

from stacks.components import base
from stacks.config import (
    GATEWAY_NAMESPACE,
    POLICY_NAMESPACE,
    RUNTIME_NAMESPACE,
    SPIRE_NAMESPACE,
    SPIRE_NODE_NAMESPACE,
    StackSettings,
)

COMPONENT = "workload-identity"
SERVER = "spire-server"
AGENT = "spire-agent"
CSI = "spiffe-csi-driver"
CSI_DRIVER = "csi.spiffe.io"
BUNDLE = "spire-bundle"
SERVER_PORT = 8081
HEALTH_PORT = 8080
CONTROLLER_HEALTH_PORT = 8083
KUBELET_PORT = 10250
API_SERVER_PORTS = (443, 6443)
# Only ClusterSPIFFEIDs of this class are reconciled, so nothing else in the cluster can
# mint identities in this trust domain through our controller manager.
CLASS_NAME = "sovereign"
SPIFFE_ID_PREFIX = "spiffe://{{ .TrustDomain }}"
PSAT_AUDIENCE = "spire-server"
LEADER_ELECTION_LEASE = "sovereign-spire-controller-manager"

# SPIRE images run as uid 1000; the controller manager runs as the same user so that it
# may use the server's admin socket whatever mode the server gives it.
SPIRE_UID = 1000
ROOT_UID = 0

# The pod's own network namespace; the NetworkPolicies decide who reaches it.
ANY_ADDRESS = "0.0.0.0"  # noqa: S104

# Paths inside the containers.
CONFIG_DIR = "/run/spire/config"
DATA_DIR = "/run/spire/data"
BUNDLE_DIR = "/run/spire/bundle"
SERVER_SOCKET_DIR = "/run/spire/admin"
CONTROLLER_SOCKET_DIR = "/spire-server"
PSAT_DIR = "/var/run/secrets/tokens"
SERVICE_ACCOUNT_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

# Host paths the node agents share with the kubelet and with each other.
AGENT_SOCKET_DIR = "/run/spire/agent-sockets"
# The CSI driver bind-mounts AGENT_SOCKET_DIR into each pod, so a pod sees the agent's
# socket under this same file name.
AGENT_SOCKET_NAME = "spire-agent.sock"
AGENT_SOCKET = f"{AGENT_SOCKET_DIR}/{AGENT_SOCKET_NAME}"

# Where the gateway, vLLM and OPA pods find the Workload API: a read-only CSI ephemeral
# volume of the SPIFFE CSI driver, no hostPath. go-spiffe and py-spiffe read the address
# from SPIFFE_ENDPOINT_SOCKET.
# Sandboxes: under Kata the volume is shared into the guest over virtio-fs, through which
# a host unix socket does not connect; gVisor connects to it only when runsc runs with
# --host-uds=open. Sandboxed pods therefore get their SVIDs only where the runtime
# supports host sockets; elsewhere the mount is present and the socket refuses connections.
WORKLOAD_API_VOLUME = "spiffe-workload-api"
WORKLOAD_API_DIR = "/run/spire/sockets"
WORKLOAD_API_ENV = "SPIFFE_ENDPOINT_SOCKET"
WORKLOAD_API_SOCKET = f"unix://{WORKLOAD_API_DIR}/{AGENT_SOCKET_NAME}"

# The service accounts the registered workloads run as: the SPIFFE ID names them, and a
# pod under any other account (`default` included) gets no SVID.
GATEWAY_SERVICE_ACCOUNT = base.GATEWAY_APP
VLLM_SERVICE_ACCOUNT = "vllm"
OPA_SERVICE_ACCOUNT = "opa"
CSI_PLUGIN_DIR = f"/var/lib/kubelet/plugins/{CSI_DRIVER}"
KUBELET_PODS_DIR = "/var/lib/kubelet/pods"
KUBELET_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = {"ClusterSPIFFEID": CRD_DIR / "spire.spiffe.io_clusterspiffeids.yaml"}
CR_API_VERSION = "spire.spiffe.io/v1alpha1"


@cache
def _crd(kind: str) -> dict[str, Any]:
    path = CRD_FILES[kind]
    document: dict[str, Any] = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    return document


def custom_resource_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema the vendored CRD declares for `kind` (v1alpha1)."""
    for version in _crd(kind)["spec"]["versions"]:
        if f"{version['name']}" == CR_API_VERSION.split("/")[1]:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{kind}: no {CR_API_VERSION} in the vendored CRD")


def server_address() -> str:
    return f"{SERVER}.{SPIRE_NAMESPACE}.svc.cluster.local"


def server_config(settings: StackSettings) -> dict[str, Any]:
    """server.conf. SPIRE reads JSON as well as HCL, and JSON cannot be mis-quoted."""
    return {
        "server": {
            "bind_address": ANY_ADDRESS,
            "bind_port": str(SERVER_PORT),
            "socket_path": f"{SERVER_SOCKET_DIR}/api.sock",
            "trust_domain": settings.cluster.trust_domain,
            "data_dir": DATA_DIR,
            "log_level": "INFO",
        },
        "plugins": {
            # One server replica, so sqlite on its own volume is enough.
            "DataStore": {
                "sql": {
                    "plugin_data": {
                        "database_type": "sqlite3",
                        "connection_string": f"{DATA_DIR}/datastore.sqlite3",
                    }
                }
            },
            "NodeAttestor": {
                "k8s_psat": {
                    "plugin_data": {
                        "clusters": {
                            settings.profile.name: {
                                # Only the agent's own service account may attest a node.
                                "service_account_allow_list": [f"{SPIRE_NODE_NAMESPACE}:{AGENT}"],
                                "audience": [PSAT_AUDIENCE],
                            }
                        }
                    }
                }
            },
            # The CA keys survive restarts on the same volume as the datastore.
            "KeyManager": {"disk": {"plugin_data": {"keys_path": f"{DATA_DIR}/keys.json"}}},
            # Agents bootstrap trust from this ConfigMap, kept current on CA rotation.
            "Notifier": {
                "k8sbundle": {
                    "plugin_data": {"namespace": SPIRE_NODE_NAMESPACE, "config_map": BUNDLE}
                }
            },
        },
        "health_checks": _health_checks(),
    }


def agent_config(settings: StackSettings) -> dict[str, Any]:
    """agent.conf, JSON like the server's."""
    return {
        "agent": {
            "data_dir": DATA_DIR,
            "log_level": "INFO",
            "server_address": server_address(),
            "server_port": str(SERVER_PORT),
            "socket_path": AGENT_SOCKET,
            "trust_bundle_path": f"{BUNDLE_DIR}/bundle.crt",
            "trust_domain": settings.cluster.trust_domain,
        },
        "plugins": {
            "NodeAttestor": {
                "k8s_psat": {
                    "plugin_data": {
                        "cluster": settings.profile.name,
                        "token_path": f"{PSAT_DIR}/{PSAT_AUDIENCE}",
                    }
                }
            },
            # The agent re-attests after a restart; keys never touch a disk.
            "KeyManager": {"memory": {"plugin_data": {}}},
            "WorkloadAttestor": {
                "k8s": {
                    "plugin_data": {
                        # SPIRE dials https://$MY_NODE_NAME:10250; the pod sets it to the
                        # node's IP, which reaches the kubelet without host networking or
                        # node names in DNS.
                        "node_name_env": "MY_NODE_NAME",
                        "kubelet_secure_port": KUBELET_PORT,
                        # Verify the kubelet: a forged pod list would hand out identities.
                        "skip_kubelet_verification": False,
                        "kubelet_ca_path": SERVICE_ACCOUNT_CA,
                    }
                }
            },
        },
        "health_checks": _health_checks(),
    }


def controller_manager_config(settings: StackSettings) -> dict[str, Any]:
    """The spire-controller-manager's ControllerManagerConfig."""
    return {
        "apiVersion": CR_API_VERSION,
        "kind": "ControllerManagerConfig",
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": f"{ANY_ADDRESS}:{CONTROLLER_HEALTH_PORT}"},
        "leaderElection": {
            "leaderElect": True,
            "resourceName": LEADER_ELECTION_LEASE,
            "resourceNamespace": SPIRE_NAMESPACE,
        },
        "trustDomain": settings.cluster.trust_domain,
        "clusterName": settings.profile.name,
        "className": CLASS_NAME,
        "watchClassless": False,
        "spireServerSocketPath": f"{CONTROLLER_SOCKET_DIR}/api.sock",
        "ignoreNamespaces": ["kube-system", "kube-public", SPIRE_NAMESPACE, SPIRE_NODE_NAMESPACE],
        # Only the CRD this stack installs: watching the others would fail without them.
        "reconcile": {"clusterSPIFFEIDs": True},
    }


def _health_checks() -> dict[str, Any]:
    return {
        "listener_enabled": True,
        "bind_address": ANY_ADDRESS,
        "bind_port": str(HEALTH_PORT),
        "live_path": "/live",
        "ready_path": "/ready",
    }


@dataclass(frozen=True)
class Registration:
    """Which pods get a SPIFFE ID: a namespace and the labels of its pods."""

    name: str
    namespace: str
    pod_labels: dict[str, str]

    service_account: str

    def spiffe_id_template(self) -> str:
        return f"{SPIFFE_ID_PREFIX}/ns/{self.namespace}/sa/{self.service_account}"


def registrations() -> tuple[Registration, ...]:
    part_of = {"app.kubernetes.io/part-of": base.PART_OF}
    return (
        Registration(
            "sovereign-gateway",
            GATEWAY_NAMESPACE,
            {**part_of, "app.kubernetes.io/name": base.GATEWAY_APP},
            GATEWAY_SERVICE_ACCOUNT,
        ),
        # One Deployment per model, each its own name, all under one account: the
        # component label covers them all.
        Registration(
            "sovereign-vllm",
            RUNTIME_NAMESPACE,
            {**part_of, "app.kubernetes.io/component": "runtime"},
            VLLM_SERVICE_ACCOUNT,
        ),
        Registration(
            "sovereign-opa",
            POLICY_NAMESPACE,
            {**part_of, "app.kubernetes.io/name": "opa"},
            OPA_SERVICE_ACCOUNT,
        ),
    )


def cluster_spiffe_id_spec(registration: Registration) -> dict[str, Any]:
    return {
        "className": CLASS_NAME,
        # The ID names the account outright rather than templating the pod's own: a pod
        # that matched the labels under another account would otherwise get an ID of that
        # account (`.../sa/default`), which nobody authorizes.
        "spiffeIDTemplate": registration.spiffe_id_template(),
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": registration.namespace}
        },
        "podSelector": {"matchLabels": dict(registration.pod_labels)},
        # The agent issues the SVID only to a workload that runs as that account.
        "workloadSelectorTemplates": [f"k8s:sa:{registration.service_account}"],
    }


def workload_api_volume() -> k8s.core.v1.VolumeArgs:
    """The SPIFFE CSI driver's ephemeral volume holding the agent's Workload API socket."""
    return k8s.core.v1.VolumeArgs(
        name=WORKLOAD_API_VOLUME,
        csi=k8s.core.v1.CSIVolumeSourceArgs(driver=CSI_DRIVER, read_only=True),
    )


def workload_api_mount() -> k8s.core.v1.VolumeMountArgs:
    return base.volume_mount(WORKLOAD_API_VOLUME, WORKLOAD_API_DIR, read_only=True)


def workload_api_env() -> k8s.core.v1.EnvVarArgs:
    return k8s.core.v1.EnvVarArgs(name=WORKLOAD_API_ENV, value=WORKLOAD_API_SOCKET)


@dataclass(frozen=True)
class WorkloadIdentityArgs:
    settings: StackSettings


class WorkloadIdentity(pulumi.ComponentResource):
    """The SPIRE server, agents, CSI driver and the stack's registration entries."""

    def __init__(
        self, name: str, args: WorkloadIdentityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:workload_identity:WorkloadIdentity", name, None, opts)
        settings = args.settings
        self.trust_domain = settings.cluster.trust_domain
        self.csi_driver = CSI_DRIVER

        crd = self._crd()
        self._server(settings)
        self._agent(settings)
        self._csi_driver(settings)
        for registration in registrations():
            k8s.apiextensions.CustomResource(
                registration.name,
                api_version=CR_API_VERSION,
                kind="ClusterSPIFFEID",
                metadata=base.metadata(registration.name, None, COMPONENT),
                spec=cluster_spiffe_id_spec(registration),
                opts=base.child(self, depends_on=[crd]),
            )
        self.register_outputs(
            {
                "trust_domain": self.trust_domain,
                "csi_driver": self.csi_driver,
                "registrations": [registration.name for registration in registrations()],
            }
        )

    def _crd(self) -> k8s.apiextensions.v1.CustomResourceDefinition:
        document = _crd("ClusterSPIFFEID")
        return k8s.apiextensions.v1.CustomResourceDefinition(
            document["metadata"]["name"],
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=document["metadata"]["name"],
                annotations=document["metadata"].get("annotations"),
                labels=base.labels(COMPONENT, "spire-controller-manager"),
            ),
            spec=document["spec"],
            opts=base.child(self),
        )

    # --- server -------------------------------------------------------------------------

    def _server(self, settings: StackSettings) -> None:
        base.service_account(SERVER, SPIRE_NAMESPACE, COMPONENT, self)
        self._server_rbac()
        k8s.core.v1.ConfigMap(
            f"{SPIRE_NAMESPACE}-{SERVER}",
            metadata=base.metadata(SERVER, SPIRE_NAMESPACE, COMPONENT),
            data={
                "server.conf": json.dumps(server_config(settings), indent=2, sort_keys=True),
                "controller-manager.json": json.dumps(
                    controller_manager_config(settings), indent=2, sort_keys=True
                ),
            },
            opts=base.child(self),
        )
        # The notifier patches the bundle into this ConfigMap; it must exist first.
        k8s.core.v1.ConfigMap(
            f"{SPIRE_NODE_NAMESPACE}-{BUNDLE}",
            metadata=base.metadata(BUNDLE, SPIRE_NODE_NAMESPACE, COMPONENT),
            opts=base.child(self, ignore_changes=["data"]),
        )

        server = base.container(
            SERVER,
            settings.image("spire_server"),
            base.Resources("100m", "256Mi", cpu_limit="500m", memory_limit="512Mi"),
            args=["-config", f"{CONFIG_DIR}/server.conf"],
            ports=[("grpc", SERVER_PORT), ("health", HEALTH_PORT)],
            mounts=[
                base.volume_mount("config", CONFIG_DIR, read_only=True),
                base.volume_mount("data", DATA_DIR),
                base.volume_mount("admin-socket", SERVER_SOCKET_DIR),
            ],
            readiness=base.http_probe("/ready", "health"),
            liveness=base.http_probe("/live", "health", delay=15),
        )
        controller_manager = base.container(
            "spire-controller-manager",
            settings.image("spire_controller_manager"),
            base.Resources("50m", "128Mi", cpu_limit="200m", memory_limit="256Mi"),
            args=[f"--config={CONFIG_DIR}/controller-manager.json"],
            ports=[("cm-health", CONTROLLER_HEALTH_PORT)],
            # The ClusterSPIFFEIDs come from this stack and are checked against the CRD's
            # schema; without the webhook the manager needs no rights on admission
            # configuration and no ingress from the API server.
            env=[k8s.core.v1.EnvVarArgs(name="ENABLE_WEBHOOKS", value="false")],
            mounts=[
                base.volume_mount("config", CONFIG_DIR, read_only=True),
                base.volume_mount("admin-socket", CONTROLLER_SOCKET_DIR, read_only=True),
            ],
            readiness=base.http_probe("/readyz", "cm-health"),
            liveness=base.http_probe("/healthz", "cm-health", delay=15),
        )
        k8s.apps.v1.StatefulSet(
            f"{SPIRE_NAMESPACE}-{SERVER}",
            metadata=base.metadata(SERVER, SPIRE_NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.StatefulSetSpecArgs(
                # sqlite: one writer.
                replicas=1,
                service_name=SERVER,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(SERVER)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, SERVER)),
                    spec=base.pod_spec(
                        [server, controller_manager],
                        runtime_class=settings.runtime_class(),
                        service_account=SERVER,
                        volumes=[
                            base.config_map_volume("config", SERVER),
                            base.empty_dir("admin-socket", "1Mi", memory=True),
                        ],
                        priority_class=base.PRIORITY_CONTROL,
                        run_as_user=SPIRE_UID,
                    ),
                ),
                volume_claim_templates=[
                    k8s.core.v1.PersistentVolumeClaimArgs(
                        metadata=k8s.meta.v1.ObjectMetaArgs(
                            name="data", labels=base.labels(COMPONENT, SERVER)
                        ),
                        spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                            access_modes=["ReadWriteOnce"],
                            storage_class_name=settings.cluster.storage_class,
                            resources=k8s.core.v1.VolumeResourceRequirementsArgs(
                                requests={"storage": settings.cluster.spire_storage}
                            ),
                        ),
                    )
                ],
            ),
            opts=base.child(self, protect=settings.protect),
        )
        base.service(SERVER, SPIRE_NAMESPACE, COMPONENT, [("grpc", SERVER_PORT)], self)

        api_server = [
            k8s.networking.v1.NetworkPolicyPeerArgs(
                ip_block=k8s.networking.v1.IPBlockArgs(cidr=str(cidr))
            )
            for cidr in settings.cluster.api_server_cidrs
        ]
        base.allow(
            SERVER,
            SPIRE_NAMESPACE,
            SERVER,
            COMPONENT,
            self,
            ingress=[
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                    from_=[base.pod_peer(SPIRE_NODE_NAMESPACE, AGENT)], ports=base.tcp(SERVER_PORT)
                )
            ],
            egress=[
                # The controller manager looks up kubernetes.default.svc for the cluster domain.
                base.dns_egress(),
                # TokenReviews for node attestation, the bundle ConfigMap, the controller
                # manager's watches. Service IPs are translated before policy applies, so
                # the API server's own addresses are what to allow.
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=api_server, ports=base.tcp(*API_SERVER_PORTS)
                ),
            ],
        )

    def _server_rbac(self) -> None:
        subject = [
            k8s.rbac.v1.SubjectArgs(kind="ServiceAccount", name=SERVER, namespace=SPIRE_NAMESPACE)
        ]
        cluster_role = f"sovereign-{SERVER}"
        k8s.rbac.v1.ClusterRole(
            cluster_role,
            metadata=base.metadata(cluster_role, None, COMPONENT),
            rules=[
                # k8s_psat: validate the agents' tokens.
                _rule("authentication.k8s.io", ["tokenreviews"], ["create"]),
                # k8s_psat reads the agent's pod and node for selectors; the controller
                # manager watches pods, nodes, namespaces and endpoints to render entries.
                _rule("", ["pods", "nodes", "namespaces", "endpoints"], ["get", "list", "watch"]),
                # The controller manager reads the registrations and reports their status;
                # it never writes them.
                _rule("spire.spiffe.io", ["clusterspiffeids"], ["get", "list", "watch"]),
                _rule("spire.spiffe.io", ["clusterspiffeids/status"], ["get", "patch", "update"]),
            ],
            opts=base.child(self),
        )
        k8s.rbac.v1.ClusterRoleBinding(
            cluster_role,
            metadata=base.metadata(cluster_role, None, COMPONENT),
            role_ref=_role_ref("ClusterRole", cluster_role),
            subjects=subject,
            opts=base.child(self),
        )
        roles: list[tuple[str, str, list[k8s.rbac.v1.PolicyRuleArgs]]] = [
            (
                f"{SERVER}-bundle",
                SPIRE_NODE_NAMESPACE,
                # The k8sbundle notifier: this one ConfigMap, nothing else there.
                [_rule("", ["configmaps"], ["get", "patch"], names=[BUNDLE])],
            ),
            (
                f"{SERVER}-leader-election",
                SPIRE_NAMESPACE,
                [
                    # create cannot be limited by name; the rest can.
                    _rule("coordination.k8s.io", ["leases"], ["create"]),
                    _rule(
                        "coordination.k8s.io",
                        ["leases"],
                        ["get", "update"],
                        names=[LEADER_ELECTION_LEASE],
                    ),
                ],
            ),
        ]
        for role, namespace, rules in roles:
            k8s.rbac.v1.Role(
                f"{namespace}-{role}",
                metadata=base.metadata(role, namespace, COMPONENT),
                rules=rules,
                opts=base.child(self),
            )
            k8s.rbac.v1.RoleBinding(
                f"{namespace}-{role}",
                metadata=base.metadata(role, namespace, COMPONENT),
                role_ref=_role_ref("Role", role),
                subjects=subject,
                opts=base.child(self),
            )

    # --- agent --------------------------------------------------------------------------

    def _agent(self, settings: StackSettings) -> None:
        base.service_account(AGENT, SPIRE_NODE_NAMESPACE, COMPONENT, self)
        cluster_role = f"sovereign-{AGENT}"
        k8s.rbac.v1.ClusterRole(
            cluster_role,
            metadata=base.metadata(cluster_role, None, COMPONENT),
            # The kubelet authorises the attestor's /pods request as nodes/proxy.
            rules=[_rule("", ["pods", "nodes", "nodes/proxy"], ["get"])],
            opts=base.child(self),
        )
        k8s.rbac.v1.ClusterRoleBinding(
            cluster_role,
            metadata=base.metadata(cluster_role, None, COMPONENT),
            role_ref=_role_ref("ClusterRole", cluster_role),
            subjects=[
                k8s.rbac.v1.SubjectArgs(
                    kind="ServiceAccount", name=AGENT, namespace=SPIRE_NODE_NAMESPACE
                )
            ],
            opts=base.child(self),
        )
        k8s.core.v1.ConfigMap(
            f"{SPIRE_NODE_NAMESPACE}-{AGENT}",
            metadata=base.metadata(AGENT, SPIRE_NODE_NAMESPACE, COMPONENT),
            data={"agent.conf": json.dumps(agent_config(settings), indent=2, sort_keys=True)},
            opts=base.child(self),
        )
        agent = base.container(
            AGENT,
            settings.image("spire_agent"),
            base.Resources("50m", "128Mi", cpu_limit="250m", memory_limit="256Mi"),
            args=["-config", f"{CONFIG_DIR}/agent.conf"],
            ports=[("health", HEALTH_PORT)],
            env=[
                k8s.core.v1.EnvVarArgs(
                    name="MY_NODE_NAME",
                    value_from=k8s.core.v1.EnvVarSourceArgs(
                        field_ref=k8s.core.v1.ObjectFieldSelectorArgs(field_path="status.hostIP")
                    ),
                )
            ],
            mounts=[
                base.volume_mount("config", CONFIG_DIR, read_only=True),
                base.volume_mount("bundle", BUNDLE_DIR, read_only=True),
                base.volume_mount("token", PSAT_DIR, read_only=True),
                base.volume_mount("data", DATA_DIR),
                base.volume_mount("agent-sockets", AGENT_SOCKET_DIR),
            ],
            readiness=base.http_probe("/ready", "health"),
            liveness=base.http_probe("/live", "health", delay=15),
            # Root, but with no capabilities: the attestor reads other pods' /proc/<pid>
            # (hence hostPID) and the socket lives in a root-owned host directory that the
            # CSI driver bind-mounts into workloads.
            run_as_user=ROOT_UID,
        )
        self._daemon_set(
            AGENT,
            [agent],
            service_account=AGENT,
            volumes=[
                base.config_map_volume("config", AGENT),
                base.config_map_volume("bundle", BUNDLE),
                k8s.core.v1.VolumeArgs(
                    name="token",
                    projected=k8s.core.v1.ProjectedVolumeSourceArgs(
                        sources=[
                            k8s.core.v1.VolumeProjectionArgs(
                                service_account_token=k8s.core.v1.ServiceAccountTokenProjectionArgs(
                                    audience=PSAT_AUDIENCE,
                                    expiration_seconds=7200,
                                    path=PSAT_AUDIENCE,
                                )
                            )
                        ],
                        default_mode=0o440,
                    ),
                ),
                base.empty_dir("data", "64Mi"),
                _host_path("agent-sockets", AGENT_SOCKET_DIR, "DirectoryOrCreate"),
            ],
            host_pid=True,
        )
        base.allow(
            AGENT,
            SPIRE_NODE_NAMESPACE,
            AGENT,
            COMPONENT,
            self,
            egress=[
                base.dns_egress(),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=[base.pod_peer(SPIRE_NAMESPACE, SERVER)], ports=base.tcp(SERVER_PORT)
                ),
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                    to=[
                        k8s.networking.v1.NetworkPolicyPeerArgs(
                            ip_block=k8s.networking.v1.IPBlockArgs(cidr=str(cidr))
                        )
                        for cidr in settings.cluster.node_cidrs
                    ],
                    ports=base.tcp(KUBELET_PORT),
                ),
            ],
        )

    # --- CSI driver ---------------------------------------------------------------------

    def _csi_driver(self, settings: StackSettings) -> None:
        k8s.storage.v1.CSIDriver(
            CSI_DRIVER,
            metadata=base.metadata(CSI_DRIVER, None, COMPONENT, CSI),
            spec=k8s.storage.v1.CSIDriverSpecArgs(
                # Inline ephemeral volumes only: nothing to provision or attach.
                attach_required=False,
                # The driver checks the mount was asked for by a pod.
                pod_info_on_mount=True,
                # The socket is 0777; changing ownership on it would break other pods.
                fs_group_policy="None",
                volume_lifecycle_modes=["Ephemeral"],
            ),
            opts=base.child(self),
        )
        driver = base.container(
            CSI,
            settings.image("spiffe_csi_driver"),
            base.Resources("10m", "32Mi", cpu_limit="100m", memory_limit="64Mi"),
            args=[
                "-workload-api-socket-dir",
                "/spire-agent-socket",
                "-csi-socket-path",
                "/spiffe-csi/csi.sock",
            ],
            env=[
                k8s.core.v1.EnvVarArgs(
                    name="MY_NODE_NAME",
                    value_from=k8s.core.v1.EnvVarSourceArgs(
                        field_ref=k8s.core.v1.ObjectFieldSelectorArgs(field_path="spec.nodeName")
                    ),
                )
            ],
            mounts=[
                base.volume_mount("agent-sockets", "/spire-agent-socket", read_only=True),
                base.volume_mount("plugin-dir", "/spiffe-csi"),
                # Bind mounts into pods must reach the host: Bidirectional propagation,
                # which only a privileged container may ask for.
                k8s.core.v1.VolumeMountArgs(
                    name="kubelet-pods",
                    mount_path=KUBELET_PODS_DIR,
                    mount_propagation="Bidirectional",
                ),
            ],
            run_as_user=ROOT_UID,
            privileged=True,
        )
        registrar = base.container(
            "node-driver-registrar",
            settings.image("csi_node_driver_registrar"),
            base.Resources("10m", "32Mi", cpu_limit="50m", memory_limit="64Mi"),
            args=[
                "-csi-address",
                "/spiffe-csi/csi.sock",
                "-kubelet-registration-path",
                f"{CSI_PLUGIN_DIR}/csi.sock",
            ],
            mounts=[
                base.volume_mount("plugin-dir", "/spiffe-csi"),
                base.volume_mount("registration", "/registration"),
            ],
            # Root, no capabilities: the kubelet's registration directory is root's.
            run_as_user=ROOT_UID,
        )
        self._daemon_set(
            CSI,
            [driver, registrar],
            service_account=None,
            volumes=[
                _host_path("agent-sockets", AGENT_SOCKET_DIR, "DirectoryOrCreate"),
                _host_path("plugin-dir", CSI_PLUGIN_DIR, "DirectoryOrCreate"),
                _host_path("kubelet-pods", KUBELET_PODS_DIR, "Directory"),
                _host_path("registration", KUBELET_REGISTRY_DIR, "Directory"),
            ],
            host_pid=False,
        )
        # It talks only to the kubelet over a host socket.
        base.allow(CSI, SPIRE_NODE_NAMESPACE, CSI, COMPONENT, self)

    def _daemon_set(
        self,
        name: str,
        containers: Sequence[k8s.core.v1.ContainerArgs],
        *,
        service_account: str | None,
        volumes: Sequence[k8s.core.v1.VolumeArgs],
        host_pid: bool,
    ) -> k8s.apps.v1.DaemonSet:
        return k8s.apps.v1.DaemonSet(
            f"{SPIRE_NODE_NAMESPACE}-{name}",
            metadata=base.metadata(name, SPIRE_NODE_NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.DaemonSetSpecArgs(
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(name)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=base.labels(COMPONENT, name)),
                    spec=base.pod_spec(
                        containers,
                        # No RuntimeClass on purpose: a sandbox (gVisor, Kata) has its own
                        # kernel, so the agent would not see the host's PIDs and the CSI
                        # driver's mounts would not reach the kubelet. These two node agents
                        # run in the host runtime; the guardrails exempt exactly them.
                        runtime_class=None,
                        service_account=service_account,
                        volumes=volumes,
                        priority_class=base.PRIORITY_CONTROL,
                        run_as_user=ROOT_UID,
                        # Every node, GPU nodes (tainted) included, runs workloads that
                        # need an identity.
                        tolerations=[k8s.core.v1.TolerationArgs(operator="Exists")],
                        host_pid=host_pid,
                    ),
                ),
            ),
            opts=base.child(self),
        )


def _rule(
    group: str, resources: list[str], verbs: list[str], *, names: list[str] | None = None
) -> k8s.rbac.v1.PolicyRuleArgs:
    return k8s.rbac.v1.PolicyRuleArgs(
        api_groups=[group], resources=resources, verbs=verbs, resource_names=names
    )


def _role_ref(kind: str, name: str) -> k8s.rbac.v1.RoleRefArgs:
    return k8s.rbac.v1.RoleRefArgs(api_group="rbac.authorization.k8s.io", kind=kind, name=name)


def _host_path(name: str, path: str, kind: str) -> k8s.core.v1.VolumeArgs:
    return k8s.core.v1.VolumeArgs(
        name=name, host_path=k8s.core.v1.HostPathVolumeSourceArgs(path=path, type=kind)
    )
