"""Renderer `vllm`: how to start vLLM for each `engine: vllm` model of the profile.

The single source the Ansible roles and the Pulumi Runtime stack start vLLM from. Gives,
per model, `vllm/<model>.json` (the launch: argv, environment, port, GPUs, weights and
their digest) and `vllm/<model>.args` (the same as one shell line, for operators).
A profile without vllm models gives no files.

The arguments are those of `vllm serve` in vLLM 0.10.1 and later, where request logging
is off by default (prompts stay out of vLLM's log) and bool options take a `--no-` form.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from sovereign.profile.derived import BUNDLE_ROOT, dns_label, local_weights_path
from sovereign.profile.model import ModelSpec, Profile, VllmSettings
from sovereign.profile.types import Quantization
from sovereign.render import Renderer

__all__ = [
    "BUNDLE_ROOT",
    "ENVIRONMENT",
    "NODE_HOST",
    "POD_HOST",
    "QUANTIZATION_METHODS",
    "RUNTIME_NAMESPACE",
    "VllmLaunch",
    "vllm_launch",
    "vllm_launches",
    "vllm_service_name",
    "vllm_service_url",
]

# The namespace the datacenter Runtime stack runs the vLLM services in.
RUNTIME_NAMESPACE = "sovereign-runtime"

# The profile's quantization -> vLLM's --quantization. AWQ and GPTQ name the Marlin kernels,
# which vLLM otherwise picks only when the checkpoint's own config leaves it the choice;
# bitsandbytes needs no --load-format since vLLM sets it from the quantization. int4 is a
# GGUF for llama.cpp, which the profile rules refuse for vllm.
QUANTIZATION_METHODS: Mapping[Quantization, str | None] = {
    "awq": "awq_marlin",
    "gptq": "gptq_marlin",
    "compressed-tensors": "compressed-tensors",
    "bitsandbytes": "bitsandbytes",
    "fp8": "fp8",
    "none": None,
}

# Nodes are air-gapped: no usage reports, no Hugging Face Hub look-ups.
ENVIRONMENT: Mapping[str, str] = {
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}

# In a datacenter vLLM runs in its own pod behind a Service; elsewhere it shares the node
# with the gateway and is reached only by it, never from the network (vLLM checks no token).
POD_HOST = "0.0.0.0"  # noqa: S104 - the pod's network namespace, fronted by a Service
NODE_HOST = "127.0.0.1"


@dataclass(frozen=True)
class VllmLaunch:
    """Everything needed to start one vLLM server for one model."""

    model: str
    served_model_names: tuple[str, ...]
    weights: str
    argv: tuple[str, ...]
    host: str
    port: int
    gpus: int
    env: Mapping[str, str]
    sha256: str | None

    @property
    def command_line(self) -> str:
        """The launch as one shell line: the environment, then `vllm serve ...`."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "served_model_names": list(self.served_model_names),
            "weights": self.weights,
            "argv": list(self.argv),
            "port": self.port,
            "gpus": self.gpus,
            "env": dict(sorted(self.env.items())),
            "sha256": self.sha256,
        }


def settings_of(model: ModelSpec) -> VllmSettings:
    return model.vllm if model.vllm is not None else VllmSettings()


def vllm_launch(profile: Profile, model: ModelSpec) -> VllmLaunch:
    if model.engine != "vllm":
        raise ValueError(f"model {model.name!r} uses engine {model.engine}, not vllm")
    if model.quantization not in QUANTIZATION_METHODS:
        raise ValueError(
            f"model {model.name!r}: vLLM cannot load {model.quantization} weights; name the "
            "format: awq, gptq, compressed-tensors, bitsandbytes, fp8 or none"
        )
    method = QUANTIZATION_METHODS[model.quantization]
    settings = settings_of(model)
    weights = local_weights_path(model.source)
    served = (model.name, *model.aliases)
    for name in served:
        if not name or name.startswith("-"):
            # argparse would take it for an option of `vllm serve`.
            raise ValueError(f"model {model.name!r}: vLLM cannot serve under the name {name!r}")
    host = POD_HOST if profile.kind == "datacenter" else NODE_HOST
    argv = [
        "vllm",
        "serve",
        weights,
        "--served-model-name",
        *served,
        "--host",
        host,
        "--port",
        str(settings.port),
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--max-model-len",
        str(settings.max_model_len or model.context_length),
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--enable-prefix-caching"
        if settings.enable_prefix_caching
        else "--no-enable-prefix-caching",
    ]
    if settings.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", settings.kv_cache_dtype]
    if method is not None:
        argv += ["--quantization", method]
    return VllmLaunch(
        model=model.name,
        served_model_names=served,
        weights=weights,
        argv=tuple(argv),
        host=host,
        port=settings.port,
        gpus=settings.tensor_parallel_size,
        env=dict(ENVIRONMENT),
        sha256=model.sha256,
    )


def vllm_launches(profile: Profile) -> list[VllmLaunch]:
    return [vllm_launch(profile, model) for model in profile.models if model.engine == "vllm"]


def vllm_service_name(model: ModelSpec) -> str:
    """The Kubernetes Service of the model's vLLM in a datacenter: an RFC 1035 label."""
    return dns_label("vllm", model.name)


def vllm_service_url(model: ModelSpec) -> str:
    """The in-cluster OpenAI-compatible base URL the datacenter Runtime stack exposes."""
    return (
        f"http://{vllm_service_name(model)}.{RUNTIME_NAMESPACE}.svc.cluster.local:"
        f"{settings_of(model).port}/v1"
    )


def render(profile: Profile) -> Mapping[str, bytes]:
    files: dict[str, bytes] = {}
    for launch in vllm_launches(profile):
        files[f"vllm/{launch.model}.json"] = json.dumps(launch.to_json(), indent=2).encode() + b"\n"
        files[f"vllm/{launch.model}.args"] = launch.command_line.encode() + b"\n"
    return files


RENDERER = Renderer("vllm", "vLLM launch settings per vllm model (argv, env, port, GPUs)", render)
