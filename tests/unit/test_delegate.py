"""The toolkit's audit, memory, keys and lock commands run `sovereign-gateway admin`: the same
output and exit codes, with `--render DIR` turned into the gateway config it holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.audit import AuditLog

from services.gateway.tests.commands import run_admin
from tests.cli import sovereign


def _log(directory: Path) -> None:
    async def write() -> None:
        log = AuditLog(
            directory,
            Ed25519PrivateKey.generate(),
            checkpoint_records=2,
            checkpoint_interval_seconds=3600,
            segment_max_bytes=1 << 20,
        )
        await log.open()
        for index in range(3):
            await log.append({"type": "event", "action": "chat", "resource": f"/{index}"})
        await log.close()

    asyncio.run(write())


def test_audit_verify_prints_and_exits_as_the_gateways_own(tmp_path: Path) -> None:
    _log(tmp_path / "log")
    toolkit = sovereign("audit", "verify", tmp_path / "log")
    gateway = run_admin("audit", "verify", tmp_path / "log")
    assert toolkit.exit_code == gateway.exit_code == 0
    assert toolkit.stdout == gateway.stdout
    assert "intact: " in toolkit.stdout


def test_bad_input_is_exit_2_with_one_error_line_and_no_traceback(tmp_path: Path) -> None:
    missing = sovereign("audit", "verify", tmp_path / "absent")
    assert missing.exit_code == 2
    assert missing.stderr == f"error: {tmp_path / 'absent'}: no such file or directory\n"
    no_render = sovereign("memory", "check", "--render", tmp_path / "nope")
    assert no_render.exit_code == 2
    assert no_render.stderr.startswith(
        f"error: cannot read {tmp_path / 'nope' / 'gateway' / 'config.json'}"
    )
    assert "Traceback" not in missing.output + no_render.output
