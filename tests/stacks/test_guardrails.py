"""The Kubernetes guardrails (policies/k8s/) under the real `opa eval`, on YAML fixtures.

Every negative fixture must fail with exactly the rule ids tests/stacks/fixtures/negative/
expected.yaml pairs it with, each message starting with its id; the positive set must pass
clean, both as a whole set and object by object as AdmissionReviews.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from stacks import guardrails
from tests.stacks.harness import datacenter_config, synth

FIXTURES = Path(__file__).parent / "fixtures"
NEGATIVE = FIXTURES / "negative"
POSITIVE = FIXTURES / "positive"
EXPECTED = NEGATIVE / "expected.yaml"
REGISTRY = "registry.dc1.internal:5000"
RULE_IDS = {f"K8S-{n:03d}" for n in range(1, 24)}
# The rules that need the whole set of manifests; an AdmissionReview carries one object.
CROSS_OBJECT = {"K8S-014", "K8S-015", "K8S-016"}
MESSAGE = re.compile(r"^(K8S-\d{3}) [a-z-]+: \S")


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in YAML(typ="safe", pure=True).load_all(path.read_text()) if doc]


def expected() -> dict[str, list[str]]:
    table: dict[str, list[str]] = YAML(typ="safe", pure=True).load(EXPECTED.read_text())
    return table


def positive() -> list[dict[str, Any]]:
    return [m for path in sorted(POSITIVE.glob("*.yaml")) for m in load(path)]


def key(manifest: dict[str, Any]) -> tuple[str, str, str]:
    meta = manifest["metadata"]
    return manifest["kind"], meta.get("namespace", ""), meta["name"]


def with_positive(fixture: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fixture beside the positive set, which it replaces where they name the same object."""
    replaced = {key(m) for m in fixture}
    return [m for m in positive() if key(m) not in replaced] + fixture


def ids(messages: list[str]) -> set[str]:
    return {message.split(" ", 1)[0] for message in messages}


def evaluate(
    items: list[dict[str, Any]],
    *,
    gpu_runc_allowed: bool = False,
    extra_runtime_classes: tuple[str, ...] = (),
    gpu_resource: str = guardrails.DEFAULT_GPU_RESOURCE,
) -> list[str]:
    return guardrails.evaluate(
        items,
        registry=REGISTRY,
        gpu_runc_allowed=gpu_runc_allowed,
        extra_runtime_classes=extra_runtime_classes,
        gpu_resource=gpu_resource,
    )


def admission(manifest: dict[str, Any], *, gpu_runc_allowed: bool = False) -> list[str]:
    return guardrails.evaluate_input(
        guardrails.admission_review(manifest),
        guardrails.GuardrailData(REGISTRY, gpu_runc_allowed),
    )


def test_every_negative_fixture_is_paired_with_rule_ids() -> None:
    files = {path.name for path in NEGATIVE.glob("*.yaml") if path != EXPECTED}
    table = expected()
    assert set(table) == files
    assert all(table[name] and set(table[name]) <= RULE_IDS for name in table)
    # Every rule is shown to fire by at least one fixture.
    assert {rule for rules in table.values() for rule in rules} == RULE_IDS


def test_the_brief_negative_fixtures_are_there() -> None:
    table = expected()
    assert table["privileged-pod.yaml"] == ["K8S-001"]
    assert table["deployment-without-limits.yaml"] == ["K8S-007"]
    assert table["namespace-without-default-deny-egress.yaml"] == ["K8S-015"]
    assert table["tag-pinned-image.yaml"] == ["K8S-011"]
    assert table["host-path-volume.yaml"] == ["K8S-009"]
    assert table["pod-without-runtime-class.yaml"] == ["K8S-010"]
    assert "K8S-008" in table["spire-agent-in-another-namespace.yaml"]
    # One per bypass the review found.
    assert table["namespace-outside-sovereign-privileged.yaml"] == ["K8S-013"]
    assert table["namespace-outside-sovereign-without-default-deny.yaml"] == ["K8S-014", "K8S-015"]
    assert table["workload-in-undeclared-namespace.yaml"] == ["K8S-016"]
    assert table["replication-controller-privileged.yaml"] == ["K8S-001"]
    assert table["pod-template-host-network.yaml"] == ["K8S-008"]
    assert table["allow-all-network-policy.yaml"] == ["K8S-017"]
    assert table["exempt-agent-host-root.yaml"] == ["K8S-009"]
    assert "K8S-008" in table["daemonset-pod-in-another-namespace.yaml"]
    assert table["host-port.yaml"] == ["K8S-018"]
    assert table["apparmor-unconfined.yaml"] == ["K8S-019"]
    assert table["unsafe-sysctl.yaml"] == ["K8S-020"]
    assert table["unmasked-proc-mount.yaml"] == ["K8S-021"]
    assert table["nfs-volume.yaml"] == ["K8S-022"]
    assert table["selinux-spc-type.yaml"] == ["K8S-023"]
    assert table["gpu-runtime-class-not-named.yaml"] == ["K8S-010"]
    assert table["pgpu-pod-on-runc.yaml"] == ["K8S-010"]


MANIFEST_FILES = sorted(p for p in FIXTURES.rglob("*.yaml") if p != EXPECTED)


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_fixtures_are_valid_kubernetes(path: Path) -> None:
    """A fixture must fail the guardrails for its fault, not for being malformed."""
    for manifest in load(path):
        kubernetes_validate.validate(manifest, "1.31.0", strict=True)


def test_positive_set_passes() -> None:
    items = positive()
    kinds = {m["kind"] for m in items}
    assert {"Namespace", "NetworkPolicy", "Deployment", "CronJob", "DaemonSet", "Pod"} <= kinds
    assert evaluate(items) == []


def test_positive_set_passes_object_by_object() -> None:
    for manifest in positive():
        assert admission(manifest) == [], key(manifest)


def test_positive_set_needs_its_registry() -> None:
    denials = guardrails.evaluate(positive(), registry="other.example:5000", gpu_runc_allowed=False)
    assert denials
    assert ids(denials) == {"K8S-012"}


@pytest.mark.parametrize("name", sorted(expected()))
def test_negative_fixture_fails_with_its_rule(name: str) -> None:
    fixture = load(NEGATIVE / name)
    denials = evaluate(with_positive(fixture))
    assert ids(denials) == set(expected()[name]), denials
    for message in denials:
        match = MESSAGE.match(message)
        assert match is not None, message
    # The message names the offending object, so a reader can find it.
    names = {m["metadata"]["name"] for m in fixture}
    assert all(any(name in message for name in names) for message in denials)


@pytest.mark.parametrize("name", sorted(expected()))
def test_negative_fixture_fails_at_admission(name: str) -> None:
    """The same per-object rules, asked the way an admission webhook asks them."""
    found: set[str] = set()
    for manifest in load(NEGATIVE / name):
        found |= ids(admission(manifest))
    assert found == set(expected()[name]) - CROSS_OBJECT


def test_negative_fixture_alone_fails_too() -> None:
    """Without the positive set beside it a fixture's own fault still shows."""
    assert "K8S-001" in ids(evaluate(load(NEGATIVE / "privileged-pod.yaml")))


def test_privileged_message_names_rule_object_and_container() -> None:
    denials = evaluate(with_positive(load(NEGATIVE / "privileged-pod.yaml")))
    assert denials == [
        "K8S-001 privileged: Pod sovereign-app/privileged container app is privileged"
    ]


def test_missing_egress_deny_message_names_the_namespace() -> None:
    denials = evaluate(with_positive(load(NEGATIVE / "namespace-without-default-deny-egress.yaml")))
    assert len(denials) == 1
    assert denials[0].startswith("K8S-015 default-deny-egress: Namespace sovereign-open-out ")


def test_gpu_pod_on_runc_passes_only_when_the_profile_allows_it() -> None:
    items = with_positive(load(NEGATIVE / "gpu-pod-on-runc.yaml"))
    assert ids(evaluate(items, gpu_runc_allowed=False)) == {"K8S-010"}
    assert evaluate(items, gpu_runc_allowed=True) == []
    # runc for GPUs does not extend to pods without a GPU.
    cpu = with_positive(load(NEGATIVE / "pod-without-runtime-class.yaml"))
    assert ids(evaluate(cpu, gpu_runc_allowed=True)) == {"K8S-010"}


def test_admission_review_carries_the_object_and_namespace() -> None:
    manifest = load(NEGATIVE / "privileged-pod.yaml")[0]
    review = guardrails.admission_review(manifest)
    assert review["kind"] == "AdmissionReview"
    assert review["request"]["object"] == manifest
    assert review["request"]["namespace"] == "sovereign-app"
    assert review["request"]["kind"] == {"group": "", "version": "v1", "kind": "Pod"}


def test_missing_opa_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(guardrails.GuardrailError, match="opa not found at"):
        guardrails.evaluate([], registry=REGISTRY, gpu_runc_allowed=False, opa=tmp_path / "no-opa")


def test_failing_opa_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "opa"
    broken.write_text("#!/bin/sh\necho 'rego_parse_error: boom' >&2\nexit 2\n")
    broken.chmod(0o755)
    with pytest.raises(guardrails.GuardrailError, match="exit status 2: rego_parse_error: boom"):
        guardrails.evaluate([], registry=REGISTRY, gpu_runc_allowed=False, opa=broken)


def test_guardrail_data_from_the_committed_stack() -> None:
    captured: list[guardrails.GuardrailData] = []
    synth(lambda settings: captured.append(guardrails.guardrail_data(settings)))
    # The committed profile passes whole GPUs into Kata guests under the GPU operator's class.
    assert captured == [
        guardrails.GuardrailData(
            "registry.dc1.internal:5000",
            False,
            extra_runtime_classes=("kata-qemu-nvidia-gpu",),
            gpu_resource="nvidia.com/pgpu",
        )
    ]
    document = captured[0].document()["k8s"]["guardrails"]
    assert document["extra_runtime_classes"] == ["kata-qemu-nvidia-gpu"]
    assert document["gpu_resource"] == "nvidia.com/pgpu"


def test_guardrail_data_allows_runc_only_when_named() -> None:
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    profile["cluster"]["gpu_runtime"] = "runc"
    # The Kata GPU class applies only with kata; runc GPU pods use the plain device plugin.
    profile["cluster"]["gpu_runtime_class"] = None
    profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"
    cfg["sovereign:profile"] = json.dumps(profile)
    captured: list[guardrails.GuardrailData] = []
    synth(lambda settings: captured.append(guardrails.guardrail_data(settings)), cfg)
    assert captured == [guardrails.GuardrailData("registry.dc1.internal:5000", True)]
    assert captured[0].extra_runtime_classes == ()
    assert captured[0].gpu_resource == "nvidia.com/gpu"


def test_undeclared_namespace_messages_name_the_namespace() -> None:
    denials = evaluate(with_positive(load(NEGATIVE / "workload-in-undeclared-namespace.yaml")))
    assert denials == [
        "K8S-016 namespace-declared: Deployment default/stray is in namespace default, "
        "which the set does not declare",
        "K8S-016 namespace-declared: Deployment sovereign-shadow/shadow is in namespace "
        "sovereign-shadow, which the set does not declare",
    ]


def test_every_open_network_policy_is_named() -> None:
    denials = evaluate(with_positive(load(NEGATIVE / "allow-all-network-policy.yaml")))
    named = {message.split(" ")[3] for message in denials}
    assert named == {
        "sovereign-app/open-ingress",
        "sovereign-app/open-egress",
        "sovereign-app/every-namespace",
        "sovereign-app/every-address",
    }
    # Both the IPv4 and the IPv6 "every address" blocks.
    assert sum("every-address" in message for message in denials) == 2


def test_the_agent_pod_is_exempt_only_through_its_daemonset() -> None:
    """The positive set's agent Pod passes; without its controller reference it does not."""
    (pod,) = [m for m in positive() if m["kind"] == "Pod"]
    assert admission(pod) == []
    orphan = {
        **pod,
        "metadata": {k: v for k, v in pod["metadata"].items() if k != "ownerReferences"},
    }
    assert ids(admission(orphan)) == {"K8S-002", "K8S-008", "K8S-009", "K8S-010"}


def test_a_named_gpu_runtime_class_passes() -> None:
    items = with_positive(load(NEGATIVE / "gpu-runtime-class-not-named.yaml"))
    assert evaluate(items, extra_runtime_classes=("kata-qemu-nvidia-gpu",)) == []
    assert ids(evaluate(items, extra_runtime_classes=("kata-nvidia",))) == {"K8S-010"}


def test_runc_for_gpus_follows_the_gpu_resource() -> None:
    items = with_positive(load(NEGATIVE / "pgpu-pod-on-runc.yaml"))
    assert ids(evaluate(items, gpu_runc_allowed=True)) == {"K8S-010"}
    assert evaluate(items, gpu_runc_allowed=True, gpu_resource="nvidia.com/pgpu") == []
    # The other GPU resource no longer unlocks runc.
    gpu = with_positive(load(NEGATIVE / "gpu-pod-on-runc.yaml"))
    assert ids(evaluate(gpu, gpu_runc_allowed=True, gpu_resource="nvidia.com/pgpu")) == {"K8S-010"}


def test_guardrail_data_names_no_extra_class_without_a_gpu_runtime_class() -> None:
    """GPU pods under gvisor (nvproxy) need no class besides the stack's own."""
    cfg = datacenter_config()
    profile = json.loads(cfg["sovereign:profile"])
    profile["cluster"]["gpu_runtime"] = "gvisor"
    profile["cluster"]["gpu_runtime_class"] = None
    profile["cluster"]["gpu_resource"] = "nvidia.com/gpu"
    cfg["sovereign:profile"] = json.dumps(profile)
    captured: list[guardrails.GuardrailData] = []
    synth(lambda settings: captured.append(guardrails.guardrail_data(settings)), cfg)
    assert captured == [guardrails.GuardrailData("registry.dc1.internal:5000", False)]
    document = captured[0].document()["k8s"]["guardrails"]
    assert document["extra_runtime_classes"] == []
    assert document["gpu_resource"] == "nvidia.com/gpu"
