"""Platform: namespaces under Pod Security, default deny, runtime and priority classes, quotas."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from stacks import config
from stacks.components import base
from stacks.components.platform import NAMESPACES, Platform, PlatformArgs
from stacks.components.runtime import Runtime, RuntimeArgs
from stacks.synth import Synthesized
from tests.stacks.harness import datacenter_config, synth

PSS = "pod-security.kubernetes.io"
CONSTANTS = {
    config.IDENTITY_NAMESPACE,
    config.POLICY_NAMESPACE,
    config.SPIRE_NAMESPACE,
    config.SPIRE_NODE_NAMESPACE,
    config.MEMORY_NAMESPACE,
    config.RUNTIME_NAMESPACE,
    config.GATEWAY_NAMESPACE,
}


def build(flat: dict[str, str] | None = None) -> tuple[list[Synthesized], dict[str, Any]]:
    captured: dict[str, Any] = {}

    def make(settings: config.StackSettings) -> None:
        captured["platform"] = Platform("platform", PlatformArgs(settings))

    return synth(make, flat), captured


@pytest.fixture(scope="module")
def built() -> tuple[list[Synthesized], dict[str, Any]]:
    return build()


@pytest.fixture(scope="module")
def resources(built: tuple[list[Synthesized], dict[str, Any]]) -> list[Synthesized]:
    return built[0]


def of_kind(resources: list[Synthesized], kind: str) -> list[dict[str, Any]]:
    return [r.manifest() for r in resources if r.is_kubernetes and r.manifest()["kind"] == kind]


def by_namespace(resources: list[Synthesized], kind: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for manifest in of_kind(resources, kind):
        found.setdefault(manifest["metadata"]["namespace"], []).append(manifest)
    return found


def cpu_m(value: str) -> int:
    return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)


def memory_mi(value: str) -> int:
    units = {"Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    match = re.fullmatch(r"(\d+)(Mi|Gi|Ti)", value)
    assert match, f"unexpected memory quantity {value}"
    return int(match.group(1)) * units[match.group(2)]


def with_nodes(nodes: list[dict[str, Any]]) -> dict[str, str]:
    flat = datacenter_config()
    profile = json.loads(flat["sovereign:profile"])
    profile["nodes"] = nodes
    flat["sovereign:profile"] = json.dumps(profile)
    return flat


# The committed profile passes whole GPUs into Kata guests: the GPU operator's resource.
GPU_RESOURCE = "nvidia.com/pgpu"


def gpu_quota(resources: list[Synthesized], gpu_resource: str = GPU_RESOURCE) -> str:
    (quota,) = by_namespace(resources, "ResourceQuota")[config.RUNTIME_NAMESPACE]
    return str(quota["spec"]["hard"][f"requests.{gpu_resource}"])


def test_component_type_token(resources: list[Synthesized]) -> None:
    assert [r.name for r in resources if r.type == "sovereign:platform:Platform"] == ["platform"]


def test_namespace_set_equals_the_constants(
    built: tuple[list[Synthesized], dict[str, Any]],
) -> None:
    resources, captured = built
    names = [m["metadata"]["name"] for m in of_kind(resources, "Namespace")]
    assert len(names) == len(set(names)) == 7
    assert set(names) == CONSTANTS == set(NAMESPACES)
    assert set(captured["platform"].namespaces) == CONSTANTS


def test_namespaces_enforce_pod_security(resources: list[Synthesized]) -> None:
    for manifest in of_kind(resources, "Namespace"):
        name = manifest["metadata"]["name"]
        found = manifest["metadata"]["labels"]
        expected = "privileged" if name == config.SPIRE_NODE_NAMESPACE else "restricted"
        assert found[f"{PSS}/enforce"] == expected, name
        assert found[f"{PSS}/enforce-version"] == "latest", name
        # Even the node agents' namespace reports what restricted would refuse.
        assert found[f"{PSS}/audit"] == "restricted", name
        assert found[f"{PSS}/warn"] == "restricted", name
        assert found["app.kubernetes.io/part-of"] == "sovereign"


def test_only_the_node_agent_namespace_is_privileged(resources: list[Synthesized]) -> None:
    privileged = {
        m["metadata"]["name"]
        for m in of_kind(resources, "Namespace")
        if m["metadata"]["labels"][f"{PSS}/enforce"] != "restricted"
    }
    assert privileged == {config.SPIRE_NODE_NAMESPACE}


def test_every_namespace_denies_all_traffic_by_default(resources: list[Synthesized]) -> None:
    policies = by_namespace(resources, "NetworkPolicy")
    assert set(policies) == CONSTANTS
    for namespace, found in policies.items():
        (deny,) = found
        assert deny["metadata"]["name"] == "default-deny", namespace
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_runtime_classes(resources: list[Synthesized]) -> None:
    classes = {m["metadata"]["name"]: m for m in of_kind(resources, "RuntimeClass")}
    assert set(classes) == {"gvisor", "kata"}
    assert classes["gvisor"]["handler"] == "runsc"
    assert "overhead" not in classes["gvisor"]
    assert classes["kata"]["handler"] == "kata"
    assert classes["kata"]["overhead"] == {"podFixed": {"cpu": "250m", "memory": "160Mi"}}
    # The committed profile's sandbox runtime is one of these classes.
    profile = json.loads(datacenter_config()["sovereign:profile"])
    assert profile["sandbox"]["runtime"] in classes
    assert "namespace" not in classes["kata"]["metadata"]


def test_priority_classes(resources: list[Synthesized]) -> None:
    classes = {m["metadata"]["name"]: m for m in of_kind(resources, "PriorityClass")}
    assert {name: m["value"] for name, m in classes.items()} == {
        base.PRIORITY_CONTROL: 100000,
        base.PRIORITY_SERVING: 50000,
        base.PRIORITY_BATCH: 1000,
    }
    assert classes[base.PRIORITY_BATCH]["preemptionPolicy"] == "Never"
    for name in (base.PRIORITY_CONTROL, base.PRIORITY_SERVING):
        assert classes[name].get("preemptionPolicy", "PreemptLowerPriority") != "Never"
    for manifest in classes.values():
        assert manifest["globalDefault"] is False


def test_every_namespace_has_a_quota_and_a_limit_range(resources: list[Synthesized]) -> None:
    quotas = by_namespace(resources, "ResourceQuota")
    ranges = by_namespace(resources, "LimitRange")
    assert set(quotas) == set(ranges) == CONSTANTS
    for namespace in CONSTANTS:
        (quota,) = quotas[namespace]
        hard = quota["spec"]["hard"]
        for key in ("pods", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"):
            assert key in hard, (namespace, key)
        assert cpu_m(hard["requests.cpu"]) <= cpu_m(hard["limits.cpu"]), namespace
        assert memory_mi(hard["requests.memory"]) <= memory_mi(hard["limits.memory"])
        assert hard["services.loadbalancers"] == "0"
        assert hard["services.nodeports"] == "0"
        (limits,) = ranges[namespace]
        (item,) = limits["spec"]["limits"]
        assert item["type"] == "Container"
        for resource in ("cpu", "memory"):
            parse = cpu_m if resource == "cpu" else memory_mi
            request = parse(item["defaultRequest"][resource])
            default = parse(item["default"][resource])
            ceiling = parse(item["max"][resource])
            assert 0 < request <= default <= ceiling, (namespace, resource)
        # One container at its maximum fits the namespace's quota.
        assert cpu_m(item["max"]["cpu"]) <= cpu_m(hard["limits.cpu"]), namespace
        assert memory_mi(item["max"]["memory"]) <= memory_mi(hard["limits.memory"]), namespace


def test_runtime_quota_holds_every_nvidia_gpu(resources: list[Synthesized]) -> None:
    # gpu-01 and gpu-02 have 8 each; the control plane nodes' default gpu_count of 1 is not a GPU.
    assert gpu_quota(resources) == "16"
    quotas = by_namespace(resources, "ResourceQuota")
    # Only the resource GPU pods request is counted; the plain one is not.
    assert "requests.nvidia.com/gpu" not in quotas[config.RUNTIME_NAMESPACE][0]["spec"]["hard"]
    for namespace, (quota,) in quotas.items():
        if namespace != config.RUNTIME_NAMESPACE:
            assert not any("nvidia.com/" in key for key in quota["spec"]["hard"]), namespace


def test_runtime_quota_follows_the_profile_nodes() -> None:
    nodes: list[dict[str, Any]] = [
        {"name": "cp-01", "role": "controlplane", "gpu": "none", "tpm": "required"},
        {"name": "gpu-01", "role": "worker", "gpu": "nvidia", "gpu_count": 4, "tpm": "required"},
        {"name": "gpu-02", "role": "worker", "gpu": "nvidia", "gpu_count": 2, "tpm": "required"},
        # gpu_count defaults to 1 on a node without GPUs; it must not count.
        {"name": "cpu-01", "role": "worker", "gpu": "none", "tpm": "required"},
    ]
    resources, _ = build(with_nodes(nodes))
    assert gpu_quota(resources) == "6"
    (limits,) = by_namespace(resources, "LimitRange")[config.RUNTIME_NAMESPACE]
    # A vLLM container may span every GPU of the largest node, with CPU and memory to match.
    ceiling = limits["spec"]["limits"][0]["max"]
    assert cpu_m(ceiling["cpu"]) >= 4 * 8000
    assert memory_mi(ceiling["memory"]) >= 4 * 64 * 1024


def test_node_agent_quota_grows_with_the_nodes() -> None:
    def pods(count: int) -> int:
        nodes = [
            {"name": f"n-{i}", "role": "worker", "gpu": "nvidia", "gpu_count": 8}
            for i in range(count)
        ]
        resources, _ = build(with_nodes(nodes))
        (quota,) = by_namespace(resources, "ResourceQuota")[config.SPIRE_NODE_NAMESPACE]
        return int(quota["spec"]["hard"]["pods"])

    small, large = pods(2), pods(20)
    # Two DaemonSets: at least two pods on every node.
    assert small >= 4
    assert large >= 40
    assert large > small


def test_gateway_quota_covers_the_autoscaler_ceiling(resources: list[Synthesized]) -> None:
    (quota,) = by_namespace(resources, "ResourceQuota")[config.GATEWAY_NAMESPACE]
    flat = datacenter_config()
    ceiling = json.loads(flat["sovereign:profile"])["cluster"]["gateway"]["max_replicas"]
    assert int(quota["spec"]["hard"]["pods"]) > ceiling


def test_every_resource_is_named_labelled_and_placed(resources: list[Synthesized]) -> None:
    cluster_scoped = {"Namespace", "RuntimeClass", "PriorityClass"}
    kinds = set()
    for resource in resources:
        if not resource.is_kubernetes:
            continue
        manifest = resource.manifest()
        kinds.add(manifest["kind"])
        meta = manifest["metadata"]
        assert meta["name"], resource.name
        assert meta["labels"]["app.kubernetes.io/part-of"] == "sovereign"
        assert meta["labels"]["app.kubernetes.io/component"] == "platform"
        if manifest["kind"] in cluster_scoped:
            assert "namespace" not in meta, resource.name
        else:
            assert meta["namespace"] in CONSTANTS, resource.name
            assert resource.name == f"{meta['namespace']}-{meta['name']}"
    assert kinds == cluster_scoped | {"NetworkPolicy", "ResourceQuota", "LimitRange"}


def test_logical_names_are_unique_per_type(resources: list[Synthesized]) -> None:
    keys = [(r.type, r.name) for r in resources]
    assert len(keys) == len(set(keys))


def test_every_workload_of_the_stack_fits_its_namespace(stack: list[Synthesized]) -> None:
    """At full scale (HPA ceiling, a pod per node for DaemonSets) with the Kata overhead."""
    manifests = [r.manifest() for r in stack if r.is_kubernetes]
    quotas = {
        m["metadata"]["namespace"]: m["spec"]["hard"]
        for m in manifests
        if m["kind"] == "ResourceQuota"
    }
    ceilings = {
        m["metadata"]["namespace"]: m["spec"]["limits"][0]["max"]
        for m in manifests
        if m["kind"] == "LimitRange"
    }
    overheads = {
        m["metadata"]["name"]: m.get("overhead", {}).get("podFixed", {})
        for m in manifests
        if m["kind"] == "RuntimeClass"
    }
    autoscaled = {
        (m["metadata"]["namespace"], m["spec"]["scaleTargetRef"]["name"]): m["spec"]["maxReplicas"]
        for m in manifests
        if m["kind"] == "HorizontalPodAutoscaler"
    }
    nodes = len(json.loads(datacenter_config()["sovereign:profile"])["nodes"])
    used: dict[str, dict[str, int]] = {}
    workloads = 0
    for manifest in manifests:
        kind, meta = manifest["kind"], manifest["metadata"]
        if kind not in {"Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job"}:
            continue
        workloads += 1
        namespace = meta["namespace"]
        spec = manifest["spec"]
        if kind == "CronJob":
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            count = 1
        else:
            pod = spec["template"]["spec"]
            count = {
                "DaemonSet": nodes,
                "Job": 1,
            }.get(kind, autoscaled.get((namespace, meta["name"]), int(spec.get("replicas", 1))))
        overhead = overheads.get(pod.get("runtimeClassName", ""), {})
        for container in pod["containers"] + pod.get("initContainers", []):
            limits = container["resources"]["limits"]
            assert cpu_m(str(limits["cpu"])) <= cpu_m(ceilings[namespace]["cpu"]), meta["name"]
            assert memory_mi(str(limits["memory"])) <= memory_mi(ceilings[namespace]["memory"])
        total = used.setdefault(namespace, {})
        sums = {
            "pods": 1,
            "requests.cpu": cpu_m(overhead.get("cpu", "0m")),
            "limits.cpu": cpu_m(overhead.get("cpu", "0m")),
            "requests.memory": memory_mi(overhead.get("memory", "0Mi")),
            "limits.memory": memory_mi(overhead.get("memory", "0Mi")),
            f"requests.{GPU_RESOURCE}": 0,
        }
        for container in pod["containers"]:
            resources = container["resources"]
            sums["requests.cpu"] += cpu_m(str(resources["requests"]["cpu"]))
            sums["limits.cpu"] += cpu_m(str(resources["limits"]["cpu"]))
            sums["requests.memory"] += memory_mi(str(resources["requests"]["memory"]))
            sums["limits.memory"] += memory_mi(str(resources["limits"]["memory"]))
            sums[f"requests.{GPU_RESOURCE}"] += int(resources["requests"].get(GPU_RESOURCE, 0))
            assert "nvidia.com/gpu" not in resources["requests"], meta["name"]
        for key, value in sums.items():
            total[key] = total.get(key, 0) + count * value
    assert workloads > 0
    # The vLLM pods' GPUs are counted, and fit the runtime namespace's quota.
    assert used[config.RUNTIME_NAMESPACE][f"requests.{GPU_RESOURCE}"] > 0
    parse = {"cpu": cpu_m, "memory": memory_mi}
    for namespace, total in used.items():
        hard = quotas[namespace]
        for key, value in total.items():
            if key == "pods" or "gpu" in key:
                limit = int(hard.get(key, 0))
            else:
                limit = parse[key.split(".")[1]](hard[key])
            assert value <= limit, (namespace, key, value, limit)


def _platform_and_runtime(flat: dict[str, str] | None = None) -> list[Synthesized]:
    def make(settings: config.StackSettings) -> None:
        Platform("platform", PlatformArgs(settings))
        Runtime("runtime", RuntimeArgs(settings))

    return synth(make, flat)


def test_kata_gpu_passthrough_quota_counts_the_clusters_gpu_resource() -> None:
    """The committed profile: kata-qemu-nvidia-gpu with nvidia.com/pgpu."""
    resources = _platform_and_runtime()
    (quota,) = by_namespace(resources, "ResourceQuota")[config.RUNTIME_NAMESPACE]
    hard = quota["spec"]["hard"]
    assert hard["requests.nvidia.com/pgpu"] == "16"
    assert "requests.nvidia.com/gpu" not in hard
    # The vLLM pods ask for the resource the quota counts, under the GPU operator's class.
    deployments = [
        d
        for d in of_kind(resources, "Deployment")
        if d["metadata"]["namespace"] == config.RUNTIME_NAMESPACE
    ]
    assert deployments
    requested = 0
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "kata-qemu-nvidia-gpu"
        for container in pod["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["requests"]
            requested += int(container["resources"]["requests"]["nvidia.com/pgpu"])
    assert 0 < requested <= int(hard["requests.nvidia.com/pgpu"])


def test_gvisor_gpu_quota_counts_the_device_plugins_gpus() -> None:
    """Without the Kata GPU class, GPU pods ask for (and the quota counts) nvidia.com/gpu."""
    flat = datacenter_config()
    profile = json.loads(flat["sovereign:profile"])
    profile["cluster"]["gpu_runtime"] = "gvisor"
    profile["cluster"]["gpu_runtime_class"] = None
    profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"
    flat["sovereign:profile"] = json.dumps(profile)
    resources = _platform_and_runtime(flat)
    assert gpu_quota(resources, "nvidia.com/gpu") == "16"
    (quota,) = by_namespace(resources, "ResourceQuota")[config.RUNTIME_NAMESPACE]
    assert "requests.nvidia.com/pgpu" not in quota["spec"]["hard"]
    deployments = [
        d
        for d in of_kind(resources, "Deployment")
        if d["metadata"]["namespace"] == config.RUNTIME_NAMESPACE
    ]
    assert deployments
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["runtimeClassName"] == "gvisor"
        for container in pod["containers"]:
            assert "nvidia.com/pgpu" not in container["resources"]["requests"]
            assert int(container["resources"]["requests"]["nvidia.com/gpu"]) > 0
