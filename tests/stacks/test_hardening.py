"""Every pod of the whole stack, walked from the synthesized manifests: the issue's
security properties, and the wiring between components (selectors, ports, peers)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from stacks.config import SPIRE_NODE_NAMESPACE

REGISTRY = "registry.dc1.internal:5000/"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
NODE_AGENTS = {(SPIRE_NODE_NAMESPACE, "spire-agent"), (SPIRE_NODE_NAMESPACE, "spiffe-csi-driver")}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "CronJob")


def pod_templates(
    manifests: list[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for manifest in manifests:
        if manifest["kind"] not in WORKLOADS:
            continue
        spec = manifest["spec"]
        if manifest["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        yield manifest, spec["template"]


def key(manifest: dict[str, Any]) -> tuple[str, str]:
    return manifest["metadata"].get("namespace", ""), manifest["metadata"]["name"]


def test_the_stack_has_the_workloads_it_should(k8s_manifests: list[dict[str, Any]]) -> None:
    names = {key(m) for m, _ in pod_templates(k8s_manifests)}
    # gateway, keycloak, keycloak-db, opa, qdrant, qdrant-snapshot, spire-server, the two
    # node agents and one vLLM per model (two in the committed profile).
    assert len(names) == 11
    assert names >= NODE_AGENTS


def test_every_container_is_hardened(k8s_manifests: list[dict[str, Any]]) -> None:
    checked = 0
    for manifest, template in pod_templates(k8s_manifests):
        spec = template["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, key(manifest)
        agent = key(manifest) in NODE_AGENTS
        if not agent:
            assert pod_security["runAsNonRoot"] is True, key(manifest)
            assert pod_security["runAsUser"] != 0, key(manifest)
            assert not spec.get("hostPID"), key(manifest)
            assert not any("hostPath" in volume for volume in spec.get("volumes", []))
        assert not spec.get("hostIPC"), key(manifest)
        assert not spec.get("hostNetwork"), key(manifest)
        assert spec["priorityClassName"].startswith("sovereign-"), key(manifest)
        for container in spec["containers"] + spec.get("initContainers", []):
            where = (*key(manifest), container["name"])
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
            if context.get("privileged"):
                assert where == (SPIRE_NODE_NAMESPACE, "spiffe-csi-driver", "spiffe-csi-driver")
            else:
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"] == {"drop": ["ALL"]}, where
                assert context.get("runAsNonRoot", True) is (not agent), where
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), where
            assert container["image"].startswith(REGISTRY), where
            assert DIGEST.search(container["image"]), where
            checked += 1
    assert checked >= 13


@pytest.mark.parametrize("gpu", [False, True])
def test_every_pod_runs_under_the_profiles_sandbox(
    k8s_manifests: list[dict[str, Any]], gpu: bool
) -> None:
    """kata from the committed profile, and for GPU pods the GPU operator's Kata class
    (cluster.gpu_runtime_class); only the two node agents run without a class."""
    pods = [
        (manifest, template["spec"])
        for manifest, template in pod_templates(k8s_manifests)
        if key(manifest) not in NODE_AGENTS
        and any(
            "nvidia.com/pgpu" in c["resources"]["limits"] for c in template["spec"]["containers"]
        )
        is gpu
    ]
    assert pods
    expected = "kata-qemu-nvidia-gpu" if gpu else "kata"
    assert {spec.get("runtimeClassName") for _, spec in pods} == {expected}
    # No pod asks for the device plugin's plain GPUs, which a Kata guest would not see.
    for _, spec in pods:
        for container in spec["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    agents = [t["spec"] for m, t in pod_templates(k8s_manifests) if key(m) in NODE_AGENTS]
    assert [spec.get("runtimeClassName") for spec in agents] == [None, None]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(name) == value for name, value in selector.items())


def test_every_service_selects_pods_that_have_its_target_ports(
    k8s_manifests: list[dict[str, Any]],
) -> None:
    templates = [(m["metadata"]["namespace"], t) for m, t in pod_templates(k8s_manifests)]
    services = [m for m in k8s_manifests if m["kind"] == "Service"]
    assert services
    for service in services:
        namespace = service["metadata"]["namespace"]
        selected = [
            t
            for ns, t in templates
            if ns == namespace and _matches(service["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            for template in selected:
                ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
                if isinstance(target, str):
                    assert target in {p.get("name") for p in ports}, (service["metadata"], target)
                else:
                    assert target in {p["containerPort"] for p in ports}


def test_every_network_policy_peer_selects_pods_of_the_stack(
    k8s_manifests: list[dict[str, Any]],
) -> None:
    """A peer that selects nothing is a typo that silently blocks a component."""
    templates = [
        (m["metadata"]["namespace"], t["metadata"]["labels"])
        for m, t in pod_templates(k8s_manifests)
    ]
    policies = [m for m in k8s_manifests if m["kind"] == "NetworkPolicy"]
    peers = 0
    for policy in policies:
        spec = policy["spec"]
        own = policy["metadata"]["namespace"]
        if spec["podSelector"]:
            assert any(
                ns == own and _matches(spec["podSelector"]["matchLabels"], labels)
                for ns, labels in templates
            ), policy["metadata"]["name"]
        rules = [r.get("from", []) for r in spec.get("ingress", [])] + [
            r.get("to", []) for r in spec.get("egress", [])
        ]
        for peer in (p for rule in rules for p in rule):
            if "ipBlock" in peer or "podSelector" not in peer:
                continue
            namespace = (
                peer.get("namespaceSelector", {})
                .get("matchLabels", {})
                .get("kubernetes.io/metadata.name", own)
            )
            if namespace == "kube-system":
                continue  # cluster DNS, which the stack does not create
            assert any(
                ns == namespace and _matches(peer["podSelector"]["matchLabels"], labels)
                for ns, labels in templates
            ), (policy["metadata"]["name"], peer)
            peers += 1
    assert peers >= 10
