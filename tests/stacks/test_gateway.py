"""The Gateway component: the gateway's pods, their way in, and exactly where they may go."""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

import pytest
from sovereign_gateway.contract import GatewayConfig

from sovereign.distribution.image import REPOSITORY_NAME, load_container_recipe
from sovereign.profile.derived import BUNDLE_ROOT
from sovereign.render import vllm
from stacks.components.base import PRIORITY_SERVING
from stacks.components.gateway import Gateway, GatewayArgs
from stacks.config import (
    GATEWAY_NAMESPACE,
    IDENTITY_NAMESPACE,
    MEMORY_NAMESPACE,
    OPA_PORT,
    POLICY_NAMESPACE,
    RUNTIME_NAMESPACE,
    ConfigError,
)
from stacks.synth import Synthesized
from tests.stacks.harness import SECRETS, datacenter_config, synth

APP = "sovereign-gateway"
GATEWAY_IMAGE = (
    "registry.dc1.internal:5000/sovereign/gateway@sha256:"
    "2d84ede448ca1a195234c42df8e2e99a5a990b4c9f4a5850166a13d303c338ba"
)
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def profile_config(edit: Any) -> dict[str, str]:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    edit(profile)
    cfg["sovereign:profile"] = json.dumps(profile)
    return cfg


def run(
    cfg: dict[str, str] | None = None, keycloak_ip: str | None = None
) -> tuple[list[Synthesized], Any]:
    built: dict[str, Any] = {}

    def build(settings: Any) -> None:
        built["settings"] = settings
        built["gateway"] = Gateway("gateway", GatewayArgs(settings, keycloak_ip=keycloak_ip))

    return synth(build, cfg), built


def find(resources: list[Synthesized], kind: str, name: str) -> dict[str, Any]:
    found = [
        r.manifest()
        for r in resources
        if r.is_kubernetes
        and r.manifest()["kind"] == kind
        and r.manifest()["metadata"]["name"] == name
    ]
    assert len(found) == 1, (kind, name, found)
    return found[0]


def peer(namespace: str, app: str) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "sovereign"}
        },
    }


def canonical(rule: dict[str, Any], key: str) -> str:
    ports = [(p["protocol"], int(p["port"])) for p in rule["ports"]]
    return json.dumps({"peers": rule[key], "ports": ports}, sort_keys=True)


@pytest.fixture(scope="module")
def default() -> tuple[list[Synthesized], Any]:
    return run(keycloak_ip="10.96.0.42")


def pod_of(resources: list[Synthesized]) -> dict[str, Any]:
    return find(resources, "Deployment", APP)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_resources(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    assert [(r.type, r.name) for r in resources if not r.custom] == [
        ("sovereign:gateway:Gateway", "gateway")
    ]
    k8s = [r for r in resources if r.is_kubernetes]
    for r in k8s:
        meta = r.manifest()["metadata"]
        assert meta["namespace"] == GATEWAY_NAMESPACE
        assert r.name == f"{GATEWAY_NAMESPACE}-{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/component"] == "gateway"
    assert sorted((r.manifest()["kind"], r.manifest()["metadata"]["name"]) for r in k8s) == [
        ("ConfigMap", APP),
        ("Deployment", APP),
        ("HorizontalPodAutoscaler", APP),
        ("Ingress", APP),
        ("NetworkPolicy", APP),
        ("PersistentVolumeClaim", "gateway-data"),
        ("PodDisruptionBudget", APP),
        ("Secret", "gateway-memory"),
        ("Service", APP),
        ("ServiceAccount", APP),
    ]
    assert built["gateway"].url == "https://ai.dc1.internal/v1"


def test_config_map_holds_the_rendered_config(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    data = find(resources, "ConfigMap", APP)["data"]
    config = GatewayConfig.model_validate_json(data["config.json"])
    assert config.kind == "datacenter"
    profile = built["settings"].profile
    by_name = {route.name: route for route in config.models}
    vllm_models = [m for m in profile.models if m.engine == "vllm"]
    assert vllm_models
    for model in vllm_models:
        assert by_name[model.name].replicas == [vllm.vllm_service_url(model)]
    # A new config rolls the pods.
    annotations = find(resources, "Deployment", APP)["spec"]["template"]["metadata"]["annotations"]
    assert hashlib.sha256(data["config.json"].encode()).hexdigest() in annotations.values()


def test_deployment(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    deployment = find(resources, "Deployment", APP)["spec"]
    assert deployment["replicas"] == 3
    assert deployment["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/part-of": "sovereign",
    }
    assert (
        deployment["selector"]["matchLabels"].items()
        <= deployment["template"]["metadata"]["labels"].items()
    )
    pod = deployment["template"]["spec"]
    assert pod["runtimeClassName"] == "kata"
    assert pod["priorityClassName"] == PRIORITY_SERVING
    assert pod["serviceAccountName"] == APP
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == GATEWAY_IMAGE
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_mount["readOnly"] is True
    assert container["command"] == [
        "sovereign-gateway",
        "--config",
        config_mount["mountPath"] + "/config.json",
    ]
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", 8000)]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    # /health is the gateway's readiness (503 until its dependencies answer).
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] in ("/metrics", "/openapi.json")
    assert pod["hostAliases"] == [{"ip": "10.96.0.42", "hostnames": ["auth.dc1.internal"]}]


def test_the_pod_runs_the_gateway_image_as_its_recipe_builds_it(
    default: tuple[list[Synthesized], Any],
) -> None:
    """`sovereign gateway image` makes the image the Deployment names: its user is the pods',
    and the command the pods run is its entrypoint, on the image's PATH."""
    recipe, _ = load_container_recipe()
    pod = find(default[0], "Deployment", APP)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsUser"] == recipe.user.uid
    assert container["image"].split("@")[0].endswith(f"/{REPOSITORY_NAME}")
    assert PurePosixPath(recipe.entrypoint[0]) == PurePosixPath(
        recipe.venv, "bin", container["command"][0]
    )
    assert recipe.command == ["--config", container["command"][2]]


def test_no_host_alias_without_keycloak_ip() -> None:
    resources, _ = run()
    assert "hostAliases" not in pod_of(resources)


def test_volumes(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    profile = built["settings"].profile
    pod = pod_of(resources)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    mounts = container["volumeMounts"]
    by_path = {m["mountPath"]: m for m in mounts}
    assert len(by_path) == len(mounts)

    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    audit = by_path[profile.audit.path]
    assert audit["subPathExpr"] == "audit/$(POD_NAME)"
    memory = by_path[profile.memory.data_dir]
    assert memory["subPath"] == "memory"
    assert audit["name"] == memory["name"]
    assert volumes[audit["name"]]["persistentVolumeClaim"] == {"claimName": "gateway-data"}

    lock = by_path["/etc/sovereign"]
    assert lock["readOnly"] is True
    source = volumes[lock["name"]]["configMap"]
    assert source["name"] == "sovereign-compliance-lock"
    assert source["optional"] is False
    assert sorted(item["path"] for item in source["items"]) == ["lock.json", "lock.pub"]

    key = by_path["/var/lib/sovereign/keys"]
    assert key["readOnly"] is True
    secret = volumes[key["name"]]["secret"]
    assert secret["secretName"] == "sovereign-audit-signing-key"
    assert [item["path"] for item in secret["items"]] == ["audit.key"]

    assert "emptyDir" in volumes[by_path["/tmp"]["name"]]


def test_lock_optional_when_not_required_and_split_directories() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["policy"]["lock"] = {
            "required": False,
            "manifest": "/etc/sovereign/lock/lock.json",
            "public_key": "/etc/sovereign/keys/signer.pub",
        }

    resources, _ = run(profile_config(edit))
    pod = pod_of(resources)
    volumes = {v["name"]: v for v in pod["volumes"]}
    by_path = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    manifest = volumes[by_path["/etc/sovereign/lock"]["name"]]["configMap"]
    public_key = volumes[by_path["/etc/sovereign/keys"]["name"]]["configMap"]
    assert manifest["optional"] is True
    assert public_key["optional"] is True
    assert manifest["items"] == [{"key": "lock.json", "path": "lock.json"}]
    assert public_key["items"] == [{"key": "lock.pub", "path": "signer.pub"}]


def test_overlapping_mounts_are_refused_before_the_gateway_exists() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["audit"]["signing_key"] = "/etc/sovereign/audit.key"

    with pytest.raises(ConfigError, match="the gateway mounts each from its own volume"):
        run(profile_config(edit))


def absolute_paths(node: Any, at: str = "") -> dict[str, str]:
    """Every string of the config that is an absolute file path, by where it sits."""
    if isinstance(node, dict):
        return {
            k: v
            for key, value in node.items()
            for k, v in absolute_paths(value, f"{at}.{key}").items()
        }
    if isinstance(node, list):
        return {
            k: v
            for i, value in enumerate(node)
            for k, v in absolute_paths(value, f"{at}[{i}]").items()
        }
    if isinstance(node, str) and node.startswith("/"):
        return {at: node}
    return {}


def assert_every_path_is_mounted(resources: list[Synthesized]) -> dict[str, str]:
    """Each absolute path the gateway's config names lies under one of its pod's mounts;
    returns path -> the volume it lies on."""
    config = json.loads(find(resources, "ConfigMap", APP)["data"]["config.json"])
    (container,) = pod_of(resources)["containers"]
    mounts = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]]
    names = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    paths = absolute_paths(config)
    # Each of these must resolve inside the pod; a renderer change that drops one is a bug.
    for field in (
        ".memory.embeddings.weights",
        ".memory.embeddings.tokenizer",
        ".memory.data_dir",
        ".audit.path",
        ".audit.signing_key",
        ".lock.manifest",
        ".lock.public_key",
    ):
        assert field in paths, field
    on: dict[str, str] = {}
    for field, path in paths.items():
        under = [m for m in mounts if PurePosixPath(path).is_relative_to(m)]
        assert under, f"{field} = {path} lies on no volume of the gateway pod"
        on[field] = names[str(max(under, key=lambda m: len(m.parts)))]
    return on


def test_every_config_path_lies_on_a_mount(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    on = assert_every_path_is_mounted(resources)
    assert on[".memory.embeddings.weights"] == "models"
    assert on[".memory.embeddings.tokenizer"] == "models"


def test_hf_embedding_sources_resolve_on_the_models_volume() -> None:
    def edit(profile: dict[str, Any]) -> None:
        embeddings = profile["memory"].setdefault("embeddings", {})
        embeddings["source"] = "hf:sentence-transformers/all-MiniLM-L6-v2@abc123/onnx/model.onnx"
        embeddings["tokenizer"] = "hf:sentence-transformers/all-MiniLM-L6-v2@abc123/tokenizer.json"

    resources, _ = run(profile_config(edit))
    on = assert_every_path_is_mounted(resources)
    assert on[".memory.embeddings.weights"] == "models"


def test_paths_off_every_mount_are_caught() -> None:
    """The check above can fail: a config path outside the pod's mounts is reported."""
    resources, _ = run()
    configs = [r for r in resources if r.is_kubernetes and r.manifest()["kind"] == "ConfigMap"]
    (config_map,) = configs
    config = json.loads(config_map.manifest()["data"]["config.json"])
    config["memory"]["embeddings"]["weights"] = "/root/.cache/sovereign/tools/minilm/model.onnx"
    config_map.inputs["data"]["config.json"] = json.dumps(config)
    with pytest.raises(AssertionError, match="lies on no volume"):
        assert_every_path_is_mounted(resources)


def test_models_volume_is_the_read_only_claim_at_the_bundle_root(
    default: tuple[list[Synthesized], Any],
) -> None:
    resources, _ = default
    pod = pod_of(resources)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    by_path = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = by_path[BUNDLE_ROOT]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"] == {
        "claimName": "sovereign-gateway-models",
        "readOnly": True,
    }

    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["gateway"]["models_claim"] = "embeddings-ro"

    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_of(run(profile_config(edit))[0])["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert sorted(claims) == ["embeddings-ro", "gateway-data"]


def test_gateway_gets_the_spiffe_workload_api(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    pod = pod_of(resources)
    # The SPIFFE ID names this account; the pod must not run as `default`.
    assert pod["serviceAccountName"] == APP
    (volume,) = [v for v in pod["volumes"] if "csi" in v]
    assert volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == "/run/spire/sockets"
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///run/spire/sockets/spire-agent.sock"


def test_passphrase_only_in_the_secret(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    passphrase = SECRETS["memoryPassphrase"]
    secret = find(resources, "Secret", "gateway-memory")
    assert secret["stringData"] == {"passphrase": passphrase}
    holders = [
        r.name for r in resources if r.is_kubernetes and passphrase in json.dumps(r.manifest())
    ]
    assert holders == [f"{GATEWAY_NAMESPACE}-gateway-memory"]
    env = {e["name"]: e for e in pod_of(resources)["containers"][0]["env"]}
    assert env["SOVEREIGN_MEMORY_PASSPHRASE"] == {
        "name": "SOVEREIGN_MEMORY_PASSPHRASE",
        "valueFrom": {"secretKeyRef": {"name": "gateway-memory", "key": "passphrase"}},
    }


def test_data_claim(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    claim = find(resources, "PersistentVolumeClaim", "gateway-data")["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    assert claim["storageClassName"] == "cephfs"
    assert claim["resources"]["requests"]["storage"] == "50Gi"


def test_service_and_ingress(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    service = find(resources, "Service", APP)["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["ports"]] == [
        ("http", 8000, "http")
    ]
    ingress = find(resources, "Ingress", APP)["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"hosts": ["ai.dc1.internal"], "secretName": "sovereign-gateway-tls"}]
    (rule,) = ingress["rules"]
    assert rule["host"] == "ai.dc1.internal"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/"
    assert path["pathType"] == "Prefix"
    assert path["backend"] == {"service": {"name": APP, "port": {"name": "http"}}}


def test_autoscaler_and_disruption_budget(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    hpa = find(resources, "HorizontalPodAutoscaler", APP)
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP}
    assert spec["minReplicas"] == 3
    assert spec["maxReplicas"] == 12
    assert spec["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]
    pdb = find(resources, "PodDisruptionBudget", APP)["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"]["app.kubernetes.io/name"] == APP


def test_scaling_follows_the_profile() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["gateway"].update(replicas=2, max_replicas=5, cpu_utilization=55)

    resources, _ = run(profile_config(edit))
    spec = find(resources, "HorizontalPodAutoscaler", APP)["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 5)
    assert spec["metrics"][0]["resource"]["target"]["averageUtilization"] == 55
    assert find(resources, "Deployment", APP)["spec"]["replicas"] == 2


def test_service_account(default: tuple[list[Synthesized], Any]) -> None:
    resources, _ = default
    assert find(resources, "ServiceAccount", APP)["automountServiceAccountToken"] is False


def test_network_policy_exact(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    spec = find(resources, "NetworkPolicy", APP)["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == APP
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert [canonical(rule, "from") for rule in spec["ingress"]] == [
        canonical(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                        }
                    }
                ],
                "ports": [{"protocol": "TCP", "port": 8000}],
            },
            "from",
        )
    ]
    profile = built["settings"].profile
    models = {m.name: m for m in profile.models}
    expected = [
        {
            "to": [DNS_PEER],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        {"to": [peer(POLICY_NAMESPACE, "opa")], "ports": [{"protocol": "TCP", "port": OPA_PORT}]},
        {
            "to": [peer(IDENTITY_NAMESPACE, "keycloak")],
            "ports": [{"protocol": "TCP", "port": 8443}],
        },
        *(
            {
                "to": [peer(RUNTIME_NAMESPACE, vllm.vllm_service_name(models[launch.model]))],
                "ports": [{"protocol": "TCP", "port": launch.port}],
            }
            for launch in vllm.vllm_launches(profile)
        ),
        {
            "to": [peer(MEMORY_NAMESPACE, "qdrant")],
            "ports": [{"protocol": "TCP", "port": 6333}, {"protocol": "TCP", "port": 6334}],
        },
    ]
    assert len(expected) == 6  # DNS, OPA, Keycloak, two vLLM servers, Qdrant
    assert sorted(canonical(rule, "to") for rule in spec["egress"]) == sorted(
        canonical(rule, "to") for rule in expected
    )


def test_runtime_class_follows_the_sandbox() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["sandbox"]["runtime"] = "gvisor"
        profile["cluster"]["gpu_runtime"] = "runc"  # GPU pods only; the gateway has none
        # The GPU operator's Kata class applies only with kata.
        profile["cluster"]["gpu_runtime_class"] = None
        profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"

    resources, _ = run(profile_config(edit))
    assert pod_of(resources)["runtimeClassName"] == "gvisor"
