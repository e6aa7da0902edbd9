"""The verify plugin and `sovereign verify`'s input handling, without a node.

The plugin is run the way `sovereign verify` runs the node suites (pytest.main in-process),
on a throwaway directory of plain checks that pass, fail, crash, skip and break a fixture.
"""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from sovereign.cli import app
from sovereign.evidence import NodeIdentity, Report
from sovereign.profile.loader import load_profile
from sovereign.verify import (
    CONTEXT_ENV,
    NODE_TESTS,
    SUITES,
    Canary,
    Collector,
    VerifyContext,
    VerifyError,
    applicability,
    load_variables,
    run_suites,
    selected_suites,
    ssh_target,
)

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = """
import pytest
from sovereign.verify import observer


@pytest.fixture
def observe(request):
    return observer(request.node)


@pytest.fixture
def broken():
    raise RuntimeError("the node did not answer")


@pytest.fixture
def leaky():
    yield
    raise OSError("cleanup failed")
"""

CHECKS = '''
import pytest


def test_quote_verifies(observe):
    """The quote verifies

    Longer text that is not part of the title."""
    observe(pcrs=[0, 2, 4, 7])
    observe(nonce="ab" * 20)


def test_pcr_differs(observe):
    observe(quoted="00" * 32)
    assert 1 == 2, "PCR 7 differs: expected aa, quoted 00"


def test_tool_crashes():
    raise ValueError("tpm2_checkquote missing")


def test_node_unreachable(broken):
    pass


def test_no_tpm_here():
    pytest.skip("the profile's nodes have no TPM (tpm: none)")


def test_passes_but_leaks(leaky, observe):
    observe(ok=True)


@pytest.mark.parametrize("pcr", [0, 7])
def test_each_pcr(pcr):
    assert pcr == 0
'''


def _suite_dir(tmp_path: Path, modules: dict[str, str]) -> Path:
    directory = tmp_path / "suites"
    directory.mkdir()
    (directory / "pytest.ini").write_text("[pytest]\naddopts = --import-mode=importlib\n")
    (directory / "conftest.py").write_text(CONFTEST)
    for name, text in modules.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def test_each_test_becomes_a_check_with_its_outcome_and_observations(tmp_path: Path) -> None:
    collector = Collector()
    code = run_suites(_suite_dir(tmp_path, {"test_attestation.py": CHECKS}), collector)
    assert code == 1
    assert collector.errors == []
    checks = {check.id: check for check in collector.checks()}
    assert list(checks) == [
        "attestation.quote_verifies",
        "attestation.pcr_differs",
        "attestation.tool_crashes",
        "attestation.node_unreachable",
        "attestation.no_tpm_here",
        "attestation.passes_but_leaks",
        "attestation.each_pcr[0]",
        "attestation.each_pcr[7]",
    ]
    outcomes = {check_id: check.outcome for check_id, check in checks.items()}
    assert outcomes == {
        "attestation.quote_verifies": "passed",
        "attestation.pcr_differs": "failed",
        "attestation.tool_crashes": "error",
        "attestation.node_unreachable": "error",
        "attestation.no_tpm_here": "not_applicable",
        "attestation.passes_but_leaks": "error",
        "attestation.each_pcr[0]": "passed",
        "attestation.each_pcr[7]": "failed",
    }
    passed = checks["attestation.quote_verifies"]
    assert passed.suite == "attestation"
    assert passed.title == "The quote verifies"
    assert passed.observed == {"pcrs": [0, 2, 4, 7], "nonce": "ab" * 20}
    assert passed.detail is None
    assert passed.time > 0
    failed = checks["attestation.pcr_differs"]
    assert failed.observed == {"quoted": "00" * 32}
    assert failed.detail is not None
    assert failed.detail.startswith("PCR 7 differs: expected aa, quoted 00")
    assert checks["attestation.tool_crashes"].detail == "ValueError: tpm2_checkquote missing"
    assert checks["attestation.node_unreachable"].detail == (
        "RuntimeError: the node did not answer"
    )
    assert checks["attestation.no_tpm_here"].detail == (
        "the profile's nodes have no TPM (tpm: none)"
    )
    leaked = checks["attestation.passes_but_leaks"]
    assert leaked.detail == "teardown: OSError: cleanup failed"
    assert leaked.observed == {"ok": True}
    assert checks["attestation.each_pcr[7]"].title == "each pcr[7]"

    report = Report(
        profile="test",
        node=NodeIdentity("node", "0" * 32, None),
        image=None,
        started="2026-01-01T00:00:00Z",
        finished="2026-01-01T00:00:01Z",
        checks=tuple(checks.values()),
    )
    assert report.summary == {
        "total": 8,
        "passed": 2,
        "failed": 2,
        "error": 3,
        "not_applicable": 1,
    }
    assert not report.passed


def test_a_run_with_only_passes_and_not_applicable_checks_passes(tmp_path: Path) -> None:
    checks = """
    import pytest

    def test_fine():
        pass

    def test_elsewhere():
        pytest.skip("not on this profile")
    """
    collector = Collector()
    assert run_suites(_suite_dir(tmp_path, {"test_egress.py": checks}), collector) == 0
    report = Report("p", NodeIdentity("n", "m", None), None, "a", "b", tuple(collector.checks()))
    assert report.passed
    assert [check.outcome for check in report.checks] == ["passed", "not_applicable"]


def test_a_suite_that_does_not_import_is_reported_not_judged(tmp_path: Path) -> None:
    collector = Collector()
    code = run_suites(
        _suite_dir(tmp_path, {"test_broken.py": "import nowhere_to_be_found\n"}), collector
    )
    assert code == 2
    assert len(collector.errors) == 1
    assert "nowhere_to_be_found" in collector.errors[0]


def test_an_observation_that_is_not_json_fails_in_its_own_test(tmp_path: Path) -> None:
    checks = """
    def test_bad_fact(observe):
        observe(when=object())
    """
    collector = Collector()
    run_suites(_suite_dir(tmp_path, {"test_baseline.py": checks}), collector)
    (check,) = collector.checks()
    assert check.outcome == "error"
    assert check.detail is not None
    assert "not JSON serializable" in check.detail


def test_the_context_round_trips_through_json(tmp_path: Path) -> None:
    context = VerifyContext(
        profile=tmp_path / "p.yaml",
        vars=tmp_path / "all.yml",
        host="ssh://sovereign@127.0.0.1:2222",
        identity=tmp_path / "id",
        ssh_config=None,
        exports=tmp_path / "exports",
        image={"digest": "sha256:00", "recipe_hash": "11"},
        canaries={
            "allowed": Canary("10.0.2.100:80", tmp_path / "allowed.log"),
            "blocked": Canary("10.0.2.101:80", tmp_path / "blocked.log"),
        },
        suites=("egress", "baseline"),
    )
    path = tmp_path / "context.json"
    path.write_text(json.dumps(context.to_json()))
    assert VerifyContext.load(path) == context
    with pytest.raises(VerifyError, match="unknown suites"):
        VerifyContext.from_json({**context.to_json(), "suites": ["egress", "vibes"]})
    with pytest.raises(VerifyError, match="'identity'"):
        VerifyContext.from_json({"profile": "p", "vars": "v", "host": "h"})


def test_ssh_targets_need_user_host_and_port() -> None:
    target = ssh_target("ssh://sovereign@127.0.0.1:2222")
    assert (target.user, target.host, target.port) == ("sovereign", "127.0.0.1", 2222)
    assert ssh_target("ssh://admin@node").port == 22
    for bad in ("sovereign@127.0.0.1", "ssh://127.0.0.1:22", "http://a@b:1", "ssh://a@b:x"):
        with pytest.raises(VerifyError, match="ssh://USER@HOST"):
            ssh_target(bad)


def test_suites_that_need_a_tpm_do_not_apply_to_a_profile_without_one() -> None:
    profile = load_profile(ROOT / "profiles" / "personal.yaml")
    assert applicability(profile) == dict.fromkeys(SUITES)
    assert selected_suites(profile) == SUITES
    no_tpm = profile.model_copy(
        update={"nodes": [profile.nodes[0].model_copy(update={"tpm": "none"})]}
    )
    reasons = applicability(no_tpm)
    assert (
        reasons["attestation"]
        == reasons["encryption"]
        == ("the profile's nodes have no TPM (tpm: none)")
    )
    assert reasons["egress"] is reasons["sandbox"] is reasons["baseline"] is None
    assert selected_suites(no_tpm) == ("egress", "sandbox", "baseline")
    runc = profile.model_copy(
        update={"sandbox": profile.sandbox.model_copy(update={"runtime": "runc"})}
    )
    assert applicability(runc)["sandbox"] == "the profile's sandbox runtime is runc, not gVisor"


DISABLED_ROLES = """
tpm_attestation_enabled: false
egress_lockdown_enabled: false
disk_encryption_enabled: false
sandbox_runtime_enabled: false
base_hardening_enabled: false
"""


def test_the_node_suites_skip_only_what_the_profile_does_not_ask_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node suites' own conftest: with every role switched off in the rendered
    variables, only what the profile does not ask for (no TPM here) and what the context
    lacks (canaries) is not applicable; the rest runs, and fails or errors on a node that
    lacks it (here: none answers)."""
    rendered = tmp_path / "all.yml"
    rendered.write_text(DISABLED_ROLES)
    no_tpm = tmp_path / "no-tpm.yaml"
    no_tpm.write_text(
        (ROOT / "profiles" / "personal.yaml").read_text().replace("tpm: optional", "tpm: none")
    )
    assert selected_suites(load_profile(no_tpm)) == ("egress", "sandbox", "baseline")
    identity = tmp_path / "id"
    identity.write_text("")
    context = VerifyContext(
        profile=no_tpm,
        vars=rendered,
        host=f"ssh://sovereign@127.0.0.1:{_closed_port()}",
        identity=identity,
    )
    context_file = tmp_path / "context.json"
    context_file.write_text(json.dumps(context.to_json()))
    monkeypatch.setenv(CONTEXT_ENV, str(context_file))
    collector = Collector()
    assert run_suites(NODE_TESTS, collector) == 1
    checks = collector.checks()
    skipped = {check.id for check in checks if check.outcome == "not_applicable"}
    assert skipped == {
        check.id for check in checks if check.suite in ("attestation", "encryption")
    } | {"egress.blocked_canary_receives_nothing", "egress.allowed_canary_is_reached"}
    assert {check.suite for check in checks if check.outcome in ("failed", "error")} == {
        "egress",
        "sandbox",
        "baseline",
    }


def test_rendered_variables_override_role_defaults(tmp_path: Path) -> None:
    role = tmp_path / "roles" / "egress_lockdown" / "defaults"
    role.mkdir(parents=True)
    (role / "main.yml").write_text("egress_lockdown_dhcp: true\negress_lockdown_ssh_port: 22\n")
    rendered = tmp_path / "all.yml"
    rendered.write_text("egress_lockdown_dhcp: false\n")
    variables = load_variables(rendered, tmp_path / "roles")
    assert variables["egress_lockdown_dhcp"] is False
    assert variables["egress_lockdown_ssh_port"] == 22
    with pytest.raises(LookupError, match="base_hardening_suid_allowed is in neither"):
        variables["base_hardening_suid_allowed"]


# `sovereign verify`: everything that must stop before a check runs exits 2.


def _verify(*args: object) -> Result:
    return CliRunner().invoke(app, ["verify", *[str(arg) for arg in args]])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


IDENTITY_NEEDED = "--identity KEY is needed: the ssh key of the node's admin user"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "exactly one of --host"),
        (("--host", "ssh://a@127.0.0.1:22", "--image", "img"), "exactly one of --host"),
        (("--host", "ssh://a@127.0.0.1:22"), IDENTITY_NEEDED),
        (("--image", "img"), IDENTITY_NEEDED),
    ],
)
def test_verify_refuses_bad_input_with_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    profile = ROOT / "profiles" / "personal.yaml"
    result = _verify(profile, *args, "--signing-key", tmp_path / "key.pem")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_verify_exits_2_when_the_node_does_not_answer(tmp_path: Path) -> None:
    identity = tmp_path / "id_ed25519"
    identity.write_text("")
    exports = tmp_path / "exports"
    exports.mkdir()
    host = f"ssh://sovereign@127.0.0.1:{_closed_port()}"
    result = _verify(
        ROOT / "profiles" / "personal.yaml",
        "--host", host,
        "--identity", identity,
        "--exports", exports,
        "--out", tmp_path / "report.json",
        "--signing-key", tmp_path / "key.pem",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"cannot reach the node over ssh at {host}" in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_verify_needs_the_exports_when_the_profile_has_a_tpm(tmp_path: Path) -> None:
    identity = tmp_path / "id_ed25519"
    identity.write_text("")
    result = _verify(
        ROOT / "profiles" / "personal.yaml",
        "--host", "ssh://sovereign@127.0.0.1:22",
        "--identity", identity,
        "--signing-key", tmp_path / "key.pem",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "pass --exports DIR" in result.stderr


def test_verify_checks_only_debian_nodes(tmp_path: Path) -> None:
    identity = tmp_path / "id"
    identity.write_text("")
    result = _verify(
        ROOT / "profiles" / "edge.yaml",
        "--host", "ssh://sovereign@127.0.0.1:22",
        "--identity", identity,
        "--signing-key", tmp_path / "key.pem",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "sovereign verify checks Debian nodes" in result.stderr


@pytest.mark.parametrize("name", ["ed25519.pub", "keys.pub"])
def test_verify_refuses_a_public_key_as_the_signing_key(tmp_path: Path, name: str) -> None:
    identity = tmp_path / "id"
    identity.write_text("")
    result = _verify(
        ROOT / "profiles" / "personal.yaml",
        "--host", f"ssh://sovereign@127.0.0.1:{_closed_port()}",
        "--identity", identity,
        "--exports", tmp_path,
        "--signing-key", tmp_path / name,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "is for the public key" in result.stderr
    assert "cannot reach the node" not in result.stderr
    assert not (tmp_path / name).exists()
    assert "Traceback" not in result.output
