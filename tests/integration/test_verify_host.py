"""`run_verify --host` end to end against a real sshd on 127.0.0.1: ssh, testinfra, the node
suites, the plugin and the signature, with this machine standing in for the node.

This machine is not a hardened node, so checks fail; what is checked is that each one ran
and was recorded, that the report verifies, and that no ssh process outlives the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sovereign.cli import app
from sovereign.verify import SUITES, VerifyContext, VerifyError, run_verify

ROOT = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT_S = 10

# sshd comes from `sovereign tools install` (openssh-server); it logs in as this user, root.
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """sshd on a free loopback port that accepts one fresh key for this user."""
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True
        )
    (keys / "authorized_keys").write_bytes((keys / "client.pub").read_bytes())
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "StrictModes no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = (tmp_path / "sshd.log").open("wb")
    process = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"sshd exited: {(tmp_path / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("sshd did not listen")
                time.sleep(0.05)
        yield f"ssh://root@127.0.0.1:{port}", keys / "client"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        log.close()


def _context(tmp_path: Path, host: str, identity: Path, suites: tuple[str, ...]) -> VerifyContext:
    rendered = tmp_path / "render"
    result = CliRunner().invoke(
        app,
        ["render", str(ROOT / "profiles" / "personal.yaml"), "--only", "ansible", "--out",
         str(rendered)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    exports = tmp_path / "exports"
    exports.mkdir()
    return VerifyContext(
        profile=ROOT / "profiles" / "personal.yaml",
        vars=rendered / "ansible" / "group_vars" / "all.yml",
        host=host,
        identity=identity,
        exports=exports,
        suites=suites,
    )


def test_a_host_run_records_every_check_and_signs_the_report(
    tmp_path: Path, sshd: tuple[str, Path]
) -> None:
    host, identity = sshd
    # Suites whose commands are quick on a big machine: the encryption and setuid searches
    # walk this machine's whole file system.
    context = _context(tmp_path, host, identity, ("egress", "sandbox"))
    out = tmp_path / "report.json"
    key = tmp_path / "keys" / "ed25519.pem"
    report = run_verify(context, out, key)

    assert report.node.hostname == socket.gethostname()
    assert report.node.machine_id == Path("/etc/machine-id").read_text().strip()
    assert report.node.ak_sha256 is None
    suites = {check.suite for check in report.checks}
    assert suites == set(SUITES)
    outcomes = {check.id: check.outcome for check in report.checks}
    for check in report.checks:
        if check.suite not in context.suites:
            assert check.outcome == "not_applicable"
            assert check.detail == "not selected for this run"
    # No canaries without a booted image: recorded, not dropped.
    assert outcomes["egress.blocked_canary_receives_nothing"] == "not_applicable"
    assert outcomes["egress.allowed_canary_is_reached"] == "not_applicable"
    # This machine has no sovereign nftables table: the check ran on it and failed.
    policies = next(c for c in report.checks if c.id == "egress.default_policies_drop")
    assert policies.outcome == "failed"
    assert policies.observed["policies"] == {"input": None, "forward": None, "output": None}
    listening = next(c for c in report.checks if c.id == "egress.only_expected_sockets_listen")
    assert any(
        f":{host.rsplit(':', 1)[1]} (sshd)" in line for line in listening.observed["listening"]
    )

    result = CliRunner().invoke(
        app, ["evidence", "verify", str(out), "--public-key", str(key.with_suffix(".pub"))]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["summary"] == report.summary
    # The shared ssh connection (its master process) was closed with the run.
    masters = subprocess.run(
        ["pgrep", "-f", f"ControlPath=.*sovereign-verify-.*{host.rsplit(':', 1)[1]}"],
        capture_output=True,
        check=False,
    )
    assert masters.returncode == 1, masters.stdout


def test_a_wrong_identity_is_an_infrastructure_error(
    tmp_path: Path, sshd: tuple[str, Path]
) -> None:
    host, _ = sshd
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    context = _context(tmp_path, host, stranger, ("egress",))
    with pytest.raises(VerifyError, match="cannot reach the node over ssh"):
        run_verify(context, tmp_path / "report.json", tmp_path / "key.pem")
    assert not (tmp_path / "report.json").exists()
