"""Policy: OPA servers loading exactly the rendered gateway policy, for the gateway alone."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from sovereign import tools
from sovereign.render.policy import policy_data, render
from stacks import config
from stacks.components import base
from stacks.components.policy import ARGS, Policy, PolicyArgs, policy_files
from stacks.synth import Synthesized
from tests.stacks.harness import SECRETS, datacenter_config, synth

NS = config.POLICY_NAMESPACE
IMAGE = re.compile(r"registry\.dc1\.internal:5000/[a-z0-9._/-]+@sha256:[0-9a-f]{64}")
OPA_IMAGE = "registry.dc1.internal:5000/openpolicyagent/opa@sha256:"


class Built:
    def __init__(self, flat: dict[str, str] | None = None) -> None:
        def make(settings: config.StackSettings) -> None:
            self.settings = settings
            Policy("policy", PolicyArgs(settings))

        self.resources: list[Synthesized] = synth(make, flat)
        self.manifests = [r.manifest() for r in self.resources if r.is_kubernetes]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [
            m for m in self.manifests if m["kind"] == kind and m["metadata"]["name"] == name
        ]
        return found

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment", "opa")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built() -> Built:
    return Built()


def with_profile(section: str, key: str, value: Any) -> dict[str, str]:
    flat = datacenter_config()
    profile = json.loads(flat["sovereign:profile"])
    profile[section][key] = value
    flat["sovereign:profile"] = json.dumps(profile)
    return flat


def mounted_files(built: Built) -> dict[str, str]:
    """What the pod sees under /policy: the volume's items applied to the ConfigMap."""
    data = built.one("ConfigMap", "opa-policy")["data"]
    (volume,) = [v for v in built.pod["volumes"] if v["name"] == "policy"]
    assert volume["configMap"]["name"] == "opa-policy"
    return {item["path"]: data[item["key"]] for item in volume["configMap"]["items"]}


def test_component_type_token(built: Built) -> None:
    components = [(r.type, r.name) for r in built.resources if not r.custom]
    assert components == [("sovereign:policy:Policy", "policy")]


def test_inventory(built: Built) -> None:
    found = sorted((m["kind"], m["metadata"]["name"]) for m in built.manifests)
    assert found == [
        ("ConfigMap", "opa-policy"),
        ("Deployment", "opa"),
        ("NetworkPolicy", "opa"),
        ("PodDisruptionBudget", "opa"),
        ("Service", "opa"),
        ("ServiceAccount", "opa"),
    ]


def test_every_resource_is_named_labelled_and_in_the_policy_namespace(built: Built) -> None:
    for resource in built.resources:
        if not resource.is_kubernetes:
            continue
        meta = resource.manifest()["metadata"]
        assert meta["namespace"] == NS
        assert resource.name == f"{NS}-{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "sovereign"
        assert meta["labels"]["app.kubernetes.io/component"] == "policy"


def test_config_map_carries_the_rendered_policy(built: Built) -> None:
    data = built.one("ConfigMap", "opa-policy")["data"]
    assert all("/" not in key for key in data)
    rendered = render(built.settings.profile)
    files = mounted_files(built)
    # Every rendered file, byte for byte, at its path under /policy; nothing else.
    assert {f"policy/{path}": text.encode() for path, text in files.items()} == dict(rendered)
    assert json.loads(files["data.json"]) == policy_data(built.settings.profile)
    rego = {path for path in files if path.endswith(".rego")}
    assert "gateway/decision.rego" in rego
    assert "gateway/rbac.rego" in rego
    assert not any(path.endswith("_test.rego") for path in rego)


def test_policy_data_follows_the_profile(built: Built) -> None:
    redacting = Built(with_profile("policy", "dlp", "redact"))
    files = mounted_files(redacting)
    assert json.loads(files["data.json"])["sovereign"]["config"]["dlp"] == {"mode": "redact"}
    # A policy change changes the pod template, so the servers restart onto it.
    digest = "sovereign/policy-sha256"
    old = built.deployment["spec"]["template"]["metadata"]["annotations"][digest]
    new = redacting.deployment["spec"]["template"]["metadata"]["annotations"][digest]
    assert re.fullmatch(r"[0-9a-f]{64}", old)
    assert old != new


def test_policy_files_refuses_what_it_cannot_mount() -> None:
    with pytest.raises(ValueError, match="outside"):
        policy_files({"other/x.rego": b""})
    with pytest.raises(ValueError, match="share key"):
        policy_files({"policy/a/b.rego": b"", "policy/a__b.rego": b""})
    assert policy_files({"policy/a/b.rego": b"x"}) == {"a__b.rego": ("a/b.rego", "x")}


def test_opa_args_load_the_policy_directory(built: Built) -> None:
    container = built.container
    assert container["args"] == ARGS
    assert container["args"][:2] == ["run", "--server"]
    assert "--addr=0.0.0.0:8181" in container["args"]
    assert "--diagnostic-addr=0.0.0.0:8282" in container["args"]
    assert "--disable-telemetry" in container["args"]
    assert "--log-level=info" in container["args"]
    assert "--ignore=.*" in container["args"]
    assert container["args"][-1] == "/policy"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/policy"]
    assert mount["readOnly"] is True
    assert mount["name"] == "policy"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/policy", "/run/spire/sockets"}


def test_opa_gets_the_spiffe_workload_api_under_its_own_account(built: Built) -> None:
    pod = built.pod
    # The SPIFFE ID template names the pod's account: `default` would be nobody's ID.
    assert pod["serviceAccountName"] == "opa"
    assert pod["automountServiceAccountToken"] is False
    account = built.one("ServiceAccount", "opa")
    assert account["automountServiceAccountToken"] is False
    (volume,) = [v for v in pod["volumes"] if "csi" in v]
    assert volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    (mount,) = [m for m in built.container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": "/run/spire/sockets", "readOnly": True}
    env = {e["name"]: e.get("value") for e in built.container["env"]}
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///run/spire/sockets/spire-agent.sock"


def test_opa_deployment(built: Built) -> None:
    deployment = built.deployment
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == base.selector("opa")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels.items() >= base.selector("opa").items()
    container = built.container
    assert container["image"].startswith(OPA_IMAGE)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8181,
        "diagnostic": 8282,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8282}, probe


def test_pod_is_hardened(built: Built) -> None:
    pod = built.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["runtimeClassName"] == "kata"
    assert pod["priorityClassName"] == base.PRIORITY_CONTROL
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod
    assert "initContainers" not in pod
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["privileged"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) >= {"cpu", "memory"}
        assert IMAGE.fullmatch(container["image"])


def test_runtime_class_follows_the_profile() -> None:
    flat = with_profile("sandbox", "runtime", "gvisor")
    profile = json.loads(flat["sovereign:profile"])
    # GPU pods follow the sandbox too, and the GPU operator's Kata class applies only with kata.
    profile["cluster"]["gpu_runtime_class"] = None
    profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"
    flat["sovereign:profile"] = json.dumps(profile)
    built = Built(flat)
    assert built.pod["runtimeClassName"] == "gvisor"


def test_service_is_the_profiles_opa_url(built: Built) -> None:
    service = built.one("Service", config.OPA_SERVICE)
    (port,) = service["spec"]["ports"]
    assert port == {"name": "http", "port": config.OPA_PORT, "targetPort": "http"}
    assert service["spec"]["selector"] == base.selector("opa")
    target = {p["name"]: p["containerPort"] for p in built.container["ports"]}[port["targetPort"]]
    assert target == config.OPA_PORT
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert (
        urlsplit(str(built.settings.profile.policy.opa_url)).netloc == f"{host}:{int(port['port'])}"
    )


def test_pdb(built: Built) -> None:
    pdb = built.one("PodDisruptionBudget", "opa")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == base.selector("opa")
    assert built.deployment["spec"]["replicas"] > pdb["spec"]["minAvailable"]


def test_network_policy_admits_the_gateway_only(built: Built) -> None:
    policy = built.one("NetworkPolicy", "opa")["spec"]
    assert policy == {
        "podSelector": {"matchLabels": base.selector("opa")},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": config.GATEWAY_NAMESPACE}
                        },
                        "podSelector": {"matchLabels": base.selector("sovereign-gateway")},
                    }
                ],
                "ports": [{"protocol": "TCP", "port": config.OPA_PORT}],
            }
        ],
    }


def test_no_secret_reaches_the_policy(built: Built) -> None:
    text = json.dumps(built.manifests)
    for value in SECRETS.values():
        assert value not in text


def kubelet_layout(root: Path, files: dict[str, str]) -> None:
    """Lay `files` out as the kubelet does a ConfigMap volume with items.

    The files live in a hidden timestamped directory, `..data` links to it, and each top-level
    entry is a link through `..data`.
    """
    stamp = root / "..2025_01_01_00_00_00.000000000"
    for path, text in files.items():
        target = stamp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (root / "..data").symlink_to(stamp.name)
    for top in {path.split("/", 1)[0] for path in files}:
        (root / top).symlink_to(f"..data/{top}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_opa_serves_the_mounted_policy(built: Built, tmp_path: Path) -> None:
    """The real OPA, run with the Deployment's args, loads the volume as the kubelet lays it out."""
    try:
        opa = tools.opa_binary()
    except tools.ToolMissing:
        pytest.skip("opa is not installed (sovereign tools install)")
    root = tmp_path / "policy"
    root.mkdir()
    kubelet_layout(root, mounted_files(built))
    port, diagnostic = free_port(), free_port()
    args = [
        f"--addr=127.0.0.1:{port}"
        if arg.startswith("--addr=")
        else f"--diagnostic-addr=127.0.0.1:{diagnostic}"
        if arg.startswith("--diagnostic-addr=")
        else str(root)
        if arg == "/policy"
        else arg
        for arg in ARGS
    ]
    log = tmp_path / "opa.log"
    with log.open("wb") as out:
        server = subprocess.Popen([str(opa), *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{diagnostic}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "OPA did not become healthy"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/data", timeout=5) as response:
            data = json.load(response)["result"]
        # data.json at the root, loaded once (not again under a hidden directory) ...
        assert data["sovereign"] == policy_data(built.settings.profile)["sovereign"]
        assert not any(key.startswith("..") for key in data)
        # ... and the gateway package compiled from the rego files.
        assert "gateway" in data
    finally:
        server.terminate()
        server.wait(timeout=10)
