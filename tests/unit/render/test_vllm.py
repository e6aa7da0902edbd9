"""Renderer `vllm`: the `vllm serve` launch of every vllm model, read back flag by flag."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import get_args

import pytest

from sovereign.profile.defaults import KINDS
from sovereign.profile.loader import ProfileError, load_profile, parse_profile
from sovereign.profile.model import ModelSpec, Profile, VllmSettings
from sovereign.profile.types import Quantization
from sovereign.render import MANIFEST, render_files, render_to
from sovereign.render.vllm import (
    BUNDLE_ROOT,
    NODE_HOST,
    POD_HOST,
    QUANTIZATION_METHODS,
    VllmLaunch,
    vllm_launch,
    vllm_launches,
    vllm_service_name,
    vllm_service_url,
)

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "profiles").glob("*.yaml"))
SHA = "a" * 64
RFC1035_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV = {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def parse_argv(argv: tuple[str, ...] | list[str]) -> tuple[str, dict[str, list[str]]]:
    """`vllm serve WEIGHTS --flag value... --switch` -> (weights, {flag: values})."""
    assert list(argv[:2]) == ["vllm", "serve"]
    weights, rest = argv[2], list(argv[3:])
    flags: dict[str, list[str]] = {}
    current: str | None = None
    for token in rest:
        if token.startswith("--"):
            assert token not in flags, f"{token} given twice"
            current = token
            flags[current] = []
        else:
            assert current is not None, f"value {token!r} before any flag"
            flags[current].append(token)
    return weights, flags


def vllm_profile(model_yaml: str = "", kind: str = "datacenter", nodes: str = "") -> Profile:
    """A profile with one vllm model `m`; `model_yaml` adds lines to the model."""
    return parse_profile(
        f"kind: {kind}\nname: t\n{nodes}"
        "models:\n  - name: m\n    engine: vllm\n    source: bundle:models/m\n"
        f"    sha256: {SHA}\n    context_length: 8192\n    allowed_roles: [user]\n{model_yaml}",
        "t.yaml",
    )


def only_launch(profile: Profile) -> VllmLaunch:
    [launch] = vllm_launches(profile)
    return launch


def resolved_profiles() -> list[tuple[str, Profile]]:
    examples = [(path.name, load_profile(path)) for path in EXAMPLES]
    kinds = [(f"{kind} defaults", parse_profile(f"kind: {kind}\nname: x\n", "x")) for kind in KINDS]
    return examples + kinds


@pytest.mark.parametrize(("label", "profile"), resolved_profiles(), ids=lambda v: str(v))
def test_every_vllm_model_launches_with_its_profile_settings(label: str, profile: Profile) -> None:
    models = [model for model in profile.models if model.engine == "vllm"]
    launches = vllm_launches(profile)
    assert [launch.model for launch in launches] == [model.name for model in models]
    for model, launch in zip(models, launches, strict=True):
        settings = model.vllm or VllmSettings()
        weights, flags = parse_argv(launch.argv)
        assert weights == launch.weights
        assert flags.pop("--served-model-name") == [model.name, *model.aliases]
        assert flags.pop("--host") == [POD_HOST if profile.kind == "datacenter" else NODE_HOST]
        assert flags.pop("--port") == [str(settings.port)] == [str(launch.port)]
        assert flags.pop("--tensor-parallel-size") == [str(settings.tensor_parallel_size)]
        assert launch.gpus == settings.tensor_parallel_size
        assert float(flags.pop("--gpu-memory-utilization")[0]) == settings.gpu_memory_utilization
        max_len = settings.max_model_len or model.context_length
        assert flags.pop("--max-model-len") == [str(max_len)]
        assert flags.pop("--max-num-seqs") == [str(settings.max_num_seqs)]
        caching = "--" + ("" if settings.enable_prefix_caching else "no-")
        assert flags.pop(caching + "enable-prefix-caching") == []
        if settings.kv_cache_dtype != "auto":
            assert flags.pop("--kv-cache-dtype") == [settings.kv_cache_dtype]
        method = QUANTIZATION_METHODS[model.quantization]
        if method is not None:
            assert flags.pop("--quantization") == [method]
        assert flags == {}, f"unexpected flags {flags}"
        assert launch.env == ENV
        assert launch.sha256 == model.sha256


@pytest.mark.parametrize(("label", "profile"), resolved_profiles(), ids=lambda v: str(v))
def test_the_rendered_files_hold_the_launch(label: str, profile: Profile) -> None:
    files = render_files(profile, ["vllm"])
    launches = vllm_launches(profile)
    assert set(files) == {
        f"vllm/{launch.model}.{ext}" for launch in launches for ext in ("json", "args")
    }
    for launch in launches:
        document = json.loads(files[f"vllm/{launch.model}.json"])
        assert list(document) == [
            "model",
            "served_model_names",
            "weights",
            "argv",
            "port",
            "gpus",
            "env",
            "sha256",
        ]
        assert document["argv"] == list(launch.argv)
        assert document["served_model_names"] == list(launch.served_model_names)
        assert (document["port"], document["gpus"]) == (launch.port, launch.gpus)
        assert document["env"] == ENV
        line = files[f"vllm/{launch.model}.args"].decode()
        assert line.endswith("\n")
        assert line.count("\n") == 1
        words = shlex.split(line)
        assert dict(word.split("=", 1) for word in words[: len(ENV)]) == ENV
        assert tuple(words[len(ENV) :]) == launch.argv


@pytest.mark.parametrize("name", ["personal.yaml", "edge.yaml"])
def test_profiles_without_vllm_models_render_no_vllm_files(name: str, tmp_path: Path) -> None:
    profile = load_profile(ROOT / "profiles" / name)
    assert render_files(profile, ["vllm"]) == {}
    out = tmp_path / "out"
    assert render_to(profile, out, ["vllm"]) == {}
    assert [p.name for p in out.iterdir()] == [MANIFEST]


def test_the_datacenter_example_launches_each_vllm_model() -> None:
    profile = load_profile(ROOT / "profiles" / "datacenter.yaml")
    files = render_files(profile)
    assert {path for path in files if path.startswith("vllm/")} == {
        "vllm/llama-3.1-70b-instruct-fp8.json",
        "vllm/llama-3.1-70b-instruct-fp8.args",
        "vllm/qwen2.5-7b-instruct-awq.json",
        "vllm/qwen2.5-7b-instruct-awq.args",
    }
    large = json.loads(files["vllm/llama-3.1-70b-instruct-fp8.json"])
    assert large["argv"] == [
        "vllm",
        "serve",
        f"{BUNDLE_ROOT}/models/llama-3.1-70b-instruct-fp8",
        "--served-model-name",
        "llama-3.1-70b-instruct-fp8",
        "default",
        "large",
        "--host",
        "0.0.0.0",  # noqa: S104 - the pod's address, behind its Service
        "--port",
        "8000",
        "--tensor-parallel-size",
        "4",
        "--gpu-memory-utilization",
        "0.9",
        "--max-model-len",
        "32768",
        "--max-num-seqs",
        "256",
        "--enable-prefix-caching",
        "--quantization",
        "fp8",
    ]
    assert large["gpus"] == 4
    assert large["sha256"] == profile.models[0].sha256


def test_vllm_listens_on_all_addresses_only_in_a_pod() -> None:
    assert (POD_HOST, NODE_HOST) == ("0.0.0.0", "127.0.0.1")  # noqa: S104


def test_the_air_gapped_example_serves_on_loopback_beside_the_gateway() -> None:
    profile = load_profile(ROOT / "profiles" / "air-gapped.yaml")
    files = render_files(profile, ["vllm"])
    assert set(files) == {
        "vllm/qwen2.5-7b-instruct-awq.json",
        "vllm/qwen2.5-7b-instruct-awq.args",
    }
    launch = only_launch(profile)
    _, flags = parse_argv(launch.argv)
    assert flags["--host"] == ["127.0.0.1"]
    assert flags["--port"] == ["8001"]
    assert flags["--quantization"] == ["awq_marlin"]
    assert [str(url) for url in profile.models[0].replicas] == ["http://127.0.0.1:8001/v1"]


def test_every_quantization_but_int4_has_a_vllm_method() -> None:
    assert set(QUANTIZATION_METHODS) == set(get_args(Quantization)) - {"int4"}


@pytest.mark.parametrize("quantization", get_args(Quantization))
def test_quantization_maps_to_the_vllm_method(quantization: str) -> None:
    text = f"    quantization: {quantization}\n"
    if quantization == "int4":
        with pytest.raises(ProfileError, match="name the 4-bit format"):
            vllm_profile(text)
        return
    _, flags = parse_argv(only_launch(vllm_profile(text)).argv)
    expected = {
        "awq": ["awq_marlin"],
        "gptq": ["gptq_marlin"],
        "compressed-tensors": ["compressed-tensors"],
        "bitsandbytes": ["bitsandbytes"],
        "fp8": ["fp8"],
        "none": None,
    }[quantization]
    assert flags.get("--quantization") == expected
    assert "--load-format" not in flags, "vLLM picks the bitsandbytes loader itself"


@pytest.mark.parametrize(
    ("enabled", "flag"), [(True, "--enable-prefix-caching"), (False, "--no-enable-prefix-caching")]
)
def test_prefix_caching_is_switched_explicitly(enabled: bool, flag: str) -> None:
    value = "true" if enabled else "false"
    _, flags = parse_argv(
        only_launch(vllm_profile(f"    vllm:\n      enable_prefix_caching: {value}\n")).argv
    )
    caching = [name for name in flags if "prefix-caching" in name]
    assert caching == [flag]


def test_an_fp8_kv_cache_is_asked_for_and_auto_is_left_to_vllm() -> None:
    _, fp8 = parse_argv(only_launch(vllm_profile("    vllm:\n      kv_cache_dtype: fp8\n")).argv)
    _, auto = parse_argv(only_launch(vllm_profile()).argv)
    assert fp8["--kv-cache-dtype"] == ["fp8"]
    assert "--kv-cache-dtype" not in auto


def test_served_model_names_are_the_name_then_the_aliases() -> None:
    launch = only_launch(vllm_profile("    aliases: [default, big]\n"))
    _, flags = parse_argv(launch.argv)
    assert launch.served_model_names == ("m", "default", "big")
    assert flags["--served-model-name"] == ["m", "default", "big"]


def test_settings_are_passed_through() -> None:
    profile = vllm_profile(
        "    vllm:\n      tensor_parallel_size: 2\n      gpu_memory_utilization: 0.85\n"
        "      max_model_len: 4096\n      max_num_seqs: 32\n      port: 9000\n",
        nodes="nodes:\n  - name: gpu-01\n    role: worker\n    gpu: nvidia\n    gpu_count: 2\n"
        "    tpm: required\n",
    )
    launch = only_launch(profile)
    _, flags = parse_argv(launch.argv)
    assert flags["--tensor-parallel-size"] == ["2"]
    assert flags["--gpu-memory-utilization"] == ["0.85"]
    assert flags["--max-model-len"] == ["4096"]
    assert flags["--max-num-seqs"] == ["32"]
    assert flags["--port"] == ["9000"]
    assert (launch.gpus, launch.port) == (2, 9000)


def test_without_settings_max_model_len_is_the_context_length() -> None:
    _, flags = parse_argv(only_launch(vllm_profile()).argv)
    assert flags["--max-model-len"] == ["8192"]
    assert flags["--tensor-parallel-size"] == ["1"]


def test_no_remote_code_and_no_removed_flags() -> None:
    for _, profile in resolved_profiles():
        for launch in vllm_launches(profile):
            for flag in ("--trust-remote-code", "--disable-log-requests", "--load-format"):
                assert flag not in launch.argv


def test_weights_are_the_bundle_or_file_path() -> None:
    bundle = only_launch(vllm_profile())
    assert bundle.weights == f"{BUNDLE_ROOT}/models/m"
    assert BUNDLE_ROOT == "/var/lib/sovereign/bundle"
    profile = vllm_profile()
    model = profile.models[0].model_copy(update={"source": "file:/srv/models/m"})
    assert vllm_launch(profile, model).weights == "/srv/models/m"


@pytest.mark.parametrize(
    "source",
    ["hf:org/repo@0123abc/model.safetensors", "pkg:tool/m.gguf", "bundle:../etc", "file:rel/m"],
)
def test_a_source_vllm_cannot_serve_is_refused(source: str) -> None:
    profile = vllm_profile()
    model = profile.models[0].model_copy(update={"source": source})
    with pytest.raises(ValueError, match=r"bundle:|file:"):
        vllm_launch(profile, model)


@pytest.mark.parametrize("alias", ["", "--trust-remote-code"])
def test_a_name_vllm_would_read_as_an_option_is_refused(alias: str) -> None:
    profile = vllm_profile()
    model = profile.models[0].model_copy(update={"aliases": [alias]})
    with pytest.raises(ValueError, match="cannot serve under the name"):
        vllm_launch(profile, model)


def test_only_vllm_models_have_a_launch() -> None:
    profile = load_profile(ROOT / "profiles" / "air-gapped.yaml")
    fallback = profile.models[1]
    assert fallback.engine == "llamacpp"
    with pytest.raises(ValueError, match="not vllm"):
        vllm_launch(profile, fallback)


def model_named(name: str, port: int | None = None) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "engine": "vllm",
            "source": "bundle:models/m",
            "context_length": 2048,
            "allowed_roles": ["user"],
            **({"vllm": {"port": port}} if port is not None else {}),
        }
    )


@pytest.mark.parametrize(
    ("name", "service"),
    [
        ("llama-3.1-70b-instruct-fp8", "vllm-llama-3-1-70b-instruct-fp8"),
        ("Qwen2.5-7B-Instruct-AWQ", "vllm-qwen2-5-7b-instruct-awq"),
        ("org:Model_v2..final.", "vllm-org-model-v2-final"),
        ("m", "vllm-m"),
    ],
)
def test_the_service_name_is_the_model_name_as_a_dns_label(name: str, service: str) -> None:
    assert vllm_service_name(model_named(name)) == service
    assert vllm_service_url(model_named(name)) == (
        f"http://{service}.sovereign-runtime.svc.cluster.local:8000/v1"
    )


def test_the_service_url_uses_the_vllm_port() -> None:
    assert vllm_service_url(model_named("m", port=8123)).endswith(":8123/v1")


def test_long_names_are_cut_to_63_characters_and_keep_apart() -> None:
    first = "A" * 60 + ".one-of-two-very-long-model-names"
    second = "A" * 60 + ".two-of-two-very-long-model-names"
    labels = {vllm_service_name(model_named(name)) for name in (first, second)}
    assert len(labels) == 2
    for label in labels:
        assert len(label) <= 63
        assert RFC1035_LABEL.match(label), label
    assert vllm_service_name(model_named(first)) == vllm_service_name(model_named(first))
    longest = "a" * 57 + "-" + "b" * 70
    label = vllm_service_name(model_named(longest))
    assert len(label) <= 63
    assert RFC1035_LABEL.match(label), label


def test_a_label_that_fits_is_not_hashed() -> None:
    name = "a" * 58  # "vllm-" + 58 = 63
    assert vllm_service_name(model_named(name)) == f"vllm-{name}"
    assert vllm_service_name(model_named(name + "b")) != f"vllm-{name}b"
