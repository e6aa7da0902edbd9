"""The example profiles and each kind's defaults are valid, and the schema agrees."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from ruamel.yaml import YAML

from sovereign.profile.defaults import EMBEDDED_DEFAULT, KINDS
from sovereign.profile.loader import load_profile, parse_profile
from sovereign.profile.schema import input_schema
from sovereign.render.resolved import to_yaml

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "profiles").glob("*.yaml"))


def _yaml(path: Path) -> object:
    return YAML(typ="safe", pure=True).load(path.read_text())


def test_every_kind_has_an_example() -> None:
    kinds = {load_profile(path).kind for path in EXAMPLES}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name
    assert profile.network.egress.default == "deny"


@pytest.mark.parametrize("kind", KINDS)
def test_kind_defaults_alone_make_a_valid_profile(kind: str) -> None:
    profile = parse_profile(f"kind: {kind}\nname: minimal\n", "minimal.yaml")
    assert profile.kind == kind
    assert profile.models, "every kind ships a default model"


def test_embedded_default_is_a_personal_node_with_local_model_memory_and_identity() -> None:
    profile = parse_profile(EMBEDDED_DEFAULT, "embedded")
    assert profile.kind == "personal"
    assert [model.engine for model in profile.models] == ["llamacpp"]
    assert profile.memory.vector_store == "embedded"
    assert profile.identity.issuer.host == "127.0.0.1"


def test_kinds_differ_where_the_design_table_says() -> None:
    resolved = {kind: parse_profile(f"kind: {kind}\nname: x\n", "x") for kind in KINDS}
    assert resolved["edge"].nodes[0].arch == "arm64"
    assert resolved["air-gapped"].nodes[0].tpm == "required"
    assert resolved["air-gapped"].memory.key_source == "tpm"
    assert resolved["datacenter"].memory.vector_store == "qdrant"
    assert any(node.gpu == "nvidia" for node in resolved["datacenter"].nodes)
    assert resolved["personal"].memory.key_source == "file"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_resolved_profile_round_trips(path: Path, tmp_path: Path) -> None:
    profile = load_profile(path)
    shown = tmp_path / "resolved.yaml"
    shown.write_text(to_yaml(profile))
    assert load_profile(shown) == profile


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_json_schema_accepts_example(path: Path) -> None:
    jsonschema.validate(_yaml(path), input_schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "document",
    [
        {"name": "x"},
        {"kind": "laptop", "name": "x"},
        {"kind": "personal", "name": "x", "nodez": []},
        {"kind": "personal", "name": "x", "network": {"mesh": {"listen_port": "51820"}}},
        {"kind": "personal", "name": "x", "network": {"egress": {"default": "allow"}}},
    ],
)
def test_json_schema_refuses_what_the_model_refuses(document: dict[str, object]) -> None:
    validator = jsonschema.Draft202012Validator(input_schema())
    assert list(validator.iter_errors(document))


def test_committed_schema_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "profile.schema.json").read_text())
    assert committed == input_schema(), "run: sovereign profile schema -o docs/profile.schema.json"
