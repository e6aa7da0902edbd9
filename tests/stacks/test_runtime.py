"""The Runtime component: one vLLM Deployment, Service and NetworkPolicy per model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sovereign.render import vllm
from stacks.components.base import PRIORITY_SERVING
from stacks.components.runtime import Runtime, RuntimeArgs
from stacks.config import GATEWAY_NAMESPACE, RUNTIME_NAMESPACE, ConfigError
from stacks.synth import Synthesized
from tests.stacks.harness import datacenter_config, synth

REGISTRY = "registry.dc1.internal:5000/"
VLLM_IMAGE = (
    REGISTRY
    + "vllm/vllm-openai@sha256:30183ac1aada99c8696c8cff00945a22eb7a904acb66876fe99d92a25a35f6c4"
)
MODELS = ("llama-3.1-70b-instruct-fp8", "qwen2.5-7b-instruct-awq")


def profile_config(edit: Any) -> dict[str, str]:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    edit(profile)
    cfg["sovereign:profile"] = json.dumps(profile)
    return cfg


def run(cfg: dict[str, str] | None = None) -> tuple[list[Synthesized], Any]:
    built: dict[str, Any] = {}

    def build(settings: Any) -> None:
        built["settings"] = settings
        built["runtime"] = Runtime("runtime", RuntimeArgs(settings))

    resources = synth(build, cfg)
    return resources, built


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


def pod_of(resources: list[Synthesized], name: str) -> dict[str, Any]:
    return find(resources, "Deployment", name)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def default() -> tuple[list[Synthesized], Any]:
    return run()


def launches(settings: Any) -> list[tuple[Any, vllm.VllmLaunch]]:
    models = {m.name: m for m in settings.profile.models}
    return [(models[launch.model], launch) for launch in vllm.vllm_launches(settings.profile)]


def test_namespace_matches_the_renderer() -> None:
    # The gateway config's URLs use the renderer's namespace; the stack deploys into ours.
    assert vllm.RUNTIME_NAMESPACE == RUNTIME_NAMESPACE


def test_one_set_per_model(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    assert [(r.type, r.name) for r in resources if not r.custom] == [
        ("sovereign:runtime:Runtime", "runtime")
    ]
    names = {vllm.vllm_service_name(m) for m, _ in launches(built["settings"])}
    assert len(names) == len(MODELS)
    k8s = [r.manifest() for r in resources if r.is_kubernetes]
    assert sorted((m["kind"], m["metadata"]["name"]) for m in k8s) == sorted(
        [
            *(
                (kind, name)
                for name in names
                for kind in ("Deployment", "Service", "NetworkPolicy")
            ),
            ("ServiceAccount", "vllm"),
        ]
    )
    for r in resources:
        if r.is_kubernetes:
            meta = r.manifest()["metadata"]
            assert meta["namespace"] == RUNTIME_NAMESPACE
            assert r.name == f"{RUNTIME_NAMESPACE}-{meta['name']}"
            assert meta["labels"]["app.kubernetes.io/component"] == "runtime"


def test_deployment_per_launch(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    pairs = launches(built["settings"])
    assert {launch.model for _, launch in pairs} == set(MODELS)
    for model, launch in pairs:
        name = vllm.vllm_service_name(model)
        deployment = find(resources, "Deployment", name)
        spec = deployment["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
        template = spec["template"]
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "runtime"
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == name
        assert spec["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        pod = template["spec"]
        (container,) = pod["containers"]
        assert container["image"] == VLLM_IMAGE
        # Exactly the shared renderer's launch, nothing added or reordered.
        assert container["command"] == [launch.argv[0]]
        assert container["args"] == list(launch.argv[1:])
        assert [container["command"][0], *container["args"]] == list(launch.argv)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env.items() >= dict(launch.env).items()
        cache = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "cache")
        for key in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "HF_HOME", "VLLM_CACHE_ROOT"):
            assert env[key].startswith(cache + "/"), key
        resources_ = container["resources"]
        # The committed profile passes whole GPUs into Kata guests (cluster.gpu_resource).
        for kind in ("requests", "limits"):
            assert resources_[kind]["nvidia.com/pgpu"] == str(launch.gpus)
            assert set(resources_[kind]) == {"cpu", "memory", "nvidia.com/pgpu"}
        assert int(resources_["requests"]["cpu"]) == 4 * launch.gpus
        assert resources_["requests"]["memory"] == f"{32 * launch.gpus}Gi"
        assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
            ("http", launch.port)
        ]
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": launch.port}
        startup = container["startupProbe"]
        assert startup["httpGet"] == {"path": "/health", "port": launch.port}
        allowed = startup["periodSeconds"] * startup["failureThreshold"]
        assert 18 * 60 <= allowed <= 30 * 60


def test_weights_come_read_only_from_the_models_claim(
    default: tuple[list[Synthesized], Any],
) -> None:
    resources, built = default
    for model, launch in launches(built["settings"]):
        pod = pod_of(resources, vllm.vllm_service_name(model))
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        bundle = mounts[vllm.BUNDLE_ROOT]
        assert bundle["readOnly"] is True
        claim = volumes[bundle["name"]]["persistentVolumeClaim"]
        assert claim == {"claimName": "sovereign-models", "readOnly": True}
        assert launch.weights.startswith(vllm.BUNDLE_ROOT + "/")
        assert launch.argv[2] == launch.weights
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        # Every other mount is scratch space or the read-only SPIFFE socket: the root file
        # system stays read-only.
        for path, mount in mounts.items():
            if path not in (vllm.BUNDLE_ROOT, "/run/spire/sockets"):
                assert "emptyDir" in volumes[mount["name"]], path


def test_pod_security_and_placement(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    for model, _ in launches(built["settings"]):
        pod = pod_of(resources, vllm.vllm_service_name(model))
        # The GPU operator's Kata class (cluster.gpu_runtime_class), not the plain kata.
        assert pod["runtimeClassName"] == "kata-qemu-nvidia-gpu"
        assert pod["priorityClassName"] == PRIORITY_SERVING
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        (container,) = pod["containers"]
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["privileged"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_services_match_the_gateway_urls(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    runtime = built["runtime"]
    expected = {}
    for model, launch in launches(built["settings"]):
        name = vllm.vllm_service_name(model)
        service = find(resources, "Service", name)
        (port,) = service["spec"]["ports"]
        assert port["port"] == launch.port
        assert port["targetPort"] == "http"
        assert service["spec"]["selector"] == {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/part-of": "sovereign",
        }
        url = (
            f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
            f".svc.cluster.local:{int(port['port'])}/v1"
        )
        assert url == vllm.vllm_service_url(model)
        expected[model.name] = url
    assert runtime.service_urls == expected


def test_network_policy_admits_only_the_gateway(default: tuple[list[Synthesized], Any]) -> None:
    resources, built = default
    for model, launch in launches(built["settings"]):
        name = vllm.vllm_service_name(model)
        spec = find(resources, "NetworkPolicy", name)["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == name
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["ingress"] == [
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": GATEWAY_NAMESPACE}
                        },
                        "podSelector": {
                            "matchLabels": {
                                "app.kubernetes.io/name": "sovereign-gateway",
                                "app.kubernetes.io/part-of": "sovereign",
                            }
                        },
                    }
                ],
                "ports": [{"protocol": "TCP", "port": launch.port}],
            }
        ]
        # No egress at all, not even DNS.
        assert "egress" not in spec


def set_gpu_runtime(value: str | None) -> Any:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["gpu_runtime"] = value
        # The GPU operator's Kata class applies only with kata; outside a Kata guest GPU
        # pods ask for the device plugin's GPUs.
        profile["cluster"]["gpu_runtime_class"] = None
        profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"

    return edit


@pytest.mark.parametrize(("gpu_runtime", "expected"), [("runc", None), ("gvisor", "gvisor")])
def test_gpu_runtime_class(gpu_runtime: str, expected: str | None) -> None:
    resources, built = run(profile_config(set_gpu_runtime(gpu_runtime)))
    for model, launch in launches(built["settings"]):
        pod = pod_of(resources, vllm.vllm_service_name(model))
        assert pod.get("runtimeClassName") == expected
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(launch.gpus)


def test_gpu_pods_follow_the_sandbox_when_gpu_runtime_is_unset() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["sandbox"]["runtime"] = "gvisor"
        profile["cluster"]["gpu_runtime"] = None
        profile["cluster"]["gpu_runtime_class"] = None  # a Kata class applies only with kata
        profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"

    resources, built = run(profile_config(edit))
    for model, _ in launches(built["settings"]):
        assert pod_of(resources, vllm.vllm_service_name(model))["runtimeClassName"] == "gvisor"


def test_models_claim_and_port_follow_the_profile() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["models_claim"] = "weights-ro"
        profile["models"][1]["vllm"]["port"] = 8100

    resources, built = run(profile_config(edit))
    qwen = next(m for m in built["settings"].profile.models if m.name == MODELS[1])
    name = vllm.vllm_service_name(qwen)
    pod = pod_of(resources, name)
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["weights-ro"]
    assert find(resources, "Service", name)["spec"]["ports"][0]["port"] == 8100
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["port"] == 8100
    assert built["runtime"].service_urls[qwen.name].endswith(":8100/v1")


def test_no_vllm_models_no_resources() -> None:
    def edit(profile: dict[str, Any]) -> None:
        for model in profile["models"]:
            model["engine"] = "upstream"
            model["source"] = "https://llm.dc1.internal/v1"
            model.pop("vllm", None)
            model["quantization"] = "none"

    resources, built = run(profile_config(edit))
    assert [r for r in resources if r.is_kubernetes] == []
    assert built["runtime"].service_urls == {}


def test_weights_outside_the_model_volume_are_refused() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["models"][1]["source"] = "file:/srv/models/qwen"

    # The stack config refuses file: sources first; the component refuses them too.
    with pytest.raises(ConfigError, match=r"bundle: or hf: source"):
        run(profile_config(edit))


def test_vllm_pods_get_the_spiffe_workload_api_under_their_own_account(
    default: tuple[list[Synthesized], Any],
) -> None:
    resources, built = default
    account = find(resources, "ServiceAccount", "vllm")
    assert account["automountServiceAccountToken"] is False
    for model, _ in launches(built["settings"]):
        pod = pod_of(resources, vllm.vllm_service_name(model))
        # The SPIFFE ID names the pod's account; `default` must never carry it.
        assert pod["serviceAccountName"] == "vllm"
        assert pod["automountServiceAccountToken"] is False
        (volume,) = [v for v in pod["volumes"] if "csi" in v]
        assert volume["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == "/run/spire/sockets"
        assert mount["readOnly"] is True
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///run/spire/sockets/spire-agent.sock"


def test_kata_gpu_passthrough_class_and_resource() -> None:
    def edit(profile: dict[str, Any]) -> None:
        profile["sandbox"]["runtime"] = "kata"
        profile["cluster"]["gpu_runtime"] = None
        profile["cluster"]["gpu_runtime_class"] = "kata-qemu-nvidia-gpu"
        profile["cluster"]["gpu_resource"] = "nvidia.com/pgpu"

    resources, built = run(profile_config(edit))
    for model, launch in launches(built["settings"]):
        pod = pod_of(resources, vllm.vllm_service_name(model))
        assert pod["runtimeClassName"] == "kata-qemu-nvidia-gpu"
        (container,) = pod["containers"]
        for kind in ("requests", "limits"):
            bounds = container["resources"][kind]
            assert bounds["nvidia.com/pgpu"] == str(launch.gpus), kind
            assert "nvidia.com/gpu" not in bounds, kind
        # The GPU operator's taint keeps its key whatever resource the nodes expose.
        assert pod["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]


def test_gpu_runtime_class_with_runc_gpu_pods_is_refused() -> None:
    """A Kata GPU class cannot apply to pods that run under runc: refused, not ignored."""

    def edit(profile: dict[str, Any]) -> None:
        profile["cluster"]["gpu_runtime"] = "runc"
        profile["cluster"]["gpu_runtime_class"] = "kata-qemu-nvidia-gpu"

    with pytest.raises(ConfigError, match=r"cluster\.gpu_runtime_class: .*applies only with kata"):
        run(profile_config(edit))
