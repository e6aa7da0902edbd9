"""The stack config is checked whole before any resource exists; bad config names the
key, the stack file and the line, and the program registers nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from sovereign.profile.loader import load_profile
from sovereign.render.pulumi import render as render_stack_config
from stacks import config as stack_config
from stacks.synth import PROJECT_DIR, Synthesized
from tests.stacks.harness import STACK_FILE, datacenter_config, synth


def _profile(flat: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(flat["sovereign:profile"])
    return data


def _with_profile(profile: dict[str, Any]) -> dict[str, str]:
    return datacenter_config(**{"sovereign:profile": json.dumps(profile)})


def _registered(flat: dict[str, str], project_dir: Path = PROJECT_DIR) -> list[Synthesized]:
    def build(settings: stack_config.StackSettings) -> None:
        import pulumi_kubernetes as k8s

        k8s.core.v1.Namespace("marker", metadata={"name": "marker"})

    return synth(build, flat, project_dir)


def test_the_committed_stack_file_holds_the_render_of_the_datacenter_profile() -> None:
    """Only sovereign:profile is compared: secrets set with `pulumi config set --secret`
    and provider keys belong in the stack file too."""
    rendered = render_stack_config(load_profile(PROJECT_DIR / "profiles" / "datacenter.yaml"))
    assert list(rendered) == ["Pulumi.datacenter.yaml"]
    yaml = YAML(typ="safe", pure=True)
    fresh = yaml.load(rendered["Pulumi.datacenter.yaml"])["config"]["sovereign:profile"]
    committed = yaml.load(STACK_FILE.read_text())["config"]["sovereign:profile"]
    assert committed == fresh


def test_profiles_without_a_cluster_render_no_stack_config() -> None:
    for name in ("personal", "edge", "air-gapped"):
        assert render_stack_config(load_profile(PROJECT_DIR / "profiles" / f"{name}.yaml")) == {}


def test_a_valid_config_loads_with_its_secrets() -> None:
    seen: dict[str, stack_config.StackSettings] = {}
    synth(lambda settings: seen.setdefault("settings", settings))
    settings = seen["settings"]
    assert settings.profile.name == "sovereign-dc1"
    assert settings.cluster.registry == "registry.dc1.internal:5000"
    assert set(settings.secrets) == {secret.key for secret in stack_config.SECRETS}
    assert settings.protect is True
    assert settings.image("vllm").startswith("registry.dc1.internal:5000/vllm/vllm-openai@sha256:")


def test_protect_can_be_turned_off_for_teardown() -> None:
    seen: dict[str, stack_config.StackSettings] = {}
    flat = datacenter_config(**{"sovereign:protect": "false"})
    synth(lambda settings: seen.setdefault("settings", settings), flat)
    assert seen["settings"].protect is False


def test_a_missing_profile_is_refused_naming_the_key_and_the_render_command() -> None:
    flat = datacenter_config()
    del flat["sovereign:profile"]
    with pytest.raises(stack_config.ConfigError) as error:
        _registered(flat)
    assert "sovereign:profile is not set" in str(error.value)
    assert "sovereign stack config" in str(error.value)


def test_a_profile_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(stack_config.ConfigError, match="must be a mapping"):
        _registered(datacenter_config(**{"sovereign:profile": json.dumps(["x"])}))


def test_missing_secrets_are_named_with_the_command_that_sets_them() -> None:
    flat = datacenter_config()
    del flat["sovereign:memoryPassphrase"]
    del flat["sovereign:keycloakAdminPassword"]
    with pytest.raises(stack_config.ConfigError) as error:
        _registered(flat)
    message = str(error.value)
    assert "sovereign:keycloakAdminPassword" in message
    assert "sovereign:memoryPassphrase" in message
    assert "pulumi config set --secret sovereign:memoryPassphrase" in message
    assert "keycloakDatabasePassword" not in message


def test_a_bad_field_names_the_stack_file_line_and_field(tmp_path: Path) -> None:
    """The error points into Pulumi.<stack>.yaml when that file holds the profile."""
    text = STACK_FILE.read_text()
    bad = text.replace("storage_class: local-nvme", "storage_class: Local_NVMe")
    (tmp_path / STACK_FILE.name).write_text(bad)
    profile = _profile(datacenter_config())
    profile["cluster"]["storage_class"] = "Local_NVMe"
    with pytest.raises(stack_config.ConfigError) as error:
        _registered(_with_profile(profile), tmp_path)
    line = next(n for n, row in enumerate(bad.splitlines(), 1) if "Local_NVMe" in row)
    assert f"{tmp_path / STACK_FILE.name}:{line}:" in str(error.value)
    assert "sovereign:profile.cluster.storage_class" in str(error.value)


def test_a_bad_field_set_only_in_the_engine_config_still_names_the_field(tmp_path: Path) -> None:
    shutil.copy(STACK_FILE, tmp_path / STACK_FILE.name)
    profile = _profile(datacenter_config())
    profile["cluster"]["images"]["gateway"] = "sovereign/gateway:latest"
    with pytest.raises(stack_config.ConfigError) as error:
        _registered(_with_profile(profile), tmp_path)
    message = str(error.value)
    assert "<config sovereign:profile>" in message
    assert "sovereign:profile.cluster.images.gateway" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda p: p.update(kind="edge"), "cluster is for kind datacenter"),
        (
            lambda p: (p.pop("cluster"), p["memory"].update(key_source="tpm")),
            "no cluster section; the stack needs one",
        ),
        (
            lambda p: p["cluster"].update(registry="other.internal:5000"),
            "is not one of the profile's oci mirrors",
        ),
        (
            lambda p: p["cluster"]["gateway"].update(max_replicas=2),
            "max_replicas 2 is below replicas 3",
        ),
        (lambda p: p["memory"].update(key_source="tpm"), "cannot reach a node's TPM"),
        (
            lambda p: p["memory"].update(qdrant_url="http://qdrant.elsewhere:6333"),
            "is not the Memory component's Qdrant Service",
        ),
        (
            lambda p: p["policy"].update(opa_url="http://opa.example:8181"),
            "is not the Policy component's OPA Service",
        ),
        (lambda p: p["policy"].update(engine="embedded"), "the stack runs OPA servers"),
        (
            lambda p: p["identity"].update(
                issuer="https://auth.dc1.internal/auth/realms/sovereign"
            ),
            "which the cluster's Keycloak serves",
        ),
        (
            lambda p: p["audit"].update(signing_key="/var/lib/sovereign/audit/key"),
            "audit.signing_key .* overlaps audit.path",
        ),
        (
            lambda p: p["memory"].update(data_dir="/var/lib/sovereign/bundle/memory"),
            "memory.data_dir .* overlaps cluster.gateway.models_claim",
        ),
        (
            lambda p: p["policy"]["lock"].update(manifest="/etc/lock.json"),
            "would be mounted over the image's own directory",
        ),
        (
            lambda p: p["identity"].update(
                issuer="https://auth.dc1.internal:8443/realms/sovereign"
            ),
            r"identity\.issuer: .*:8443/realms/sovereign is not https://HOST/realms/sovereign",
        ),
        (
            lambda p: p["cluster"].update(gpu_runtime_class=None),
            r"cluster\.gpu_runtime_class: .*kata \(sandbox\.runtime\), which passes no GPU "
            "into its guest",
        ),
        (
            lambda p: p["cluster"].update(gpu_runtime="gvisor", gpu_resource="nvidia.com/gpu"),
            r"cluster\.gpu_runtime_class: .*under gvisor \(cluster\.gpu_runtime\).*applies only "
            "with kata",
        ),
        (
            lambda p: p["audit"].update(path="/tmp/sovereign/audit"),
            r"audit\.path \(/tmp/sovereign/audit\) overlaps <scratch> \(/tmp\)",
        ),
        (
            lambda p: p["memory"].update(data_dir="/usr/lib/sovereign"),
            r"memory\.data_dir: /usr/lib/sovereign would be mounted over the image's own directory",
        ),
        (
            lambda p: p["policy"]["lock"].update(manifest="/etc/sovereign-gateway/lock.json"),
            r"policy\.lock\.manifest \(/etc/sovereign-gateway\) overlaps <gateway config> "
            r"\(/etc/sovereign-gateway\)",
        ),
        (
            lambda p: p["memory"]["embeddings"].update(source="pkg:minilm/model.onnx"),
            "use a bundle: or hf: source on a cluster, not pkg:",
        ),
        (
            lambda p: p["models"][0].update(source="file:/srv/models/llama"),
            "use a bundle: or hf: source on a cluster, not file:",
        ),
    ],
)
def test_profiles_the_stack_cannot_deploy_are_refused_before_any_resource(
    change: Any, expected: str
) -> None:
    profile = _profile(datacenter_config())
    change(profile)
    with pytest.raises(stack_config.ConfigError, match=expected):
        _registered(_with_profile(profile))


def test_nothing_is_registered_when_the_config_is_bad() -> None:
    """The harness raises before `build`; the marker namespace proves build never ran."""
    profile = _profile(datacenter_config())
    profile["cluster"]["ingress"]["host"] = "not a host"
    created: list[str] = []

    def build(settings: stack_config.StackSettings) -> None:
        created.append("ran")

    with pytest.raises(stack_config.ConfigError):
        synth(build, _with_profile(profile))
    assert created == []


def test_a_problem_found_after_validation_names_its_line_in_the_stack_file(
    tmp_path: Path,
) -> None:
    text = STACK_FILE.read_text().replace("engine: remote", "engine: embedded")
    (tmp_path / STACK_FILE.name).write_text(text)
    profile = _profile(datacenter_config())
    profile["policy"]["engine"] = "embedded"
    with pytest.raises(stack_config.ConfigError) as error:
        _registered(_with_profile(profile), tmp_path)
    rows = text.splitlines()
    policy = rows.index("    policy:")
    line = next(
        n for n, row in enumerate(rows, 1) if n > policy and row.strip() == "engine: embedded"
    )
    assert f"{tmp_path / STACK_FILE.name}:{line}:" in str(error.value)
    assert "sovereign:profile.policy.engine" in str(error.value)


def test_the_whole_program_registers_nothing_for_a_profile_it_cannot_deploy() -> None:
    """Checks run before the first resource: a bad profile leaves the cluster untouched."""
    from stacks.program import deploy

    profile = _profile(datacenter_config())
    profile["audit"]["signing_key"] = "/etc/sovereign/audit.key"
    profile["policy"]["lock"]["manifest"] = "/etc/sovereign/lock.json"
    profile["policy"]["lock"]["public_key"] = "/etc/sovereign/lock.pub"
    registered: list[Synthesized] = []
    with pytest.raises(stack_config.ConfigError, match="overlaps"):
        registered = synth(deploy, _with_profile(profile))
    assert registered == []
