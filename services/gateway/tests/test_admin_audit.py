"""`sovereign-gateway admin audit verify`: exit 0 intact, 1 tampered (first bad seq named), 2 bad
input."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.audit import AuditLog

from services.gateway.tests.commands import run_admin


def _build_log(directory: Path, key: Ed25519PrivateKey, count: int = 30) -> None:
    async def body() -> None:
        log = AuditLog(
            directory,
            key,
            checkpoint_records=10,
            checkpoint_interval_seconds=3600,
            segment_max_bytes=1 << 20,
        )
        await log.open()
        for i in range(count):
            await log.append(
                {
                    "type": "event",
                    "action": "chat",
                    "resource": "/v1/chat/completions",
                    "request_digest": hashlib.sha256(str(i).encode()).hexdigest(),
                    "status": 200,
                }
            )
        await log.close()

    asyncio.run(body())


def _delete_seqs(directory: Path, *seqs: int) -> None:
    segment = directory / "audit-000001.jsonl"
    kept = [
        line
        for line in segment.read_bytes().splitlines(keepends=True)
        if json.loads(line)["seq"] not in seqs
    ]
    segment.write_bytes(b"".join(kept))


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_an_intact_log_exits_0_and_says_so(tmp_path: Path) -> None:
    _build_log(tmp_path, Ed25519PrivateKey.generate())
    result = run_admin("audit", "verify", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "intact: 33 record(s), seq 1..33, 3 checkpoint(s)" in result.stdout


def test_a_tampered_log_exits_1_naming_the_first_bad_seq_and_counting_the_rest(
    tmp_path: Path,
) -> None:
    _build_log(tmp_path, Ed25519PrivateKey.generate())
    _delete_seqs(tmp_path, 5, 20)
    result = run_admin("audit", "verify", str(tmp_path))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[1].startswith("seq 5: deleted: ")
    assert lines[2].startswith("and 1 other problem(s)")


def test_json_output_lists_every_problem(tmp_path: Path) -> None:
    _build_log(tmp_path, Ed25519PrivateKey.generate())
    _delete_seqs(tmp_path, 5, 20)
    result = run_admin("audit", "verify", str(tmp_path), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(p["seq"], p["kind"]) for p in report["problems"]] == [(5, "deleted"), (20, "deleted")]


def test_a_trusted_key_that_did_not_sign_exits_1_with_wrong_key(tmp_path: Path) -> None:
    _build_log(tmp_path / "log", Ed25519PrivateKey.generate())
    other = tmp_path / "other.pub"
    other.write_bytes(_pem(Ed25519PrivateKey.generate()))
    result = run_admin("audit", "verify", str(tmp_path / "log"), "--public-key", str(other))
    assert result.exit_code == 1
    assert "seq 11: wrong-key: " in result.stdout


def test_the_signers_public_key_verifies(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    _build_log(tmp_path / "log", key)
    trusted = tmp_path / "trusted.pub"
    trusted.write_bytes(_pem(key))
    result = run_admin("audit", "verify", str(tmp_path / "log"), "--public-key", str(trusted))
    assert result.exit_code == 0, result.output


def test_a_missing_path_exits_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    result = run_admin("audit", "verify", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: no such file or directory"
    assert "Traceback" not in result.output


def test_an_invalid_key_file_exits_2(tmp_path: Path) -> None:
    _build_log(tmp_path / "log", Ed25519PrivateKey.generate())
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    result = run_admin("audit", "verify", str(tmp_path / "log"), "--public-key", str(bad))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {bad} is not a PEM public key"


def test_an_unreadable_key_file_exits_2(tmp_path: Path) -> None:
    _build_log(tmp_path / "log", Ed25519PrivateKey.generate())
    missing = tmp_path / "absent.pub"
    result = run_admin("audit", "verify", str(tmp_path / "log"), "--public-key", str(missing))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: cannot read {missing}")


def test_a_directory_without_a_log_exits_2(tmp_path: Path) -> None:
    result = run_admin("audit", "verify", str(tmp_path))
    assert result.exit_code == 2
    assert "no audit segments" in result.stderr
