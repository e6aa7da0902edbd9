"""Runtime: one vLLM server per `engine: vllm` model of the profile, on GPU nodes.

Each model gets a Deployment started with exactly the argv and environment of the shared
vLLM renderer (`sovereign.render.vllm`), so a datacenter serves a model the way a single
node does, a Service at the URL the gateway's config routes to, and a NetworkPolicy that
admits the gateway alone and lets the server reach nothing: the weights come read-only
from the imported bundle's volume and Hugging Face stays offline, so vLLM needs no DNS.
GPU pods run under the sandbox RuntimeClass unless the profile names runc explicitly, or
under the cluster's own GPU RuntimeClass (`cluster.gpu_runtime_class`, e.g. the GPU
operator's kata-qemu-nvidia-gpu) and request the cluster's GPU resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import pulumi
import pulumi_kubernetes as k8s

from sovereign.profile.model import ModelSpec
from sovereign.render.vllm import (
    BUNDLE_ROOT,
    VllmLaunch,
    vllm_launches,
    vllm_service_name,
    vllm_service_url,
)
from stacks.components import base, workload_identity
from stacks.config import GATEWAY_NAMESPACE, RUNTIME_NAMESPACE, StackSettings

COMPONENT = "runtime"
# One account for every vLLM server: it names them to SPIRE; none calls the API server.
SERVICE_ACCOUNT = workload_identity.VLLM_SERVICE_ACCOUNT
# Host resources per GPU: loading weights and tokenizing for a whole GPU's batch need both.
CPU_PER_GPU = 4
MEMORY_GIB_PER_GPU = 32
# Tensor-parallel workers exchange activations through NCCL over /dev/shm.
SHM_GIB_PER_GPU = 8
CACHE_PATH = "/var/cache/vllm"
# Where vLLM, torch, Triton and friends write their caches: the root file system is
# read-only, so every one of them points into the cache emptyDir.
CACHE_ENV = {
    "HOME": f"{CACHE_PATH}/home",
    "XDG_CACHE_HOME": f"{CACHE_PATH}/xdg",
    "XDG_CONFIG_HOME": f"{CACHE_PATH}/config",
    "HF_HOME": f"{CACHE_PATH}/huggingface",
    "VLLM_CACHE_ROOT": f"{CACHE_PATH}/vllm",
    "VLLM_CONFIG_ROOT": f"{CACHE_PATH}/vllm-config",
    "TRITON_CACHE_DIR": f"{CACHE_PATH}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_PATH}/inductor",
    "NUMBA_CACHE_DIR": f"{CACHE_PATH}/numba",
    "OUTLINES_CACHE_DIR": f"{CACHE_PATH}/outlines",
    "TMPDIR": "/tmp",  # noqa: S108 - an emptyDir of its own
}
CACHE_SIZE = "20Gi"
# A 70B model reads tens of GB from the volume and compiles its kernels before /health
# answers: allow about 20 minutes before the kubelet gives up.
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURES = 120
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}


@dataclass(frozen=True)
class RuntimeArgs:
    settings: StackSettings


def resources(gpus: int, gpu_resource: str) -> base.Resources:
    """`gpu_resource` is the cluster's: nvidia.com/gpu, or nvidia.com/pgpu when the GPU
    operator passes whole GPUs through to Kata guests."""
    return base.Resources(
        cpu=str(CPU_PER_GPU * gpus),
        memory=f"{MEMORY_GIB_PER_GPU * gpus}Gi",
        extended={gpu_resource: str(gpus)},
    )


def service_url(name: str, port: int) -> str:
    """The base URL the Service of `name` answers on, as the gateway reaches it."""
    return f"http://{name}.{RUNTIME_NAMESPACE}.svc.cluster.local:{port}/v1"


class Runtime(pulumi.ComponentResource):
    def __init__(
        self, name: str, args: RuntimeArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("sovereign:runtime:Runtime", name, None, opts)
        settings = args.settings
        models = {model.name: model for model in settings.profile.models}
        self.service_urls: dict[str, str] = {}
        self.deployments: dict[str, k8s.apps.v1.Deployment] = {}
        self.services: dict[str, k8s.core.v1.Service] = {}
        launches = vllm_launches(settings.profile)
        if launches:
            base.service_account(SERVICE_ACCOUNT, RUNTIME_NAMESPACE, COMPONENT, self)
        for launch in launches:
            model = models[launch.model]
            app = vllm_service_name(model)
            url = vllm_service_url(model)
            if url != service_url(app, launch.port):
                # The gateway's config routes to vllm_service_url; a Service elsewhere
                # would leave the model unreachable.
                raise ValueError(f"model {model.name!r}: {url} is not this stack's Service")
            self.deployments[model.name] = self._deployment(settings, model, launch)
            self.services[model.name] = base.service(
                app, RUNTIME_NAMESPACE, COMPONENT, [("http", launch.port)], self
            )
            base.allow(
                app,
                RUNTIME_NAMESPACE,
                app,
                COMPONENT,
                self,
                ingress=[
                    k8s.networking.v1.NetworkPolicyIngressRuleArgs(
                        from_=[base.pod_peer(GATEWAY_NAMESPACE, base.GATEWAY_APP)],
                        ports=base.tcp(launch.port),
                    )
                ],
            )
            self.service_urls[model.name] = url
        self.register_outputs({"service_urls": self.service_urls})

    def _deployment(
        self, settings: StackSettings, model: ModelSpec, launch: VllmLaunch
    ) -> k8s.apps.v1.Deployment:
        app = vllm_service_name(model)
        weights = PurePosixPath(launch.weights)
        if not weights.is_relative_to(BUNDLE_ROOT):
            raise ValueError(
                f"model {model.name!r}: {launch.weights} is outside the model volume at "
                f"{BUNDLE_ROOT}; a datacenter loads weights from bundle:<path> sources"
            )
        env = {
            **CACHE_ENV,
            **launch.env,
            workload_identity.WORKLOAD_API_ENV: workload_identity.WORKLOAD_API_SOCKET,
        }
        container = base.container(
            "vllm",
            settings.image("vllm"),
            resources(launch.gpus, settings.cluster.gpu_resource),
            command=[launch.argv[0]],
            args=list(launch.argv[1:]),
            ports=[("http", launch.port)],
            env=[k8s.core.v1.EnvVarArgs(name=key, value=value) for key, value in env.items()],
            mounts=[
                base.volume_mount("models", BUNDLE_ROOT, read_only=True),
                base.volume_mount("cache", CACHE_PATH),
                base.volume_mount("tmp", "/tmp"),  # noqa: S108 - an emptyDir of its own
                base.volume_mount("shm", "/dev/shm"),  # noqa: S108 - a Memory emptyDir of its own
                workload_identity.workload_api_mount(),
            ],
            readiness=base.http_probe("/health", launch.port),
            liveness=base.http_probe("/health", launch.port, period=30, failures=3),
            startup=base.http_probe(
                "/health", launch.port, period=STARTUP_PERIOD_SECONDS, failures=STARTUP_FAILURES
            ),
        )
        labels = base.labels(COMPONENT, app)
        return k8s.apps.v1.Deployment(
            f"{RUNTIME_NAMESPACE}-{app}",
            metadata=base.metadata(app, RUNTIME_NAMESPACE, COMPONENT),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=1,
                # GPUs are exclusive: a rolling update's surge pod could never be scheduled.
                strategy=k8s.apps.v1.DeploymentStrategyArgs(type="Recreate"),
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=base.selector(app)),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=labels),
                    spec=base.pod_spec(
                        [container],
                        runtime_class=settings.runtime_class(gpu=True),
                        service_account=SERVICE_ACCOUNT,
                        automount_token=False,
                        volumes=[
                            k8s.core.v1.VolumeArgs(
                                name="models",
                                persistent_volume_claim=k8s.core.v1.PersistentVolumeClaimVolumeSourceArgs(
                                    claim_name=settings.cluster.models_claim, read_only=True
                                ),
                            ),
                            base.empty_dir("cache", CACHE_SIZE),
                            base.empty_dir("tmp", "1Gi"),
                            base.empty_dir(
                                "shm", f"{SHM_GIB_PER_GPU * launch.gpus}Gi", memory=True
                            ),
                            workload_identity.workload_api_volume(),
                        ],
                        priority_class=base.PRIORITY_SERVING,
                        node_selector=GPU_NODE_SELECTOR,
                        tolerations=[
                            k8s.core.v1.TolerationArgs(
                                key=base.GPU_TOLERATION_KEY,
                                operator="Exists",
                                effect="NoSchedule",
                            )
                        ],
                    ),
                ),
            ),
            opts=base.child(self),
        )
