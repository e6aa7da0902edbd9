"""`sovereign image build|boot` and `verify --image` refuse bad input with exit 2, a message
that names what is wrong, and nothing written or started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sovereign.cli import app

ROOT = Path(__file__).resolve().parents[3]
AIR_GAPPED = ROOT / "profiles/air-gapped.yaml"


def invoke(*argv: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(argv))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stderr


def test_an_unknown_role_to_leave_out_is_named(tmp_path: Path) -> None:
    code, said = invoke("image", "build", str(AIR_GAPPED), "--out", str(tmp_path / "o"),
                        "--without-role", "firewall")  # fmt: skip
    assert code == 2
    assert "unknown role firewall; roles: base_hardening, egress_lockdown" in said
    assert not (tmp_path / "o").exists()


def test_an_output_directory_with_other_files_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, said = invoke("image", "build", str(AIR_GAPPED), "--out", str(out))
    assert code == 2
    assert f"refusing to write into {out}: it holds notes.txt" in said
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_talos_profile_is_not_built_as_debian(tmp_path: Path) -> None:
    profile = tmp_path / "edge.yaml"
    profile.write_text("kind: edge\nname: t\nhost:\n  os: talos\n")
    code, said = invoke("image", "build", str(profile), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "host.os is talos: `sovereign image build` makes Debian images" in said


def test_a_node_the_profile_does_not_have_is_named(tmp_path: Path) -> None:
    code, said = invoke("image", "build", str(AIR_GAPPED), "--out", str(tmp_path / "o"),
                        "--node", "ward-gpu-09")  # fmt: skip
    assert code == 2
    assert "node 'ward-gpu-09' is not in the profile; its nodes: ward-gpu-01" in said


def test_a_bad_profile_names_its_file_and_line(tmp_path: Path) -> None:
    profile = tmp_path / "bad.yaml"
    profile.write_text("kind: air-gapped\nname: t\nhost:\n  os: debian\n  disk_pcrs: [99]\n")
    code, said = invoke("image", "build", str(profile), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"{profile}:5:" in said
    assert "host.disk_pcrs[0]" in said


@pytest.mark.parametrize("text", ["not a key\n", "ssh-ed25519 AAAA a\nssh-ed25519 AAAA b\n"])
def test_an_admin_key_file_must_hold_one_public_key(tmp_path: Path, text: str) -> None:
    key = tmp_path / "id.pub"
    key.write_text(text)
    code, said = invoke("image", "build", str(AIR_GAPPED), "--out", str(tmp_path / "o"),
                        "--admin-key", str(key))  # fmt: skip
    assert code == 2
    assert f"--admin-key {key}: not one OpenSSH public key line" in said


def test_booting_a_directory_that_is_no_build_says_so(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("key")
    code, said = invoke("image", "boot", str(tmp_path), "--identity", str(key))
    assert code == 2
    assert "is not a `sovereign image build` output" in said


def test_verifying_an_image_of_another_profile_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    (image / "manifest.json").write_text(json.dumps({"profile": "someone-else"}))
    (image / "disk.raw").write_bytes(b"")
    key = tmp_path / "id"
    key.write_text("key")
    code, said = invoke("verify", str(AIR_GAPPED), "--image", str(image), "--identity", str(key),
                        "--out", str(tmp_path / "r.json"))  # fmt: skip
    assert code == 2
    assert "was built from profile 'someone-else', not 'radiology-ward'" in said
    assert not (tmp_path / "r.json").exists()
