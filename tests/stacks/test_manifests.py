"""Every manifest the whole program would create, checked the way a cluster would check it.

Built-in kinds go through kubernetes-validate in strict mode (unknown fields are errors)
for the oldest and newest Kubernetes the stack supports; SPIRE's custom resources through
their vendored CRD schema; the whole set through the Rego guardrails in policies/k8s/
under the real OPA.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from ruamel.yaml import YAML

from stacks import guardrails
from stacks.components import workload_identity
from stacks.synth import Synthesized, write_manifests
from tests.stacks.harness import synth

VERSIONS = ("1.31.0", "1.37.0")
COMPONENTS_DIR = Path(workload_identity.__file__).parent
CUSTOM_GROUP = "spire.spiffe.io/"
COMPONENT_TYPE = re.compile(r"^sovereign:[a-z_]+:[A-Z][A-Za-z]+$")
COMPONENTS = {
    "sovereign:platform:Platform",
    "sovereign:identity:Identity",
    "sovereign:policy:Policy",
    "sovereign:workload_identity:WorkloadIdentity",
    "sovereign:memory:Memory",
    "sovereign:runtime:Runtime",
    "sovereign:gateway:Gateway",
}
# Kinds that live outside any namespace; every other kind the stack creates is namespaced.
CLUSTER_SCOPED = {
    "Namespace",
    "PriorityClass",
    "RuntimeClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "CSIDriver",
    "StorageClass",
    "IngressClass",
    "ClusterSPIFFEID",
    "ClusterStaticEntry",
    "ClusterFederatedTrustDomain",
}


# The API server checks these itself, whatever a CRD's schema says of them.
TYPE_META = {"apiVersion", "kind", "metadata"}


def is_custom(manifest: dict[str, Any]) -> bool:
    return str(manifest["apiVersion"]).startswith(CUSTOM_GROUP)


def where(manifest: dict[str, Any]) -> str:
    meta = manifest.get("metadata", {})
    return f"{manifest.get('kind')} {meta.get('namespace', '-')}/{meta.get('name', '?')}"


def test_the_program_creates_kubernetes_resources(k8s_manifests: list[dict[str, Any]]) -> None:
    kinds = Counter(m["kind"] for m in k8s_manifests)
    for kind in ("Namespace", "NetworkPolicy", "Deployment", "StatefulSet", "DaemonSet"):
        assert kinds[kind] > 0, kind


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_manifests_pass_strict_kubernetes_validate(
    k8s_manifests: list[dict[str, Any]], version: str
) -> None:
    failures = []
    for manifest in k8s_manifests:
        if is_custom(manifest):
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            failures.append(f"{where(manifest)}: {e}")
    assert failures == []


def undeclared(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    """Fields the schema does not declare; the API server would drop them without a word."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        properties: dict[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for field, item in value.items():
            if path == "" and field in TYPE_META:
                continue
            if field in properties:
                found += undeclared(item, properties[field], f"{path}.{field}")
            elif isinstance(extra, dict):
                found += undeclared(item, extra, f"{path}.{field}")
            elif extra is not True:
                found.append(f"{path}.{field}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += undeclared(item, schema["items"], f"{path}[{index}]")
    return found


def test_custom_resources_match_their_crd_schema(k8s_manifests: list[dict[str, Any]]) -> None:
    custom = [m for m in k8s_manifests if is_custom(m)]
    assert custom, "the stack registers workloads with SPIRE through ClusterSPIFFEIDs"
    for manifest in custom:
        schema = workload_identity.custom_resource_schema(manifest["kind"])
        validator_class = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        errors = [e.message for e in validator_class(schema).iter_errors(manifest)]
        assert errors == [], where(manifest)
        assert undeclared(manifest, schema, "") == [], where(manifest)


def test_undeclared_finds_a_misspelt_field() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"spiffeIDTemplate": {"type": "string"}}}
        },
    }
    assert undeclared({"spec": {"spiffeIdTemplate": "x"}}, schema, "") == [".spec.spiffeIdTemplate"]
    assert undeclared({"spec": {"spiffeIDTemplate": "x"}}, schema, "") == []


def test_every_manifest_names_itself_and_its_namespace(
    k8s_manifests: list[dict[str, Any]],
) -> None:
    namespaces = {m["metadata"]["name"] for m in k8s_manifests if m["kind"] == "Namespace"}
    for manifest in k8s_manifests:
        meta = manifest.get("metadata", {})
        assert isinstance(meta.get("name"), str), where(manifest)
        assert meta["name"], where(manifest)
        if manifest["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, where(manifest)
        else:
            # A namespace the stack itself creates, so nothing lands in `default`.
            assert meta.get("namespace") in namespaces, where(manifest)


def test_no_two_manifests_are_the_same_object(k8s_manifests: list[dict[str, Any]]) -> None:
    seen = Counter(
        (m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]) for m in k8s_manifests
    )
    assert [identity for identity, count in seen.items() if count > 1] == []


@pytest.fixture(scope="module")
def guardrail_data() -> guardrails.GuardrailData:
    """The guardrails' parameters the committed stack implies, as `pulumi preview` uses them."""
    captured: list[guardrails.GuardrailData] = []
    synth(lambda settings: captured.append(guardrails.guardrail_data(settings)))
    (data,) = captured
    return data


def test_whole_stack_passes_the_guardrails(
    k8s_manifests: list[dict[str, Any]], guardrail_data: guardrails.GuardrailData
) -> None:
    data = guardrail_data
    assert data.registry == "registry.dc1.internal:5000"
    # The GPU operator's Kata class is the one class accepted besides gvisor and kata.
    assert data.extra_runtime_classes == ("kata-qemu-nvidia-gpu",)
    assert data.gpu_resource == "nvidia.com/pgpu"
    assert data.gpu_runc_allowed is False
    denials = guardrails.evaluate(
        k8s_manifests,
        registry=data.registry,
        gpu_runc_allowed=data.gpu_runc_allowed,
        extra_runtime_classes=data.extra_runtime_classes,
        gpu_resource=data.gpu_resource,
    )
    assert denials == []


def test_whole_stack_passes_the_guardrails_at_admission(
    k8s_manifests: list[dict[str, Any]], guardrail_data: guardrails.GuardrailData
) -> None:
    """Object by object, as an admission webhook would see the stack being applied."""
    for manifest in k8s_manifests:
        review = guardrails.admission_review(manifest)
        assert guardrails.evaluate_input(review, guardrail_data) == [], where(manifest)


def test_the_gpu_runtime_class_passes_only_when_the_data_names_it(
    k8s_manifests: list[dict[str, Any]], guardrail_data: guardrails.GuardrailData
) -> None:
    """Without the stack's extra class, exactly its GPU pods are denied their RuntimeClass."""
    denials = guardrails.evaluate(
        k8s_manifests,
        registry=guardrail_data.registry,
        gpu_runc_allowed=False,
        gpu_resource=guardrail_data.gpu_resource,
    )
    assert denials
    assert {message.split(" ", 1)[0] for message in denials} == {"K8S-010"}
    assert all("kata-qemu-nvidia-gpu" in message for message in denials), denials


def test_guardrails_catch_a_tampered_stack(k8s_manifests: list[dict[str, Any]]) -> None:
    """The clean result above is the policy judging the stack, not the policy missing it."""
    items = [m for m in k8s_manifests if m["kind"] != "NetworkPolicy"]
    denials = guardrails.evaluate(items, registry="elsewhere:5000", gpu_runc_allowed=False)
    rules = {message.split(" ", 1)[0] for message in denials}
    assert {"K8S-012", "K8S-014", "K8S-015"} <= rules


def test_component_type_tokens(stack: list[Synthesized]) -> None:
    components = [r for r in stack if not r.custom]
    for resource in components:
        assert COMPONENT_TYPE.match(resource.type), resource.type
    assert {r.type for r in components} == COMPONENTS
    assert len(components) == len(COMPONENTS)
    # The token's module names the file that defines it.
    for token in COMPONENTS:
        module = token.split(":")[1]
        assert (COMPONENTS_DIR / f"{module}.py").is_file(), token


def test_written_manifests_read_back_equal(
    k8s_manifests: list[dict[str, Any]], tmp_path: Path
) -> None:
    written = write_manifests(k8s_manifests, tmp_path)
    # One file each: two manifests sharing a file name would lose one of them.
    assert len(set(written)) == len(k8s_manifests)
    yaml = YAML(typ="safe", pure=True)
    for path, manifest in zip(written, k8s_manifests, strict=True):
        assert path.is_relative_to(tmp_path)
        assert yaml.load(path.read_text(encoding="utf-8")) == manifest, path
