"""CLI surface: show, schema and render --list, with their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from ruamel.yaml import YAML
from typer.testing import CliRunner

from sovereign.cli import app
from sovereign.profile.loader import load_profile
from sovereign.profile.schema import input_schema

ROOT = Path(__file__).resolve().parents[2]


def test_show_prints_the_resolved_profile_as_yaml() -> None:
    result = CliRunner().invoke(app, ["profile", "show", str(ROOT / "profiles" / "edge.yaml")])
    assert result.exit_code == 0, result.output
    shown = YAML(typ="safe", pure=True).load(result.stdout)
    # edge.yaml leaves identity out; show fills it from the edge defaults.
    assert shown["identity"]["issuer"] == "http://127.0.0.1:8080/realms/sovereign"
    assert shown["nodes"][0]["arch"] == "arm64"


def test_show_json_matches_the_model() -> None:
    path = ROOT / "profiles" / "air-gapped.yaml"
    result = CliRunner().invoke(app, ["profile", "show", str(path), "--format", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == load_profile(path).model_dump(mode="json")


def test_show_without_a_file_is_the_embedded_personal_default() -> None:
    result = CliRunner().invoke(app, ["profile", "show", "--format", "json"])
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert (shown["kind"], shown["name"]) == ("personal", "personal")


def test_schema_command_prints_the_input_schema(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == input_schema()
    out = tmp_path / "schema.json"
    assert CliRunner().invoke(app, ["profile", "schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == input_schema()


def test_render_lists_renderers() -> None:
    result = CliRunner().invoke(app, ["render", "--list"])
    assert result.exit_code == 0
    assert "profile" in result.stdout
    assert "gateway" in result.stdout


def test_render_without_out_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["render", str(ROOT / "profiles" / "personal.yaml")])
    assert result.exit_code == 2
    assert "render needs a profile FILE and --out DIR" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["profile", "lint"])
    assert result.exit_code == 2
