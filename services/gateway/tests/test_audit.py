"""The audit log: chain, durability, group commit, checkpoints, rotation, recovery, tampering."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.audit import (
    AuditCorrupted,
    AuditLog,
    AuditUnavailable,
    verify,
)
from sovereign_gateway.contract import load_or_create_private_key

T = TypeVar("T")
ZERO = "0" * 64
RFC3339_UTC_MICROS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def forge_line(body: dict[str, Any]) -> bytes:
    """A line with a correct self-hash, as someone who read the format could write."""
    text = canonical(body)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f'{text[:-1]},"hash":"{digest}"}}\n'.encode()


def event(i: int) -> dict[str, Any]:
    return {
        "type": "event",
        "actor": {"sub": f"user-{i % 7}", "client": "chat-ui", "roles": ["user"]},
        "action": "chat",
        "resource": "/v1/chat/completions",
        "decision": {"allow": True, "reasons": ["role user may chat"]},
        "request_digest": hashlib.sha256(f"req {i}".encode()).hexdigest(),
        "response_digest": hashlib.sha256(f"resp {i}".encode()).hexdigest(),
        "status": 200,
        "latency_ms": 12.5,
    }


def new_log(directory: Path, key: Ed25519PrivateKey | None = None, **settings: Any) -> AuditLog:
    options: dict[str, Any] = {
        "checkpoint_records": 1000,
        "checkpoint_interval_seconds": 3600.0,
        "segment_max_bytes": 64 * 1024 * 1024,
    }
    options.update(settings)
    return AuditLog(directory, key or Ed25519PrivateKey.generate(), **options)


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        # A lost future must fail the test, not hang it.
        return await asyncio.wait_for(body(), 60)

    return asyncio.run(main())


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def records(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in segment_paths(directory)
        for line in path.read_text().splitlines()
    ]


def build(
    directory: Path, count: int, key: Ed25519PrivateKey | None = None, **settings: Any
) -> None:
    async def body() -> None:
        log = new_log(directory, key, **settings)
        await log.open()
        for i in range(count):
            await log.append(event(i))
        await log.close()

    run(body)


# -- the chain ------------------------------------------------------------------------


def test_records_chain_by_sha256_over_their_canonical_json(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 5, key)
    lines = records(tmp_path)
    assert [r["seq"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["type"] for r in lines] == ["event"] * 5 + ["checkpoint"]
    prev = ZERO
    for record in lines:
        assert record["prev"] == prev
        body = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == hashlib.sha256(canonical(body).encode()).hexdigest()
        assert RFC3339_UTC_MICROS.fullmatch(record["time"])
        prev = record["hash"]
    # What the caller passed is stored as given, next to what the log adds.
    assert {k: v for k, v in lines[2].items() if k not in {"seq", "time", "prev", "hash"}} == (
        event(2)
    )


def test_append_refuses_fields_the_log_sets_itself(tmp_path: Path) -> None:
    async def body() -> None:
        log = new_log(tmp_path)
        await log.open()
        with pytest.raises(ValueError, match="seq"):
            await log.append({**event(0), "seq": 99})
        with pytest.raises(ValueError, match="checkpoint"):
            await log.append({**event(0), "type": "checkpoint"})
        assert (await log.append(event(1))).seq == 1
        await log.close()

    run(body)


def test_a_record_that_is_not_json_fails_only_its_own_append(tmp_path: Path) -> None:
    async def body() -> list[Any]:
        log = new_log(tmp_path)
        await log.open()
        results = await asyncio.gather(
            log.append(event(0)),
            log.append({**event(1), "latency_ms": float("nan")}),
            log.append(event(2)),
            return_exceptions=True,
        )
        await log.close()
        return list(results)

    first, bad, last = run(body)
    assert isinstance(bad, ValueError)
    assert (first.seq, last.seq) == (1, 2)
    assert verify(tmp_path).ok


def test_append_returns_only_after_its_line_is_fsynced(tmp_path: Path) -> None:
    async def body() -> None:
        log = new_log(tmp_path)
        await log.open()
        for i in range(5):
            entry = await log.append(event(i))
            on_disk = (tmp_path / "audit-000001.jsonl").read_text().splitlines()
            assert json.loads(on_disk[-1])["hash"] == entry.hash
            assert log.durable_seq >= entry.seq
            assert log.fsyncs == i + 1
        await log.close()

    run(body)


_TRACED_APPEND = """
import asyncio, os, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.audit import AuditLog

async def main():
    log = AuditLog(Path(sys.argv[1]), Ed25519PrivateKey.generate(), checkpoint_records=1000,
                   checkpoint_interval_seconds=3600, segment_max_bytes=1 << 26)
    await log.open()
    await log.append({"type": "event", "action": "traced-append"})
    os.write(1, b"APPEND-RETURNED\\n")
    await log.close()

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_segment_fsync_completes_between_the_write_and_the_return(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    result = subprocess.run(
        [
            *("strace", "-f", "-e", "trace=write,fsync", "-o", str(trace)),
            *(sys.executable, "-c", _TRACED_APPEND, str(tmp_path / "log")),
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0 and b"ptrace" in result.stderr:
        pytest.skip("ptrace is not permitted here")
    assert result.returncode == 0, result.stderr
    calls = trace.read_text().splitlines()
    written = next(i for i, c in enumerate(calls) if "traced-append" in c)
    returned = next(i for i, c in enumerate(calls) if "APPEND-RETURNED" in c)
    fsynced = [
        i
        for i, c in enumerate(calls)
        if ("fsync(" in c or "fsync resumed" in c) and c.rstrip().endswith("= 0")
    ]
    assert any(written < i < returned for i in fsynced), "\n".join(calls[written : returned + 1])


def test_concurrent_appends_get_contiguous_seqs_in_queue_order_with_one_fsync_per_batch(
    tmp_path: Path,
) -> None:
    count = 400

    async def body() -> tuple[list[Any], int, int]:
        log = new_log(tmp_path)
        await log.open()

        async def appender(i: int) -> Any:
            return await log.append(event(i))

        entries = await asyncio.gather(*(appender(i) for i in range(count)))
        fsyncs, batches = log.fsyncs, log.batches
        await log.close()
        return entries, fsyncs, batches

    entries, fsyncs, batches = run(body)
    assert [e.seq for e in entries] == list(range(1, count + 1))
    assert fsyncs == batches
    assert batches < count / 4
    stored = records(tmp_path)
    assert [r["hash"] for r in stored[:count]] == [e.hash for e in entries]
    assert [r["request_digest"] for r in stored[:count]] == [
        event(i)["request_digest"] for i in range(count)
    ]


# -- checkpoints ----------------------------------------------------------------------


def test_a_checkpoint_seals_every_n_events_and_close_seals_the_rest(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 35, key, checkpoint_records=10)
    lines = records(tmp_path)
    checkpoints = [r for r in lines if r["type"] == "checkpoint"]
    assert [c["seq"] for c in checkpoints] == [11, 22, 33, 39]
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for checkpoint in checkpoints:
        assert checkpoint["covers_seq"] == checkpoint["seq"] - 1
        assert checkpoint["covers_hash"] == checkpoint["prev"]
        assert checkpoint["key_id"] == hashlib.sha256(raw).hexdigest()
        signed = {k: checkpoint[k] for k in ("covers_seq", "covers_hash", "key_id")}
        public.verify(base64.b64decode(checkpoint["signature"]), canonical(signed).encode())
    head = json.loads((tmp_path / "HEAD.json").read_text())
    assert head["checkpoint"] == checkpoints[-1]
    assert head["segment"] == "audit-000001.jsonl"
    assert (tmp_path / "audit.pub").read_bytes() == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_the_timer_writes_a_checkpoint_only_when_something_is_new(tmp_path: Path) -> None:
    async def body() -> list[dict[str, Any]]:
        log = new_log(tmp_path, checkpoint_interval_seconds=0.05)
        await log.open()
        await log.append(event(0))
        await asyncio.sleep(0.4)  # several intervals, one with news, the rest idle
        live = records(tmp_path)
        await log.close()
        return live

    live = run(body)
    assert [r["type"] for r in live] == ["event", "checkpoint"]
    assert json.loads((tmp_path / "HEAD.json").read_text())["checkpoint"]["seq"] == 2
    # Close found nothing new since the timer's checkpoint.
    assert len(records(tmp_path)) == 2


def test_close_is_idempotent_and_later_appends_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        log = new_log(tmp_path)
        await log.open()
        await log.append(event(0))
        assert log.status()[0] is True
        await asyncio.gather(log.close(), log.close())
        await log.close()
        assert log.status() == (False, "audit log is closed")
        with pytest.raises(AuditUnavailable):
            await log.append(event(1))

    run(body)
    assert [r["type"] for r in records(tmp_path)] == ["event", "checkpoint"]


def test_rotation_continues_one_chain_across_segments(tmp_path: Path) -> None:
    build(tmp_path, 60, segment_max_bytes=4000)
    paths = segment_paths(tmp_path)
    assert len(paths) >= 3
    segments = [[json.loads(x) for x in p.read_text().splitlines()] for p in paths]
    for before, after in itertools.pairwise(segments):
        assert before[-1]["type"] == "checkpoint"
        assert after[0]["prev"] == before[-1]["hash"]
        assert after[0]["seq"] == before[-1]["seq"] + 1
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.records == sum(len(s) for s in segments)


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 3, key)
    build(tmp_path, 3, key)
    assert [r["seq"] for r in records(tmp_path)] == list(range(1, 9))
    assert verify(tmp_path).ok


def test_open_refuses_a_signing_key_that_is_not_the_logs(tmp_path: Path) -> None:
    build(tmp_path, 1)
    with pytest.raises(ValueError, match=r"audit\.pub"):
        build(tmp_path, 1)


def test_signing_key_is_created_once_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    key = load_or_create_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_or_create_private_key(path)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert again.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]


# -- crashes and failures -------------------------------------------------------------


@pytest.mark.parametrize(
    "torn", [b'{"seq":7,"time":"2026-', b"\x00" * 300 + b"\n"], ids=["cut-short", "zero-page"]
)
def test_a_torn_tail_is_moved_aside_and_recorded_on_open(tmp_path: Path, torn: bytes) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 5, key)
    segment = tmp_path / "audit-000001.jsonl"
    intact = segment.read_bytes()
    segment.write_bytes(intact + torn)

    before = verify(tmp_path)
    assert (before.problems[0].seq, before.problems[0].kind) == (7, "torn")
    assert f"byte offset {len(intact)}" in before.problems[0].detail

    async def reopen() -> list[str]:
        log = new_log(tmp_path, key)
        await log.open()
        notes = log.recovered
        await log.append(event(99))
        await log.close()
        return notes

    notes = run(reopen)
    assert len(notes) == 1
    assert "audit-000001.jsonl.torn-1" in notes[0]
    assert (tmp_path / "audit-000001.jsonl.torn-1").read_bytes() == torn
    assert segment.read_bytes().startswith(intact)
    recovery = records(tmp_path)[6]
    assert recovery["type"] == "recovery"
    assert recovery["seq"] == 7
    assert recovery["torn_length"] == len(torn)
    assert recovery["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert recovery["offset"] == len(intact)
    assert recovery["moved_to"] == "audit-000001.jsonl.torn-1"
    after = verify(tmp_path)
    assert after.ok, after.problems
    assert any("torn-1" in note for note in after.notes)


def test_damage_before_the_tail_refuses_to_open_and_repairs_nothing(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 10, key)
    segment = tmp_path / "audit-000001.jsonl"
    lines = segment.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"status":200', b'"status":500')
    damaged = b"".join(lines)
    segment.write_bytes(damaged)

    with pytest.raises(AuditCorrupted) as caught:
        run(lambda: new_log(tmp_path, key).open())
    assert caught.value.seq == 4
    assert segment.read_bytes() == damaged
    assert not list(tmp_path.glob("*.torn-*"))


def test_a_tail_cut_below_head_refuses_to_open(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build(tmp_path, 10, key)
    segment = tmp_path / "audit-000001.jsonl"
    lines = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(b"".join(lines[:-3]))
    # Appending here would replace HEAD.json and erase the evidence of the cut.
    with pytest.raises(AuditCorrupted, match=r"HEAD\.json seals seq 11") as caught:
        run(lambda: new_log(tmp_path, key).open())
    assert caught.value.seq == 9


def _swap_fd_to(path: Path, replacement: str) -> None:
    """Point this process's open descriptor of `path` at `replacement`, as a full disk would."""
    for entry in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target == str(path):
            fd = os.open(replacement, os.O_WRONLY)
            os.dup2(fd, int(entry.name))
            os.close(fd)
            return
    raise AssertionError(f"{path} is not open")


def test_a_failed_write_fails_the_append_and_turns_health_not_ready(tmp_path: Path) -> None:
    async def body() -> None:
        log = new_log(tmp_path)
        await log.open()
        await log.append(event(0))
        _swap_fd_to(tmp_path / "audit-000001.jsonl", "/dev/full")
        results = await asyncio.gather(
            *(log.append(event(i)) for i in range(1, 4)), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, AuditUnavailable)
            assert isinstance(result.__cause__, OSError)
            assert result.__cause__.errno == errno.ENOSPC
        ready, detail = log.status()
        assert ready is False
        assert "No space left on device" in detail
        with pytest.raises(AuditUnavailable):
            await log.append(event(9))
        await asyncio.wait_for(log.close(), 5)

    run(body)


def test_a_vanished_directory_turns_health_not_ready_and_stops_at_the_next_checkpoint(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "audit"

    async def body() -> None:
        log = new_log(directory, checkpoint_records=3)
        await log.open()
        await log.append(event(0))
        assert log.status()[0] is True
        shutil.rmtree(directory)
        ready, detail = log.status()
        assert ready is False
        assert "missing" in detail
        await log.append(event(1))
        # Durable in the still-open segment, so acknowledged; its checkpoint's HEAD.json
        # cannot be written, and without it a cut tail would pass unnoticed.
        assert (await log.append(event(2))).seq == 3
        for _ in range(500):  # HEAD.json is written after the append is acknowledged
            ready, detail = log.status()
            if "write failed" in detail:
                break
            await asyncio.sleep(0.01)
        assert ready is False
        assert "No such file or directory" in detail
        with pytest.raises(AuditUnavailable):
            await log.append(event(3))
        await asyncio.wait_for(log.close(), 5)

    run(body)


def test_open_creates_a_0700_directory_and_0600_segments(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "audit"
    build(directory, 1)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "audit-000001.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "HEAD.json").stat().st_mode) == 0o600


# -- verify on a tampered log ---------------------------------------------------------

TAMPER_KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred events, checkpoints every 50, in two segments, closed cleanly."""
    directory = tmp_path_factory.mktemp("audit")
    build(directory, 300, TAMPER_KEY, checkpoint_records=50, segment_max_bytes=100_000)
    assert len(segment_paths(directory)) == 2
    return directory


@pytest.fixture
def log_copy(real_log: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "log"
    shutil.copytree(real_log, copy)
    return copy


def _locate(directory: Path, seq: int) -> tuple[Path, list[bytes], int]:
    for path in segment_paths(directory):
        lines = path.read_bytes().splitlines(keepends=True)
        for index, line in enumerate(lines):
            if json.loads(line)["seq"] == seq:
                return path, lines, index
    raise AssertionError(f"no seq {seq}")


def _first_problem(directory: Path) -> tuple[int | None, str]:
    report = verify(directory)
    assert not report.ok
    return report.problems[0].seq, report.problems[0].kind


def test_the_untouched_log_verifies(real_log: Path) -> None:
    report = verify(real_log)
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq) == (1, len(records(real_log)))
    assert report.checkpoints == 7  # six every 50 events, one at rotation, one at close
    assert report.unsealed == 0


def test_each_segment_verifies_standalone(real_log: Path) -> None:
    second = verify(segment_paths(real_log)[1])
    assert second.ok, second.problems
    assert second.first_seq is not None
    assert second.first_seq > 1


def test_an_edited_record_is_named(log_copy: Path) -> None:
    path, lines, i = _locate(log_copy, 120)
    lines[i] = lines[i].replace(b'"status":200', b'"status":403')
    path.write_bytes(b"".join(lines))
    assert _first_problem(log_copy) == (120, "edited")


def test_a_deleted_record_is_named(log_copy: Path) -> None:
    path, lines, i = _locate(log_copy, 120)
    del lines[i]
    path.write_bytes(b"".join(lines))
    assert _first_problem(log_copy) == (120, "deleted")


def test_an_inserted_record_with_a_valid_self_hash_is_named(log_copy: Path) -> None:
    path, lines, i = _locate(log_copy, 120)
    genuine = json.loads(lines[i])
    forged = {**event(0), "seq": 121, "time": genuine["time"], "prev": genuine["hash"]}
    forged["actor"] = {"sub": "someone-else", "client": "chat-ui", "roles": ["admin"]}
    lines.insert(i + 1, forge_line(forged))
    path.write_bytes(b"".join(lines))
    assert _first_problem(log_copy) == (121, "inserted")
    assert len(verify(log_copy).problems) == 1


def test_swapped_records_are_named_as_reordered(log_copy: Path) -> None:
    path, lines, i = _locate(log_copy, 120)
    assert json.loads(lines[i + 1])["seq"] == 121
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    path.write_bytes(b"".join(lines))
    assert _first_problem(log_copy) == (120, "reordered")


def test_a_cut_tail_is_named_as_truncation_despite_losing_the_final_checkpoint(
    log_copy: Path,
) -> None:
    last = records(log_copy)[-1]["seq"]
    path = segment_paths(log_copy)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-10]))
    assert _first_problem(log_copy) == (last - 9, "truncation")


def test_a_missing_segment_is_named_as_truncation(log_copy: Path) -> None:
    segment_paths(log_copy)[0].unlink()
    assert _first_problem(log_copy) == (1, "truncation")


def test_a_torn_last_line_is_not_a_record_and_names_its_offset(log_copy: Path) -> None:
    last = records(log_copy)[-1]["seq"]
    path = segment_paths(log_copy)[-1]
    data = path.read_bytes()
    line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: line_start + 40])
    report = verify(log_copy)
    assert report.records == last - 1
    assert (report.problems[0].seq, report.problems[0].kind) == (last, "torn")
    assert f"byte offset {line_start}" in report.problems[0].detail


def _resign_last_checkpoint(directory: Path, sign: Callable[[bytes], bytes], kid: str) -> int:
    path = segment_paths(directory)[-1]
    lines = path.read_bytes().splitlines(keepends=True)
    checkpoint = json.loads(lines[-1])
    assert checkpoint["type"] == "checkpoint"
    del checkpoint["hash"]
    checkpoint["key_id"] = kid
    payload = {k: checkpoint[k] for k in ("covers_seq", "covers_hash", "key_id")}
    checkpoint["signature"] = base64.b64encode(sign(canonical(payload).encode())).decode()
    lines[-1] = forge_line(checkpoint)
    path.write_bytes(b"".join(lines))
    head = json.loads((directory / "HEAD.json").read_text())
    head["checkpoint"] = json.loads(lines[-1])
    (directory / "HEAD.json").write_text(canonical(head) + "\n")
    return int(checkpoint["seq"])


def test_a_checkpoint_resigned_with_another_key_is_named(log_copy: Path) -> None:
    other = Ed25519PrivateKey.generate()
    raw = other.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    seq = _resign_last_checkpoint(log_copy, other.sign, hashlib.sha256(raw).hexdigest())
    report = verify(log_copy)
    assert [(p.seq, p.kind) for p in report.problems] == [(seq, "wrong-key")]


def test_a_checkpoint_with_a_bad_signature_is_named(log_copy: Path) -> None:
    other = Ed25519PrivateKey.generate()
    real_kid = records(log_copy)[-1]["key_id"]
    seq = _resign_last_checkpoint(log_copy, other.sign, real_kid)
    assert _first_problem(log_copy) == (seq, "bad-signature")


def test_a_trusted_key_other_than_the_signers_fails_every_checkpoint(real_log: Path) -> None:
    report = verify(real_log, Ed25519PrivateKey.generate().public_key())
    first_checkpoint = next(r["seq"] for r in records(real_log) if r["type"] == "checkpoint")
    assert (report.problems[0].seq, report.problems[0].kind) == (first_checkpoint, "wrong-key")
    assert len(report.problems) == report.checkpoints


def test_records_after_the_last_checkpoint_are_reported_unsealed_not_bad(tmp_path: Path) -> None:
    async def body() -> None:
        log = new_log(tmp_path, checkpoint_records=3)
        await log.open()
        for i in range(5):
            await log.append(event(i))
        report = verify(tmp_path)
        assert report.ok, report.problems
        assert report.unsealed == 2
        assert any("not sealed" in note for note in report.notes)
        await log.close()

    run(body)


def test_many_appenders_across_rotations_and_checkpoints_leave_a_log_that_verifies(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        log = new_log(tmp_path, checkpoint_records=100, segment_max_bytes=50_000)
        await log.open()
        await asyncio.gather(*(log.append(event(i)) for i in range(2000)))
        await log.close()

    run(body)
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert len(segment_paths(tmp_path)) > 3
    assert sum(1 for r in records(tmp_path) if r["type"] == "event") == 2000
