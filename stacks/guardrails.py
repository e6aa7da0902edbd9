"""Run the Kubernetes guardrails in policies/k8s/ with the real OPA.

The Rego there is what an admission controller enforces; here `opa eval` runs it on the
manifests the program would create (`{"items": [...]}`, which the default-deny and
declared-namespace rules need) or on one AdmissionReview, so the tests check exactly what
a cluster would refuse.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign import tools
from stacks.config import StackSettings
from stacks.synth import PROJECT_DIR

POLICY_DIR = PROJECT_DIR / "policies" / "k8s"
QUERY = "data.k8s.guardrails.deny"
# The policy's own default for data.k8s.guardrails.gpu_resource.
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# opa eval answers in well under a second; the limit only stops a hung process.
_TIMEOUT_S = 120


class GuardrailError(Exception):
    """OPA is missing, failed, or answered something other than a set of messages."""


@dataclass(frozen=True)
class GuardrailData:
    """The guardrails' parameters, at data.k8s.guardrails."""

    registry: str
    gpu_runc_allowed: bool
    # RuntimeClass names accepted besides gvisor and kata (an existing GPU class).
    extra_runtime_classes: tuple[str, ...] = ()
    # The extended resource that makes a pod a GPU pod, for gpu_runc_allowed.
    gpu_resource: str = DEFAULT_GPU_RESOURCE

    def document(self) -> dict[str, Any]:
        return {
            "k8s": {
                "guardrails": {
                    "registry": self.registry,
                    "gpu_runc_allowed": self.gpu_runc_allowed,
                    "extra_runtime_classes": list(self.extra_runtime_classes),
                    "gpu_resource": self.gpu_resource,
                }
            }
        }


def guardrail_data(settings: StackSettings) -> GuardrailData:
    """The parameters a stack's settings imply: its registry, runc for GPUs if named, the
    cluster's own GPU RuntimeClass if it names one, and the resource GPU pods request."""
    cluster = settings.cluster
    return GuardrailData(
        registry=cluster.registry,
        gpu_runc_allowed=cluster.gpu_runtime == "runc",
        extra_runtime_classes=(
            (cluster.gpu_runtime_class,) if cluster.gpu_runtime_class is not None else ()
        ),
        gpu_resource=cluster.gpu_resource,
    )


def admission_review(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A CREATE AdmissionReview for `manifest`, as the API server sends a webhook."""
    meta = manifest.get("metadata", {})
    group, _, version = str(manifest.get("apiVersion", "")).rpartition("/")
    request: dict[str, Any] = {
        "uid": "00000000-0000-0000-0000-000000000000",
        "kind": {"group": group, "version": version, "kind": manifest.get("kind")},
        "operation": "CREATE",
        "name": meta.get("name", ""),
        "object": dict(manifest),
    }
    if "namespace" in meta:
        request["namespace"] = meta["namespace"]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def evaluate(
    manifests: Sequence[Mapping[str, Any]],
    *,
    registry: str,
    gpu_runc_allowed: bool,
    extra_runtime_classes: Sequence[str] = (),
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
    opa: Path | None = None,
) -> list[str]:
    """The sorted denials for a whole set of manifests; empty when all pass."""
    return evaluate_input(
        {"items": [dict(m) for m in manifests]},
        GuardrailData(registry, gpu_runc_allowed, tuple(extra_runtime_classes), gpu_resource),
        opa=opa,
    )


def evaluate_input(
    document: Mapping[str, Any], data: GuardrailData, *, opa: Path | None = None
) -> list[str]:
    """The sorted denials for any input the policy takes (a set, or an AdmissionReview)."""
    binary = _opa(opa)
    with tempfile.TemporaryDirectory(prefix="guardrails-") as scratch:
        # A JSON file given with -d lands at the data root, hence the full path inside it.
        data_file = Path(scratch) / "data.json"
        data_file.write_text(json.dumps(data.document()), encoding="utf-8")
        command = [
            str(binary),
            "eval",
            "--format",
            "json",
            "--stdin-input",
            "--data",
            str(POLICY_DIR),
            "--data",
            str(data_file),
            "--ignore",
            "*_test.rego",
            QUERY,
        ]
        try:
            done = subprocess.run(
                command,
                input=json.dumps(document),
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
        except OSError as error:
            raise GuardrailError(f"cannot run {binary}: {error}") from error
        except subprocess.TimeoutExpired as error:
            raise GuardrailError(f"opa eval did not answer within {_TIMEOUT_S}s") from error
    if done.returncode != 0:
        raise GuardrailError(
            f"opa eval failed with exit status {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return _messages(done.stdout)


def _opa(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise GuardrailError(f"opa not found at {given}")
        return given
    try:
        return tools.opa_binary()
    except tools.ToolMissing as missing:
        raise GuardrailError(f"cannot evaluate the guardrails: {missing}") from missing


def _messages(stdout: str) -> list[str]:
    try:
        value = json.loads(stdout)["result"][0]["expressions"][0]["value"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise GuardrailError(f"opa eval gave no value for {QUERY}: {stdout[:500]!r}") from error
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise GuardrailError(f"{QUERY} is not a set of strings: {value!r}")
    return sorted(value)
