"""`sovereign stack config` writes a profile into its Pulumi stack file and keeps the
rest: the secrets and salt `pulumi config set --secret` wrote must survive an update."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from sovereign.cli import app
from sovereign.profile.loader import load_profile
from sovereign.render.pulumi import stack_config

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "profiles" / "datacenter.yaml"
SECRET = "v1:abcdEFGH:ciphertextOfThePassphrase=="
SALT = "v1:c2FsdA==:v1:AAAA:BBBB"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    return tmp_path


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["stack", "config", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output + result.stderr


def _load(path: Path) -> dict[str, object]:
    data: dict[str, object] = YAML(typ="safe", pure=True).load(path.read_text())
    return data


def test_a_new_stack_file_is_the_render(project: Path) -> None:
    code, output = _run(str(PROFILE), "--project-dir", str(project))
    assert code == 0, output
    written = (project / "Pulumi.datacenter.yaml").read_text()
    assert written == stack_config(load_profile(PROFILE))


def test_an_update_replaces_the_profile_and_keeps_secrets_salt_and_provider_keys(
    project: Path, tmp_path: Path
) -> None:
    target = project / "Pulumi.datacenter.yaml"
    old = stack_config(load_profile(PROFILE)).replace("storage: 200Gi", "storage: 100Gi")
    target.write_text(
        f"encryptionsalt: {SALT}\n"
        + old
        + f"  sovereign:memoryPassphrase:\n    secure: {SECRET}\n"
        + "  kubernetes:context: dc1-admin\n"
    )
    code, output = _run(str(PROFILE), "--project-dir", str(project))
    assert code == 0, output
    data = _load(target)
    assert data["encryptionsalt"] == SALT
    config = data["config"]
    assert isinstance(config, dict)
    assert config["sovereign:memoryPassphrase"] == {"secure": SECRET}
    assert config["kubernetes:context"] == "dc1-admin"
    assert config["sovereign:profile"]["cluster"]["qdrant"]["storage"] == "200Gi"
    fresh = _load_text(stack_config(load_profile(PROFILE)))
    assert config["sovereign:profile"] == fresh["config"]["sovereign:profile"]


def _load_text(text: str) -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = YAML(typ="safe", pure=True).load(text)
    return data


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        (REPO / "profiles" / "edge.yaml", "has no cluster section"),
        (None, "error:"),
    ],
)
def test_a_profile_that_cannot_deploy_changes_nothing(
    project: Path, tmp_path: Path, profile: Path | None, expected: str
) -> None:
    target = project / "Pulumi.datacenter.yaml"
    target.write_text(f"encryptionsalt: {SALT}\nconfig: {{}}\n")
    before = target.read_bytes()
    if profile is None:
        profile = tmp_path / "bad.yaml"
        profile.write_text(
            PROFILE.read_text().replace("storage_class: local-nvme", "storage_class: 7")
        )
    code, output = _run(str(profile), "--project-dir", str(project))
    assert code == 2
    assert expected in output
    assert "Traceback" not in output
    assert target.read_bytes() == before


def test_a_bad_profile_names_its_line(project: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = PROFILE.read_text().replace("storage_class: local-nvme", "storage_class: Local_NVMe")
    bad.write_text(text)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "Local_NVMe" in row)
    code, output = _run(str(bad), "--project-dir", str(project))
    assert code == 2
    assert f"{bad}:{line}:" in output
    assert "cluster.storage_class" in output
    assert not (project / "Pulumi.datacenter.yaml").exists()


def test_a_stack_file_that_is_not_yaml_is_refused_untouched(project: Path) -> None:
    target = project / "Pulumi.datacenter.yaml"
    target.write_text("config: [unclosed\n")
    code, output = _run(str(PROFILE), "--project-dir", str(project))
    assert code == 2
    assert "cannot read it as a Pulumi stack file" in output
    assert target.read_text() == "config: [unclosed\n"
    assert [p.name for p in project.iterdir() if p.name.startswith(".")] == []


def test_a_directory_without_pulumi_yaml_is_refused(tmp_path: Path) -> None:
    code, output = _run(str(PROFILE), "--project-dir", str(tmp_path))
    assert code == 2
    assert "no Pulumi.yaml" in output
    assert list(tmp_path.iterdir()) == []
