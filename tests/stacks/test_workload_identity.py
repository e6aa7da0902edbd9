"""WorkloadIdentity: SPIRE server, agent, CSI driver and registrations, under the mock engine."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from stacks.components import base
from stacks.components.workload_identity import (
    CRD_FILES,
    WorkloadIdentity,
    WorkloadIdentityArgs,
    custom_resource_schema,
)
from stacks.config import (
    GATEWAY_NAMESPACE,
    POLICY_NAMESPACE,
    RUNTIME_NAMESPACE,
    SPIRE_NAMESPACE,
    SPIRE_NODE_NAMESPACE,
    StackSettings,
)
from stacks.synth import Synthesized
from tests.stacks.harness import datacenter_config, synth

TOKEN = "sovereign:workload_identity:WorkloadIdentity"
REGISTRY = "registry.dc1.internal:5000/"
TRUST_DOMAIN = "dc1.internal"
CLUSTER = "sovereign-dc1"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CSIDriver", "CustomResourceDefinition"}
CLUSTER_SCOPED |= {"ClusterSPIFFEID"}
POD_KINDS = {"StatefulSet", "DaemonSet", "Deployment", "Job", "CronJob"}


def build(settings: StackSettings) -> None:
    WorkloadIdentity("workload-identity", WorkloadIdentityArgs(settings))


def with_profile(edit: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    edit(profile)
    cfg["sovereign:profile"] = json.dumps(profile)
    return cfg


@pytest.fixture(scope="module")
def resources() -> list[Synthesized]:
    return synth(build)


@pytest.fixture(scope="module")
def manifests(resources: list[Synthesized]) -> list[dict[str, Any]]:
    return [r.manifest() for r in resources if r.is_kubernetes]


def find(items: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None):
    found = [
        m
        for m in items
        if m["kind"] == kind
        and m["metadata"]["name"] == name
        and m["metadata"].get("namespace") == namespace
    ]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


def kinds(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in items if m["kind"] == kind]


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found  # type: ignore[no-any-return]


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in spec["volumes"] if v["name"] == name]
    return found  # type: ignore[no-any-return]


def mount(c: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [m for m in c["volumeMounts"] if m["name"] == name]
    return found  # type: ignore[no-any-return]


def server(items: list[dict[str, Any]]) -> dict[str, Any]:
    return find(items, "StatefulSet", "spire-server", SPIRE_NAMESPACE)


def agent(items: list[dict[str, Any]]) -> dict[str, Any]:
    return find(items, "DaemonSet", "spire-agent", SPIRE_NODE_NAMESPACE)


def csi(items: list[dict[str, Any]]) -> dict[str, Any]:
    return find(items, "DaemonSet", "spiffe-csi-driver", SPIRE_NODE_NAMESPACE)


def server_conf(items: list[dict[str, Any]]) -> dict[str, Any]:
    data = find(items, "ConfigMap", "spire-server", SPIRE_NAMESPACE)["data"]
    return json.loads(data["server.conf"])  # type: ignore[no-any-return]


def manager_conf(items: list[dict[str, Any]]) -> dict[str, Any]:
    data = find(items, "ConfigMap", "spire-server", SPIRE_NAMESPACE)["data"]
    return json.loads(data["controller-manager.json"])  # type: ignore[no-any-return]


def agent_conf(items: list[dict[str, Any]]) -> dict[str, Any]:
    data = find(items, "ConfigMap", "spire-agent", SPIRE_NODE_NAMESPACE)["data"]
    return json.loads(data["agent.conf"])  # type: ignore[no-any-return]


def pod_specs(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["metadata"]["name"]: pod(m) for m in items if m["kind"] in POD_KINDS}


# --- the component ---------------------------------------------------------------------


def test_component_token_and_children(resources: list[Synthesized]) -> None:
    components = [r for r in resources if not r.custom]
    assert [(r.type, r.name) for r in components] == [(TOKEN, "workload-identity")]
    names: dict[str, set[str]] = {}
    for r in resources:
        if not r.is_kubernetes:
            continue
        m = r.manifest()
        assert m["metadata"]["name"], r.name
        if m["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in m["metadata"], r.name
        else:
            assert m["metadata"]["namespace"] in (SPIRE_NAMESPACE, SPIRE_NODE_NAMESPACE), r.name
        assert r.name not in names.setdefault(r.type, set()), f"duplicate {r.type} {r.name}"
        names[r.type].add(r.name)
        assert m["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sovereign"


def test_every_container_is_hardened(manifests: list[dict[str, Any]]) -> None:
    specs = pod_specs(manifests)
    assert set(specs) == {"spire-server", "spire-agent", "spiffe-csi-driver"}
    for name, spec in specs.items():
        assert spec["priorityClassName"] == base.PRIORITY_CONTROL, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["enableServiceLinks"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{c['name']}"
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) >= {"cpu", "memory"}, where
            assert c["image"].startswith(REGISTRY), where
            assert "@sha256:" in c["image"], where
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            if not sc.get("privileged"):
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                assert sc["privileged"] is False, where


def test_only_the_node_agents_get_host_access_root_or_privilege(
    manifests: list[dict[str, Any]],
) -> None:
    host_pid, host_path, root, privileged = set(), set(), set(), set()
    for name, spec in pod_specs(manifests).items():
        if spec.get("hostPID"):
            host_pid.add(name)
        if any("hostPath" in v for v in spec.get("volumes", [])):
            host_path.add(name)
        assert not spec.get("hostNetwork"), name
        assert not spec.get("hostIPC"), name
        if spec["securityContext"]["runAsUser"] == 0:
            root.add(name)
        else:
            assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            if c["securityContext"].get("privileged"):
                privileged.add(f"{name}/{c['name']}")
            if c["securityContext"].get("runAsUser") == 0:
                root.add(name)
    agents = {"spire-agent", "spiffe-csi-driver"}
    assert host_path == agents
    assert root == agents
    # The agent maps a caller's PID to its pod; the CSI driver needs no host PIDs.
    assert host_pid == {"spire-agent"}
    assert privileged == {"spiffe-csi-driver/spiffe-csi-driver"}
    for name in agents:
        assert find(manifests, "DaemonSet", name, SPIRE_NODE_NAMESPACE)


# --- server ----------------------------------------------------------------------------


def test_server_statefulset(manifests: list[dict[str, Any]]) -> None:
    sts = server(manifests)
    spec = pod(sts)
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["selector"]["matchLabels"] == base.selector("spire-server")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels.items() >= base.selector("spire-server").items()
    assert spec["serviceAccountName"] == "spire-server"
    assert spec["automountServiceAccountToken"] is True
    assert spec["runtimeClassName"] == "kata"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    srv = container(spec, "spire-server")
    assert srv["image"] == REGISTRY + "spiffe/spire-server@sha256:" + (
        "e6892b1afa83855bfdf7ea289544f576d8bf7363ea760b3bfc546e8c606f91c4"
    )
    assert srv["args"] == ["-config", "/run/spire/config/server.conf"]
    assert {p["name"]: p["containerPort"] for p in srv["ports"]} == {"grpc": 8081, "health": 8080}
    assert srv["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert srv["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["storageClassName"] == "local-nvme"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"] == {"storage": "1Gi"}
    assert mount(srv, "data")["mountPath"] == "/run/spire/data"
    assert volume(spec, "config")["configMap"]["name"] == "spire-server"


def test_controller_manager_shares_the_admin_socket(manifests: list[dict[str, Any]]) -> None:
    spec = pod(server(manifests))
    assert [c["name"] for c in spec["containers"]] == ["spire-server", "spire-controller-manager"]
    srv, cm = container(spec, "spire-server"), container(spec, "spire-controller-manager")
    assert cm["image"] == REGISTRY + "spiffe/spire-controller-manager@sha256:" + (
        "a50e89d1e486f7706a9d88db3ab42cbbe892ad6e287d25238babb3181e442852"
    )
    assert "emptyDir" in volume(spec, "admin-socket")
    assert mount(cm, "admin-socket")["readOnly"] is True
    # Both sides of the socket agree on where it is.
    server_socket = server_conf(manifests)["server"]["socket_path"]
    manager_socket = manager_conf(manifests)["spireServerSocketPath"]
    assert server_socket == mount(srv, "admin-socket")["mountPath"] + "/api.sock"
    assert manager_socket == mount(cm, "admin-socket")["mountPath"] + "/api.sock"
    assert cm["args"] == ["--config=/run/spire/config/controller-manager.json"]
    assert {"name": "ENABLE_WEBHOOKS", "value": "false"} in cm["env"]
    assert cm["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert cm["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_server_config(manifests: list[dict[str, Any]]) -> None:
    conf = server_conf(manifests)
    assert conf["server"]["trust_domain"] == TRUST_DOMAIN
    assert conf["server"]["bind_port"] == "8081"
    plugins = conf["plugins"]
    assert set(plugins) == {"DataStore", "NodeAttestor", "KeyManager", "Notifier"}
    store = plugins["DataStore"]["sql"]["plugin_data"]
    assert store["database_type"] == "sqlite3"
    assert store["connection_string"].startswith("/run/spire/data/")
    assert plugins["KeyManager"] == {
        "disk": {"plugin_data": {"keys_path": "/run/spire/data/keys.json"}}
    }
    psat = plugins["NodeAttestor"]["k8s_psat"]["plugin_data"]["clusters"]
    assert set(psat) == {CLUSTER}
    assert psat[CLUSTER]["service_account_allow_list"] == ["sovereign-spire-node:spire-agent"]
    assert psat[CLUSTER]["audience"] == ["spire-server"]
    assert plugins["Notifier"]["k8sbundle"]["plugin_data"] == {
        "namespace": SPIRE_NODE_NAMESPACE,
        "config_map": "spire-bundle",
    }
    health = conf["health_checks"]
    assert health["listener_enabled"] is True
    assert health["bind_port"] == "8080"
    assert (health["live_path"], health["ready_path"]) == ("/live", "/ready")
    # The bundle the notifier patches exists, empty, where the agents read it.
    bundle = find(manifests, "ConfigMap", "spire-bundle", SPIRE_NODE_NAMESPACE)
    assert "data" not in bundle


def test_controller_manager_config(manifests: list[dict[str, Any]]) -> None:
    conf = manager_conf(manifests)
    assert conf["apiVersion"] == "spire.spiffe.io/v1alpha1"
    assert conf["kind"] == "ControllerManagerConfig"
    assert conf["trustDomain"] == TRUST_DOMAIN
    assert conf["clusterName"] == CLUSTER
    assert conf["className"] == "sovereign"
    assert conf["watchClassless"] is False
    assert conf["reconcile"] == {"clusterSPIFFEIDs": True}
    for namespace in (GATEWAY_NAMESPACE, RUNTIME_NAMESPACE, POLICY_NAMESPACE):
        assert namespace not in conf["ignoreNamespaces"]
    assert conf["leaderElection"]["resourceNamespace"] == SPIRE_NAMESPACE
    lease = conf["leaderElection"]["resourceName"]
    role = find(manifests, "Role", "spire-server-leader-election", SPIRE_NAMESPACE)
    assert any(lease in rule.get("resourceNames", []) for rule in role["rules"])


def test_server_service(manifests: list[dict[str, Any]]) -> None:
    svc = find(manifests, "Service", "spire-server", SPIRE_NAMESPACE)
    assert svc["spec"]["selector"] == base.selector("spire-server")
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 8081, "targetPort": "grpc"}]
    assert svc["spec"]["type"] == "ClusterIP"


def test_trust_domain_and_cluster_follow_the_profile() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["trust_domain"] = "example.test"
        profile["name"] = "other-dc"

    items = [r.manifest() for r in synth(build, with_profile(edit)) if r.is_kubernetes]
    assert server_conf(items)["server"]["trust_domain"] == "example.test"
    assert set(
        server_conf(items)["plugins"]["NodeAttestor"]["k8s_psat"]["plugin_data"]["clusters"]
    ) == {"other-dc"}
    assert agent_conf(items)["agent"]["trust_domain"] == "example.test"
    assert (
        agent_conf(items)["plugins"]["NodeAttestor"]["k8s_psat"]["plugin_data"]["cluster"]
        == "other-dc"
    )
    assert manager_conf(items)["trustDomain"] == "example.test"
    assert manager_conf(items)["clusterName"] == "other-dc"


def test_runtime_class_follows_the_profile_but_never_for_node_agents() -> None:
    # A datacenter profile must sandbox (gvisor or kata); runc is refused by the config.
    def edit(profile: dict[str, Any]) -> None:
        profile["sandbox"]["runtime"] = "gvisor"
        # GPU pods follow the sandbox too; the GPU operator's Kata class applies only with kata.
        profile["cluster"]["gpu_runtime_class"] = None
        profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"

    items = [r.manifest() for r in synth(build, with_profile(edit)) if r.is_kubernetes]
    assert pod(server(items))["runtimeClassName"] == "gvisor"
    assert "runtimeClassName" not in pod(agent(items))
    assert "runtimeClassName" not in pod(csi(items))


def test_node_agents_never_get_a_runtime_class(manifests: list[dict[str, Any]]) -> None:
    # The profile asks for kata: only the server may follow it.
    assert pod(server(manifests))["runtimeClassName"] == "kata"
    assert "runtimeClassName" not in pod(agent(manifests))
    assert "runtimeClassName" not in pod(csi(manifests))


def test_storage_follows_the_profile() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["spire_storage"] = "5Gi"
        profile["cluster"]["storage_class"] = "fast-ssd"

    items = [r.manifest() for r in synth(build, with_profile(edit)) if r.is_kubernetes]
    (claim,) = server(items)["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"] == {"storage": "5Gi"}
    assert claim["spec"]["storageClassName"] == "fast-ssd"


# --- agent -----------------------------------------------------------------------------


def test_agent_daemonset(manifests: list[dict[str, Any]]) -> None:
    ds = agent(manifests)
    spec = pod(ds)
    assert ds["spec"]["selector"]["matchLabels"] == base.selector("spire-agent")
    assert spec["hostPID"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == "spire-agent"
    assert spec["securityContext"]["runAsUser"] == 0
    assert spec["securityContext"]["runAsNonRoot"] is False
    c = container(spec, "spire-agent")
    assert c["image"] == REGISTRY + "spiffe/spire-agent@sha256:" + (
        "c3ce49bacb788ed07e1a3478365f439c81a4d0f5ed5c9f268940d6f079e84e72"
    )
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["args"] == ["-config", "/run/spire/config/agent.conf"]
    assert {
        "name": "MY_NODE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}},
    } in c["env"]
    sockets = volume(spec, "agent-sockets")["hostPath"]
    assert sockets == {"path": "/run/spire/agent-sockets", "type": "DirectoryOrCreate"}
    assert mount(c, "agent-sockets")["mountPath"] == "/run/spire/agent-sockets"
    (source,) = volume(spec, "token")["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "spire-server"
    assert token["expirationSeconds"] <= 86400
    assert volume(spec, "bundle")["configMap"]["name"] == "spire-bundle"
    assert volume(spec, "config")["configMap"]["name"] == "spire-agent"
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    hosts = [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v]
    assert hosts == ["/run/spire/agent-sockets"]


def test_agent_config(manifests: list[dict[str, Any]]) -> None:
    conf = agent_conf(manifests)
    spec = pod(agent(manifests))
    c = container(spec, "spire-agent")
    settings = conf["agent"]
    assert settings["trust_domain"] == TRUST_DOMAIN
    assert (settings["server_address"], settings["server_port"]) == (
        "spire-server.sovereign-spire.svc.cluster.local",
        "8081",
    )
    assert settings["socket_path"] == "/run/spire/agent-sockets/spire-agent.sock"
    bundle_dir = mount(c, "bundle")["mountPath"]
    assert settings["trust_bundle_path"] == f"{bundle_dir}/bundle.crt"
    assert settings["data_dir"] == mount(c, "data")["mountPath"]
    assert "emptyDir" in volume(spec, "data")
    psat = conf["plugins"]["NodeAttestor"]["k8s_psat"]["plugin_data"]
    token = volume(spec, "token")["projected"]["sources"][0]["serviceAccountToken"]
    assert psat == {
        "cluster": CLUSTER,
        "token_path": f"{mount(c, 'token')['mountPath']}/{token['path']}",
    }
    k8s_attestor = conf["plugins"]["WorkloadAttestor"]["k8s"]["plugin_data"]
    assert k8s_attestor["node_name_env"] == "MY_NODE_NAME"
    assert k8s_attestor["node_name_env"] in {e["name"] for e in c["env"]}
    assert k8s_attestor["skip_kubelet_verification"] is False
    assert k8s_attestor["kubelet_secure_port"] == 10250
    assert conf["plugins"]["KeyManager"] == {"memory": {"plugin_data": {}}}
    assert conf["health_checks"]["bind_port"] == "8080"


# --- CSI driver ------------------------------------------------------------------------


def test_csi_driver_object(manifests: list[dict[str, Any]]) -> None:
    driver = find(manifests, "CSIDriver", "csi.spiffe.io")
    assert driver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "fsGroupPolicy": "None",
        "volumeLifecycleModes": ["Ephemeral"],
    }


def test_csi_driver_daemonset(manifests: list[dict[str, Any]]) -> None:
    spec = pod(csi(manifests))
    assert [c["name"] for c in spec["containers"]] == ["spiffe-csi-driver", "node-driver-registrar"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert not spec.get("hostPID")
    hosts = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    assert hosts == {
        "agent-sockets": {"path": "/run/spire/agent-sockets", "type": "DirectoryOrCreate"},
        "plugin-dir": {
            "path": "/var/lib/kubelet/plugins/csi.spiffe.io",
            "type": "DirectoryOrCreate",
        },
        "kubelet-pods": {"path": "/var/lib/kubelet/pods", "type": "Directory"},
        "registration": {"path": "/var/lib/kubelet/plugins_registry", "type": "Directory"},
    }
    driver = container(spec, "spiffe-csi-driver")
    assert driver["image"] == REGISTRY + "spiffe/spiffe-csi-driver@sha256:" + (
        "34f81cbd28729c2c70913495a02216a745c5934379dd4c0ba124e107b11e1a84"
    )
    assert driver["securityContext"]["privileged"] is True
    assert mount(driver, "agent-sockets")["readOnly"] is True
    assert mount(driver, "plugin-dir")["mountPath"] == "/spiffe-csi"
    pods_mount = mount(driver, "kubelet-pods")
    assert pods_mount == {
        "name": "kubelet-pods",
        "mountPath": "/var/lib/kubelet/pods",
        "mountPropagation": "Bidirectional",
    }
    args = driver["args"]
    assert (
        args[args.index("-workload-api-socket-dir") + 1]
        == mount(driver, "agent-sockets")["mountPath"]
    )
    assert args[args.index("-csi-socket-path") + 1] == "/spiffe-csi/csi.sock"
    registrar = container(spec, "node-driver-registrar")
    assert registrar["image"] == REGISTRY + "sig-storage/csi-node-driver-registrar@sha256:" + (
        "26e52cad48fbabf076e3f983a47cdd24978ef6f35055daba479fcd8055b5223e"
    )
    sc = registrar["securityContext"]
    assert sc["privileged"] is False
    assert sc["runAsUser"] == 0
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert mount(registrar, "registration")["mountPath"] == "/registration"
    assert not any(m.get("mountPropagation") for m in registrar["volumeMounts"])
    rargs = registrar["args"]
    assert rargs[rargs.index("-kubelet-registration-path") + 1] == (
        "/var/lib/kubelet/plugins/csi.spiffe.io/csi.sock"
    )


# --- registrations ---------------------------------------------------------------------

EXPECTED_REGISTRATIONS = {
    "sovereign-gateway": (
        GATEWAY_NAMESPACE,
        {"app.kubernetes.io/part-of": "sovereign", "app.kubernetes.io/name": "sovereign-gateway"},
        "sovereign-gateway",
    ),
    "sovereign-vllm": (
        RUNTIME_NAMESPACE,
        {"app.kubernetes.io/part-of": "sovereign", "app.kubernetes.io/component": "runtime"},
        "vllm",
    ),
    "sovereign-opa": (
        POLICY_NAMESPACE,
        {"app.kubernetes.io/part-of": "sovereign", "app.kubernetes.io/name": "opa"},
        "opa",
    ),
}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The API server prunes unknown fields silently; reject them here instead."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def test_cluster_spiffe_ids(manifests: list[dict[str, Any]]) -> None:
    entries = kinds(manifests, "ClusterSPIFFEID")
    assert {e["metadata"]["name"] for e in entries} == set(EXPECTED_REGISTRATIONS)
    schema = strict(custom_resource_schema("ClusterSPIFFEID"))
    for entry in entries:
        jsonschema.validate(entry, schema)
        namespace, pod_labels, account = EXPECTED_REGISTRATIONS[entry["metadata"]["name"]]
        assert entry["apiVersion"] == "spire.spiffe.io/v1alpha1"
        spec = entry["spec"]
        assert spec["className"] == manager_conf(manifests)["className"]
        # The ID names the workload's own account, and only a pod running as that
        # account gets it: never `.../sa/default`.
        assert spec["spiffeIDTemplate"] == (
            f"spiffe://{{{{ .TrustDomain }}}}/ns/{namespace}/sa/{account}"
        )
        assert spec["workloadSelectorTemplates"] == [f"k8s:sa:{account}"]
        assert spec["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": namespace}
        }
        assert spec["podSelector"] == {"matchLabels": pod_labels}


def test_registrations_select_the_labels_workloads_carry(manifests: list[dict[str, Any]]) -> None:
    selectors = {
        e["metadata"]["name"]: e["spec"]["podSelector"]["matchLabels"]
        for e in kinds(manifests, "ClusterSPIFFEID")
    }
    gateway = base.labels("gateway", "sovereign-gateway")
    opa = base.labels("policy", "opa")
    vllm = base.labels("runtime", "vllm-llama-3-1-70b-instruct-fp8")
    assert selectors["sovereign-gateway"].items() <= gateway.items()
    assert selectors["sovereign-opa"].items() <= opa.items()
    assert selectors["sovereign-vllm"].items() <= vllm.items()
    assert not selectors["sovereign-gateway"].items() <= opa.items()
    assert not selectors["sovereign-vllm"].items() <= gateway.items()


def test_the_crd_schema_rejects_bad_registrations(manifests: list[dict[str, Any]]) -> None:
    schema = strict(custom_resource_schema("ClusterSPIFFEID"))
    good = kinds(manifests, "ClusterSPIFFEID")[0]
    typo = copy.deepcopy(good)
    typo["spec"]["spiffeIdTemplate"] = typo["spec"].pop("spiffeIDTemplate")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["podSelector"]["matchLabels"] = ["app"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, schema)


def test_the_crd_is_the_vendored_one(manifests: list[dict[str, Any]]) -> None:
    path = CRD_FILES["ClusterSPIFFEID"]
    text = path.read_text(encoding="utf-8")
    assert "Apache License, Version 2.0" in text
    assert "spire-controller-manager" in text
    vendored = YAML(typ="safe", pure=True).load(text)
    crd = find(manifests, "CustomResourceDefinition", "clusterspiffeids.spire.spiffe.io")
    assert crd["spec"] == vendored["spec"]
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["kind"] == "ClusterSPIFFEID"
    spec_fields = custom_resource_schema("ClusterSPIFFEID")["properties"]["spec"]["properties"]
    assert {"className", "spiffeIDTemplate", "namespaceSelector", "podSelector"} <= set(spec_fields)
    with pytest.raises(KeyError):
        custom_resource_schema("ClusterStaticEntry")


# --- RBAC ------------------------------------------------------------------------------


def rules(
    role: dict[str, Any],
) -> list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return sorted(
        (
            ",".join(r["apiGroups"]),
            tuple(r["resources"]),
            tuple(r["verbs"]),
            tuple(r.get("resourceNames", ())),
        )
        for r in role["rules"]
    )


def test_server_rbac_is_least_privilege(manifests: list[dict[str, Any]]) -> None:
    cluster_role = find(manifests, "ClusterRole", "sovereign-spire-server")
    assert rules(cluster_role) == sorted(
        [
            ("authentication.k8s.io", ("tokenreviews",), ("create",), ()),
            ("", ("pods", "nodes", "namespaces", "endpoints"), ("get", "list", "watch"), ()),
            ("spire.spiffe.io", ("clusterspiffeids",), ("get", "list", "watch"), ()),
            ("spire.spiffe.io", ("clusterspiffeids/status",), ("get", "patch", "update"), ()),
        ]
    )
    bundle = find(manifests, "Role", "spire-server-bundle", SPIRE_NODE_NAMESPACE)
    assert rules(bundle) == [("", ("configmaps",), ("get", "patch"), ("spire-bundle",))]
    election = find(manifests, "Role", "spire-server-leader-election", SPIRE_NAMESPACE)
    lease = manager_conf(manifests)["leaderElection"]["resourceName"]
    assert rules(election) == sorted(
        [
            ("coordination.k8s.io", ("leases",), ("create",), ()),
            ("coordination.k8s.io", ("leases",), ("get", "update"), (lease,)),
        ]
    )
    subject = [{"kind": "ServiceAccount", "name": "spire-server", "namespace": SPIRE_NAMESPACE}]
    binding = find(manifests, "ClusterRoleBinding", "sovereign-spire-server")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "sovereign-spire-server",
    }
    assert binding["subjects"] == subject
    for name, namespace in (
        ("spire-server-bundle", SPIRE_NODE_NAMESPACE),
        ("spire-server-leader-election", SPIRE_NAMESPACE),
    ):
        rb = find(manifests, "RoleBinding", name, namespace)
        assert rb["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": name,
        }
        assert rb["subjects"] == subject
    sa = find(manifests, "ServiceAccount", "spire-server", SPIRE_NAMESPACE)
    assert sa["automountServiceAccountToken"] is False


def test_agent_rbac_is_least_privilege(manifests: list[dict[str, Any]]) -> None:
    role = find(manifests, "ClusterRole", "sovereign-spire-agent")
    assert rules(role) == [("", ("pods", "nodes", "nodes/proxy"), ("get",), ())]
    binding = find(manifests, "ClusterRoleBinding", "sovereign-spire-agent")
    assert binding["roleRef"]["name"] == "sovereign-spire-agent"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "spire-agent", "namespace": SPIRE_NODE_NAMESPACE}
    ]
    assert find(manifests, "ServiceAccount", "spire-agent", SPIRE_NODE_NAMESPACE)
    # Nothing else in the component holds a role.
    assert {r["metadata"]["name"] for r in kinds(manifests, "ClusterRole")} == {
        "sovereign-spire-server",
        "sovereign-spire-agent",
    }
    assert len(kinds(manifests, "Role")) == 2


# --- NetworkPolicies -------------------------------------------------------------------

DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def peer(namespace: str, app: str) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": base.selector(app)},
    }


def tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def test_server_network_policy(manifests: list[dict[str, Any]]) -> None:
    policy = find(manifests, "NetworkPolicy", "spire-server", SPIRE_NAMESPACE)["spec"]
    assert policy["podSelector"] == {"matchLabels": base.selector("spire-server")}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {"from": [peer(SPIRE_NODE_NAMESPACE, "spire-agent")], "ports": tcp(8081)}
    ]
    assert policy["egress"] == [
        DNS,
        {"to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}], "ports": tcp(443, 6443)},
    ]


def test_agent_network_policy(manifests: list[dict[str, Any]]) -> None:
    policy = find(manifests, "NetworkPolicy", "spire-agent", SPIRE_NODE_NAMESPACE)["spec"]
    assert policy["podSelector"] == {"matchLabels": base.selector("spire-agent")}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy
    assert policy["egress"] == [
        DNS,
        {"to": [peer(SPIRE_NAMESPACE, "spire-server")], "ports": tcp(8081)},
        {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": tcp(10250)},
    ]


def test_csi_driver_network_policy_allows_nothing(manifests: list[dict[str, Any]]) -> None:
    policy = find(manifests, "NetworkPolicy", "spiffe-csi-driver", SPIRE_NODE_NAMESPACE)["spec"]
    assert policy["podSelector"] == {"matchLabels": base.selector("spiffe-csi-driver")}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy
    assert "egress" not in policy


def test_network_policies_follow_the_cluster_cidrs() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["api_server_cidrs"] = ["10.1.0.0/28", "10.2.0.0/28"]
        profile["cluster"]["node_cidrs"] = ["10.3.0.0/24", "10.4.0.0/24"]

    items = [r.manifest() for r in synth(build, with_profile(edit)) if r.is_kubernetes]
    server_policy = find(items, "NetworkPolicy", "spire-server", SPIRE_NAMESPACE)["spec"]
    assert server_policy["egress"][1]["to"] == [
        {"ipBlock": {"cidr": "10.1.0.0/28"}},
        {"ipBlock": {"cidr": "10.2.0.0/28"}},
    ]
    agent_policy = find(items, "NetworkPolicy", "spire-agent", SPIRE_NODE_NAMESPACE)["spec"]
    assert agent_policy["egress"][2] == {
        "to": [{"ipBlock": {"cidr": "10.3.0.0/24"}}, {"ipBlock": {"cidr": "10.4.0.0/24"}}],
        "ports": tcp(10250),
    }


def test_registered_workloads_run_as_the_named_account_and_mount_the_workload_api(
    manifests: list[dict[str, Any]],
) -> None:
    """The gateway, vLLM and OPA pods as their components build them, against the entries."""
    from stacks.components.gateway import Gateway, GatewayArgs
    from stacks.components.policy import Policy, PolicyArgs
    from stacks.components.runtime import Runtime, RuntimeArgs

    def workloads(settings: StackSettings) -> None:
        Gateway("gateway", GatewayArgs(settings))
        Runtime("runtime", RuntimeArgs(settings))
        Policy("policy", PolicyArgs(settings))

    built = [r.manifest() for r in synth(workloads) if r.is_kubernetes]
    driver = kinds(manifests, "CSIDriver")[0]["metadata"]["name"]
    socket_name = agent_conf(manifests)["agent"]["socket_path"].rsplit("/", 1)[1]
    accounts = {
        (m["metadata"]["namespace"], m["metadata"]["name"]) for m in kinds(built, "ServiceAccount")
    }
    for entry in kinds(manifests, "ClusterSPIFFEID"):
        spec = entry["spec"]
        namespace = spec["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        wanted = spec["podSelector"]["matchLabels"].items()
        selected = [
            w
            for w in kinds(built, "Deployment")
            if w["metadata"]["namespace"] == namespace
            and wanted <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, entry["metadata"]["name"]
        for workload in selected:
            spec_ = pod(workload)
            account = spec_.get("serviceAccountName", "default")
            assert spec["spiffeIDTemplate"].endswith(f"/ns/{namespace}/sa/{account}")
            assert spec["workloadSelectorTemplates"] == [f"k8s:sa:{account}"]
            assert (namespace, account) in accounts
            assert spec_["automountServiceAccountToken"] is False
            (volume,) = [v for v in spec_["volumes"] if "csi" in v]
            assert volume["csi"] == {"driver": driver, "readOnly": True}
            for c in spec_["containers"]:
                (mounted,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
                assert mounted["readOnly"] is True
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["SPIFFE_ENDPOINT_SOCKET"] == (
                    f"unix://{mounted['mountPath']}/{socket_name}"
                )
