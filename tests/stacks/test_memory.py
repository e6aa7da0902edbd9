"""The Memory component: Qdrant, its snapshots and who may reach it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from stacks.components.base import PRIORITY_BATCH, PRIORITY_SERVING
from stacks.components.memory import SNAPSHOT_SCRIPT, Memory, MemoryArgs
from stacks.config import GATEWAY_NAMESPACE, MEMORY_NAMESPACE, QDRANT_PORT, QDRANT_SERVICE
from stacks.synth import Synthesized
from tests.stacks.harness import datacenter_config, synth

REGISTRY = "registry.dc1.internal:5000/"
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def build(settings: Any) -> None:
    Memory("memory", MemoryArgs(settings))


def with_cluster(**qdrant: Any) -> dict[str, str]:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    profile["cluster"]["qdrant"].update(qdrant)
    cfg["sovereign:profile"] = json.dumps(profile)
    return cfg


def peer(namespace: str, app: str) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "sovereign"}
        },
    }


def ports(rule: dict[str, Any]) -> list[tuple[str, int]]:
    return [(port["protocol"], int(port["port"])) for port in rule["ports"]]


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


def assert_hardened(pod: dict[str, Any], runtime_class: str | None) -> None:
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("runtimeClassName") == runtime_class
    assert pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"]
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["privileged"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}
        assert container["image"].startswith(REGISTRY)
        assert "@sha256:" in container["image"]


@pytest.fixture(scope="module")
def resources() -> list[Synthesized]:
    return synth(build)


@pytest.fixture(scope="module")
def clustered() -> list[Synthesized]:
    return synth(build, with_cluster(replicas=3))


def test_component_and_children(resources: list[Synthesized]) -> None:
    assert [(r.type, r.name) for r in resources if not r.custom] == [
        ("sovereign:memory:Memory", "memory")
    ]
    k8s = [r for r in resources if r.is_kubernetes]
    for r in k8s:
        assert r.manifest()["metadata"]["namespace"] == MEMORY_NAMESPACE
        assert r.name == f"{MEMORY_NAMESPACE}-{r.manifest()['metadata']['name']}"
    kinds = sorted((r.manifest()["kind"], r.manifest()["metadata"]["name"]) for r in k8s)
    assert kinds == [
        ("CronJob", "qdrant-snapshot"),
        ("NetworkPolicy", "qdrant"),
        ("NetworkPolicy", "qdrant-snapshot"),
        ("PodDisruptionBudget", "qdrant"),
        ("Service", "qdrant"),
        ("Service", "qdrant-headless"),
        ("StatefulSet", "qdrant"),
    ]


def test_statefulset(resources: list[Synthesized]) -> None:
    sts = find(resources, "StatefulSet", "qdrant")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    assert spec["serviceName"] == "qdrant-headless"
    # Immutable: a single node must already be Parallel, or scaling out needs a recreate.
    assert spec["podManagementPolicy"] == "Parallel"
    pod = spec["template"]["spec"]
    assert_hardened(pod, "kata")
    assert pod["priorityClassName"] == PRIORITY_SERVING
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["fsGroup"] == 1000
    (container,) = pod["containers"]
    assert container["image"] == REGISTRY + (
        "qdrant/qdrant@sha256:6d810a049098b6657d85d3bd76f93da3363b337ee09893c271b839227ccd1093"
    )
    assert container["securityContext"]["runAsUser"] == 1000
    assert "command" not in container  # a single node runs the image's own entrypoint
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QDRANT__TELEMETRY_DISABLED"] == "true"
    assert "QDRANT__CLUSTER__ENABLED" not in env
    assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
        ("http", 6333),
        ("grpc", 6334),
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/qdrant/storage"] == "storage"
    assert mounts["/qdrant/snapshots"] == "snapshots"
    assert mounts["/tmp"] == "tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    # Every writable path is a volume: the init marker moves off the read-only root.
    assert env["QDRANT_INIT_FILE_PATH"].startswith(
        next(path for path, name in mounts.items() if name == "init") + "/"
    )
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 6333}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 6333}
    claims = {c["metadata"]["name"]: c["spec"] for c in spec["volumeClaimTemplates"]}
    assert set(claims) == {"storage", "snapshots"}
    for claim in claims.values():
        assert claim["storageClassName"] == "local-nvme"
        assert claim["accessModes"] == ["ReadWriteOnce"]
    assert claims["storage"]["resources"]["requests"]["storage"] == "200Gi"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_services(resources: list[Synthesized]) -> None:
    service = find(resources, "Service", QDRANT_SERVICE)
    assert service["spec"].get("clusterIP") is None
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", QDRANT_PORT, "http"),
        ("grpc", 6334, "grpc"),
    }
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/name": "qdrant",
        "app.kubernetes.io/part-of": "sovereign",
    }
    headless = find(resources, "Service", "qdrant-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == service["spec"]["selector"]


def test_disruption_budget(resources: list[Synthesized]) -> None:
    pdb = find(resources, "PodDisruptionBudget", "qdrant")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "qdrant"


def test_snapshot_cron_job(resources: list[Synthesized]) -> None:
    job = find(resources, "CronJob", "qdrant-snapshot")["spec"]
    assert job["schedule"] == "15 2 * * *"
    assert job["concurrencyPolicy"] == "Forbid"
    assert job["successfulJobsHistoryLimit"] >= 1
    assert job["failedJobsHistoryLimit"] >= 1
    template = job["jobTemplate"]["spec"]["template"]
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "qdrant-snapshot"
    pod = template["spec"]
    assert_hardened(pod, "kata")
    assert pod["priorityClassName"] == PRIORITY_BATCH
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["image"] == REGISTRY + (
        "curlimages/curl@sha256:86dd4126aa6e7a5830031296372443946fced45dd829fbc3d52c83db83942dbe"
    )
    # A single node: the one pod, by its own name through the headless Service.
    assert container["command"] == [
        "/bin/sh",
        "-c",
        SNAPSHOT_SCRIPT,
        "qdrant-snapshot",
        f"qdrant-0.qdrant-headless.{MEMORY_NAMESPACE}.svc.cluster.local",
    ]


def test_snapshot_job_snapshots_every_peer_in_cluster_mode(
    clustered: list[Synthesized],
) -> None:
    (container,) = find(clustered, "CronJob", "qdrant-snapshot")["spec"]["jobTemplate"]["spec"][
        "template"
    ]["spec"]["containers"]
    assert container["command"][4:] == [
        f"qdrant-{i}.qdrant-headless.{MEMORY_NAMESPACE}.svc.cluster.local" for i in range(3)
    ]
    # Every peer answers on the port the snapshot job may reach.
    policy = find(clustered, "NetworkPolicy", "qdrant-snapshot")["spec"]
    assert [ports(rule) for rule in policy["egress"]][-1] == [("TCP", 6333)]


FAKE_CURL = """#!/bin/sh
# Records each call; answers GET /snapshots with the listing in $SNAPSHOTS_JSON.
echo "$*" >> "$CALLS"
case "$*" in
  *"-X POST"*|*"-X DELETE"*) echo '{"result":true,"status":"ok"}' ;;
  *) cat "$SNAPSHOTS_JSON" ;;
esac
"""


def snapshot_listing(names: list[str]) -> str:
    entries = ",".join(
        f'{{"name":"{n}","creation_time":"2025-01-01T00:00:00","size":1,"checksum":"ab"}}'
        for n in names
    )
    return f'{{"result":[{entries}],"status":"ok","time":0.001}}'


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_snapshot_script_prunes_all_but_the_newest_seven(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(FAKE_CURL)
    curl.chmod(0o755)
    stamps = [f"2025-01-{day:02d}-02-15-00" for day in (3, 10, 1, 7, 9, 2, 5, 8, 4, 6)]
    names = [f"full-snapshot-{stamp}.snapshot" for stamp in stamps]
    listing = tmp_path / "snapshots.json"
    listing.write_text(snapshot_listing(names))
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALLS": str(calls),
        "SNAPSHOTS_JSON": str(listing),
    }
    hosts = ["qdrant-0.h", "qdrant-1.h"]
    subprocess.run(
        ["sh", "-c", SNAPSHOT_SCRIPT, "qdrant-snapshot", *hosts], env=env, check=True, timeout=30
    )
    lines = calls.read_text().splitlines()
    oldest = [f"full-snapshot-2025-01-0{day}-02-15-00.snapshot" for day in (3, 2, 1)]
    expected: list[str] = []
    for host in hosts:
        url = f"http://{host}:6333/snapshots"
        expected += [
            f"-fsS --retry 3 -X POST {url}?wait=true",
            f"-fsS --retry 3 {url}",
            *(f"-fsS --retry 3 -X DELETE {url}/{name}?wait=true" for name in oldest),
        ]
    assert lines == expected


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_snapshot_script_fails_when_qdrant_refuses_the_snapshot(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\nexit 22\n')
    curl.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls)}
    result = subprocess.run(
        ["sh", "-c", SNAPSHOT_SCRIPT, "qdrant-snapshot", "qdrant-0.h"], env=env, timeout=30
    )
    assert result.returncode != 0
    # Nothing is listed or deleted after a failed snapshot.
    assert len(calls.read_text().splitlines()) == 1


def test_snapshot_schedule_follows_the_profile() -> None:
    job = find(
        synth(build, with_cluster(snapshot_schedule="0 */6 * * *")), "CronJob", "qdrant-snapshot"
    )
    assert job["spec"]["schedule"] == "0 */6 * * *"


def test_network_policies_single_node(resources: list[Synthesized]) -> None:
    policy = find(resources, "NetworkPolicy", "qdrant")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "qdrant"
    ingress = [(rule["from"], ports(rule)) for rule in policy["ingress"]]
    assert ingress == [
        ([peer(GATEWAY_NAMESPACE, "sovereign-gateway")], [("TCP", 6333), ("TCP", 6334)]),
        ([peer(MEMORY_NAMESPACE, "qdrant-snapshot")], [("TCP", 6333)]),
    ]
    # A lone Qdrant talks to nobody, not even DNS.
    assert "egress" not in policy
    snapshot = find(resources, "NetworkPolicy", "qdrant-snapshot")["spec"]
    assert snapshot["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in snapshot
    egress = [(rule["to"], ports(rule)) for rule in snapshot["egress"]]
    assert egress == [
        ([DNS_PEER], [("UDP", 53), ("TCP", 53)]),
        ([peer(MEMORY_NAMESPACE, "qdrant")], [("TCP", 6333)]),
    ]


def test_cluster_mode(clustered: list[Synthesized]) -> None:
    sts = find(clustered, "StatefulSet", "qdrant")["spec"]
    assert sts["replicas"] == 3
    assert sts["podManagementPolicy"] == "Parallel"
    (container,) = sts["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QDRANT__CLUSTER__ENABLED"] == "true"
    assert env["QDRANT__CLUSTER__P2P__PORT"] == "6335"
    assert ("p2p", 6335) in {(p["name"], p["containerPort"]) for p in container["ports"]}
    script = container["command"][-1]
    founder = f"http://qdrant-0.qdrant-headless.{MEMORY_NAMESPACE}.svc.cluster.local:6335"
    assert f'--bootstrap "{founder}"' in script
    assert "--uri" in script
    headless = find(clustered, "Service", "qdrant-headless")["spec"]
    assert ("p2p", 6335) in {(p["name"], p["port"]) for p in headless["ports"]}
    policy = find(clustered, "NetworkPolicy", "qdrant")["spec"]
    assert ([peer(MEMORY_NAMESPACE, "qdrant")], [("TCP", 6335)]) in [
        (rule["from"], ports(rule)) for rule in policy["ingress"]
    ]
    assert [(rule["to"], ports(rule)) for rule in policy["egress"]] == [
        ([DNS_PEER], [("UDP", 53), ("TCP", 53)]),
        ([peer(MEMORY_NAMESPACE, "qdrant")], [("TCP", 6335)]),
    ]


def test_runtime_class_follows_the_profile() -> None:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    profile["sandbox"]["runtime"] = "gvisor"
    # GPU pods follow the sandbox too, and the GPU operator's Kata class applies only with kata.
    profile["cluster"]["gpu_runtime_class"] = None
    profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"
    cfg["sovereign:profile"] = json.dumps(profile)
    resources = synth(build, cfg)
    assert (
        find(resources, "StatefulSet", "qdrant")["spec"]["template"]["spec"]["runtimeClassName"]
        == "gvisor"
    )
    job = find(resources, "CronJob", "qdrant-snapshot")["spec"]["jobTemplate"]["spec"]
    assert job["template"]["spec"]["runtimeClassName"] == "gvisor"
