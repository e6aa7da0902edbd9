"""The gateway's tamper-evident audit log: hash-chained JSON Lines segments, signed checkpoints.

Takes records to append (`AuditLog`) or a log to check (`verify`); gives durable `AuditEntry`s,
a health status, and a `VerifyReport` that names the first bad seq.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sovereign_gateway import contract
from sovereign_gateway.contract import fsync_dir, write_atomic, write_new

ZERO_HASH = "0" * 64
HEAD_FILE = "HEAD.json"
PUBLIC_KEY_FILE = "audit.pub"
RECORD_TYPES = frozenset({"event", "checkpoint", "recovery"})

_SEGMENT = re.compile(r"audit-(\d{6,})\.jsonl")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Fields the log owns; a caller that sets them would be forging the chain.
_RESERVED = frozenset({"seq", "time", "prev", "hash"})


class AuditCorrupted(Exception):
    """The log is damaged beyond a torn tail; nothing was repaired."""

    def __init__(self, seq: int | None, detail: str) -> None:
        where = "audit log corrupted" if seq is None else f"audit log corrupted at seq {seq}"
        super().__init__(f"{where}: {detail}")
        self.seq = seq
        self.detail = detail


class AuditUnavailable(RuntimeError):
    """The log takes no records: not open, closed, or a write or fsync failed."""


class AuditInputError(ValueError):
    """What `verify` was given is not an audit log or key it can read."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    hash: str


@dataclass(frozen=True)
class Problem:
    seq: int | None
    kind: str
    detail: str


@dataclass
class VerifyReport:
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    checkpoints: int
    problems: list[Problem]
    unsealed: int = 0
    notes: list[str] = field(default_factory=list)


# -- the record format ----------------------------------------------------------------


def canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _seal_line(body: dict[str, Any]) -> tuple[bytes, str]:
    """The stored line for `body` (which has no `hash`) and its hash.

    The line is the canonical JSON with `hash` spliced in as the last member: one
    serialisation per record, and verify can still rebuild the exact bytes.
    """
    text = canonical(body)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f'{text[:-1]},"hash":"{digest}"}}\n'.encode(), digest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return False
    return True


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _examine(raw: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(record, problem kind, detail) for one line without its newline.

    The record is None when the line has no usable seq; the kind is None when the line is a
    well-formed record whose hash and bytes check out.
    """
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return None, "malformed", "not valid JSON"
    if not isinstance(obj, dict):
        return None, "malformed", "not a JSON object"
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        return None, "malformed", "no valid seq"
    if not (_is_hex64(obj.get("prev")) and _is_hex64(obj.get("hash"))):
        return obj, "malformed", "prev or hash is not 64 hex digits"
    if obj.get("type") not in RECORD_TYPES:
        return obj, "malformed", f"unknown record type {obj.get('type')!r}"
    body = {key: value for key, value in obj.items() if key != "hash"}
    try:
        line, digest = _seal_line(body)
    except ValueError as exc:
        return obj, "malformed", str(exc)
    if digest != obj["hash"]:
        return obj, "edited", f"hash mismatch: stored {obj['hash'][:16]}, computed {digest[:16]}"
    if line[:-1] != raw:
        # Same hash but other bytes: duplicate keys or reformatting, which a reader may
        # interpret differently from the hashed form.
        return obj, "edited", "bytes differ from the record's canonical form"
    if obj["type"] == "checkpoint" and not (
        type(obj.get("covers_seq")) is int
        and _is_hex64(obj.get("covers_hash"))
        and _is_hex64(obj.get("key_id"))
        and isinstance(obj.get("signature"), str)
    ):
        return obj, "malformed", "checkpoint lacks covers_seq, covers_hash, key_id or signature"
    return obj, None, ""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _signed_payload(checkpoint: Mapping[str, Any]) -> bytes:
    payload = {name: checkpoint[name] for name in ("covers_seq", "covers_hash", "key_id")}
    if "profile" in checkpoint:
        payload["profile"] = checkpoint["profile"]
    return canonical(payload).encode()


def _signature_problem(
    checkpoint: Mapping[str, Any], public_key: Ed25519PublicKey | None
) -> tuple[str, str] | None:
    if public_key is None:
        return None
    expected = key_id(public_key)
    if checkpoint["key_id"] != expected:
        return "wrong-key", (
            f"checkpoint signed by key {checkpoint['key_id'][:16]}, expected {expected[:16]}"
        )
    try:
        signature = base64.b64decode(checkpoint["signature"], validate=True)
        public_key.verify(signature, _signed_payload(checkpoint))
    except (ValueError, InvalidSignature):
        return "bad-signature", "checkpoint signature does not verify"
    return None


def segment_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def _segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = _SEGMENT.fullmatch(path.name)
        if match is not None and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


# -- files ----------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file `path`; AuditInputError when it is not one."""
    try:
        return contract.load_public_key(path)
    except contract.KeyFileError as exc:
        raise AuditInputError(str(exc)) from None


def _head_bytes(segment: str, checkpoint: Mapping[str, Any]) -> bytes:
    return (canonical({"segment": segment, "checkpoint": checkpoint}) + "\n").encode()


def _read_head(directory: Path) -> tuple[str, dict[str, Any]] | None:
    """HEAD.json's (segment, checkpoint record), None when absent; ValueError when damaged."""
    try:
        data = (directory / HEAD_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        head = json.loads(data, parse_constant=_reject_constant)
    except ValueError:
        raise ValueError("HEAD.json is not valid JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("segment"), str):
        raise ValueError("HEAD.json has no segment")
    checkpoint = head.get("checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError("HEAD.json has no checkpoint")
    line, digest = _seal_line({k: v for k, v in checkpoint.items() if k != "hash"})
    record, kind, detail = _examine(line[:-1])
    if kind is not None or record is None or record.get("type") != "checkpoint":
        raise ValueError(f"HEAD.json's checkpoint is not a valid checkpoint record ({detail})")
    if digest != checkpoint.get("hash"):
        raise ValueError("HEAD.json's checkpoint hash does not match its content")
    return head["segment"], checkpoint


# -- recovery on open -----------------------------------------------------------------


@dataclass
class _Scan:
    """What open() learns from one segment."""

    records: int = 0
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    good_bytes: int = 0
    torn: bytes = b""
    last_checkpoint: dict[str, Any] | None = None
    since_checkpoint: int = 0
    events_since_checkpoint: int = 0
    wanted_hash: str | None = None


def _scan_segment(
    name: str,
    data: bytes,
    *,
    first: tuple[int, str] | None,
    allow_torn: bool,
    want_seq: int | None,
) -> _Scan:
    """Check one segment strictly; only its final bytes may be torn (when allow_torn).

    `first` is the (seq, prev) the segment's first record must carry, None when unknown.
    """
    scan = _Scan()
    expected = first
    pos = 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        if newline == -1 or (newline == len(data) - 1 and not _parses(data[pos:newline])):
            # A crash mid-write leaves an unterminated line, or (when a page of the
            # final line did not reach the disk) one that is not even JSON.
            if not allow_torn:
                raise AuditCorrupted(
                    scan.last_seq + 1 if scan.records else None,
                    f"{name}: incomplete record at byte offset {pos}",
                )
            scan.torn = data[pos:]
            break
        record, kind, detail = _examine(data[pos:newline])
        if record is None:
            bad = scan.last_seq + 1 if scan.records else None
            raise AuditCorrupted(bad, f"{name} byte offset {pos}: {kind}: {detail}")
        seq: int = record["seq"]
        if kind is not None:
            raise AuditCorrupted(seq, f"{name} byte offset {pos}: {kind}: {detail}")
        if expected is not None and (seq, record["prev"]) != expected:
            raise AuditCorrupted(
                min(seq, expected[0]),
                f"{name} byte offset {pos}: seq {seq} with prev {record['prev'][:16]} "
                f"where seq {expected[0]} with prev {expected[1][:16]} belongs",
            )
        scan.records += 1
        scan.last_seq = seq
        scan.last_hash = record["hash"]
        scan.good_bytes = newline + 1
        if seq == want_seq:
            scan.wanted_hash = record["hash"]
        if record["type"] == "checkpoint":
            scan.last_checkpoint = record
            scan.since_checkpoint = scan.events_since_checkpoint = 0
        else:
            scan.since_checkpoint += 1
            if record["type"] == "event":
                scan.events_since_checkpoint += 1
        expected = (seq + 1, record["hash"])
        pos = newline + 1
    return scan


# -- the writer -----------------------------------------------------------------------


@dataclass
class _Item:
    kind: Literal["event", "checkpoint", "close"]
    body: dict[str, Any] | None = None
    future: asyncio.Future[AuditEntry] | None = None


class AuditLog:
    """An append-only, hash-chained, checkpoint-signed log in `directory`.

    One writer task commits everything queued at once with a single fsync (group commit);
    `append` returns only once its record is on disk.
    """

    def __init__(
        self,
        directory: Path,
        signing_key: Ed25519PrivateKey,
        *,
        checkpoint_records: int,
        checkpoint_interval_seconds: float,
        segment_max_bytes: int,
        profile: str | None = None,
    ) -> None:
        if checkpoint_records < 1 or checkpoint_interval_seconds <= 0 or segment_max_bytes < 1:
            raise ValueError("checkpoint_records, the interval and segment_max_bytes must be > 0")
        self._directory = directory
        self._key = signing_key
        self._key_id = key_id(signing_key.public_key())
        self._profile = profile
        self._checkpoint_records = checkpoint_records
        self._checkpoint_interval = checkpoint_interval_seconds
        self._segment_max_bytes = segment_max_bytes
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._failure: BaseException | None = None
        self._recovered: list[str] = []
        self._pending: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._checkpoint_queued = False
        # Chain state, owned by the writer once open() returns.
        self._seq = 0
        self._prev = ZERO_HASH
        self._segment = 1
        self._size = 0
        self._since_checkpoint = 0
        self._events_since_checkpoint = 0
        self._sealed_seq = 0
        # The file, touched only inside the writer's flush thread (or by open/close).
        self._fd: int | None = None
        self._fd_segment = 0
        self._fsyncs = 0
        self._batches = 0
        self._durable_seq = 0

    # -- public surface ---------------------------------------------------------------

    @property
    def recovered(self) -> list[str]:
        return list(self._recovered)

    @property
    def fsyncs(self) -> int:
        """fsyncs of segment data so far (HEAD.json and directory fsyncs not counted)."""
        return self._fsyncs

    @property
    def batches(self) -> int:
        """Group commits so far: each wrote what was queued, then fsynced once per segment."""
        return self._batches

    @property
    def durable_seq(self) -> int:
        """The highest seq known to be fsynced."""
        return self._durable_seq

    async def open(self) -> None:
        if self._state != "new":
            raise RuntimeError("AuditLog.open() may be called once")
        await asyncio.to_thread(self._open_files)
        self._state = "open"
        self._writer = asyncio.create_task(self._run_writer(), name="audit-writer")
        self._timer = asyncio.create_task(self._run_timer(), name="audit-checkpoint-timer")

    async def append(self, record: Mapping[str, Any]) -> AuditEntry:
        if self._failure is not None:
            raise AuditUnavailable(f"audit log failed earlier: {self._failure}")
        if self._state != "open":
            raise AuditUnavailable(f"audit log is {self._state}, not open")
        body = dict(record)
        if body.setdefault("type", "event") != "event":
            raise ValueError(f"append takes event records, not {body['type']!r}")
        clash = _RESERVED.intersection(body)
        if clash:
            raise ValueError(f"the audit log sets {', '.join(sorted(clash))} itself")
        body["time"] = _now()
        future: asyncio.Future[AuditEntry] = asyncio.get_running_loop().create_future()
        self._pending.append(_Item("event", body, future))
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        if self._state == "new":
            self._state = "closed"
            return
        if self._closer is None:
            self._closer = asyncio.create_task(self._close())
        await asyncio.shield(self._closer)

    def status(self) -> tuple[bool, str]:
        if self._failure is not None:
            return False, f"audit write failed: {self._failure}"
        if self._state != "open":
            return False, f"audit log is {self._state}"
        if not self._directory.is_dir():
            return False, f"{self._directory} is missing"
        return True, (
            f"{segment_name(self._segment)}: seq {self._seq}, sealed to seq {self._sealed_seq}"
        )

    # -- open -------------------------------------------------------------------------

    def _open_files(self) -> None:
        directory = self._directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._ensure_public_key()
        try:
            head = _read_head(directory)
        except ValueError as exc:
            raise AuditCorrupted(None, str(exc)) from None
        head_seq = None if head is None else int(head[1]["seq"])
        segments = _segments(directory)
        if not segments:
            if head is not None:
                raise AuditCorrupted(1, f"HEAD.json seals seq {head_seq} but no segment exists")
            self._adopt(1, _Scan())
            self._create_segment(1)
            return
        number, path = segments[-1]
        data = path.read_bytes()
        scan = _scan_segment(
            path.name,
            data,
            first=(1, ZERO_HASH) if number == 1 else None,
            allow_torn=True,
            want_seq=head_seq,
        )
        state = scan
        if scan.records == 0 and number > 1:
            # Nothing whole in the newest segment: the chain continues from the one before.
            if len(segments) < 2 or segments[-2][0] != number - 1:
                raise AuditCorrupted(None, f"{segment_name(number - 1)} is missing")
            before = segments[-2][1]
            state = _scan_segment(
                before.name, before.read_bytes(), first=None, allow_torn=False, want_seq=head_seq
            )
        if head is not None and head_seq is not None:
            self._check_head(head, head_seq, state)
        aside = self._set_aside(path, scan) if scan.torn else None
        self._adopt(number, state)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._fd_segment = number
        self._size = os.fstat(self._fd).st_size
        if aside is not None:
            try:
                self._write_recovery(path.name, scan, aside)
            except BaseException:
                os.close(self._fd)
                self._fd = None
                raise
        checkpoint = state.last_checkpoint
        if checkpoint is not None and (head_seq is None or checkpoint["seq"] > head_seq):
            # The crash came between a checkpoint's fsync and HEAD.json's replacement.
            where = path.name if state is scan else segments[-2][1].name
            write_atomic(directory / HEAD_FILE, _head_bytes(where, checkpoint), 0o600)

    def _ensure_public_key(self) -> None:
        path = self._directory / PUBLIC_KEY_FILE
        public_key = self._key.public_key()
        if not path.exists():
            write_atomic(path, _public_pem(public_key), 0o644)
            return
        try:
            on_disk = load_public_key(path)
        except AuditInputError as exc:
            raise ValueError(str(exc)) from None
        if key_id(on_disk) != self._key_id:
            # Signing with another key would make every later checkpoint fail verify.
            raise ValueError(
                f"{path} is not the public half of the audit signing key; "
                "restore the key or move the old log aside"
            )

    def _check_head(self, head: tuple[str, dict[str, Any]], head_seq: int, state: _Scan) -> None:
        """Refuse to append to a log whose tail was cut off below its last checkpoint."""
        segment, checkpoint = head
        if head_seq > state.last_seq:
            raise AuditCorrupted(
                state.last_seq + 1,
                f"truncated: HEAD.json seals seq {head_seq} but the log ends at seq "
                f"{state.last_seq}",
            )
        found = state.wanted_hash
        if found is None:
            older = self._directory / segment
            if _SEGMENT.fullmatch(segment) is None or not older.is_file():
                raise AuditCorrupted(head_seq, f"HEAD.json names missing segment {segment!r}")
            found = _scan_segment(
                segment, older.read_bytes(), first=None, allow_torn=False, want_seq=head_seq
            ).wanted_hash
        if found != checkpoint["hash"]:
            raise AuditCorrupted(
                head_seq,
                f"HEAD.json seals seq {head_seq} with hash {checkpoint['hash'][:16]}, "
                f"the log has {'no such record' if found is None else found[:16]}",
            )

    def _set_aside(self, path: Path, scan: _Scan) -> str:
        """Move the torn bytes to `<segment>.torn-<n>` and cut the segment back; the new name."""
        taken = {p.name for p in self._directory.iterdir()}
        n = 1
        while f"{path.name}.torn-{n}" in taken:
            n += 1
        aside = path.with_name(f"{path.name}.torn-{n}")
        write_new(aside, scan.torn, 0o600)
        fsync_dir(self._directory)
        with path.open("r+b") as segment:
            segment.truncate(scan.good_bytes)
            os.fsync(segment.fileno())
        return aside.name

    def _write_recovery(self, segment: str, scan: _Scan, aside: str) -> None:
        torn_sha256 = hashlib.sha256(scan.torn).hexdigest()
        body = {
            "type": "recovery",
            "time": _now(),
            "segment": segment,
            "offset": scan.good_bytes,
            "torn_length": len(scan.torn),
            "torn_sha256": torn_sha256,
            "moved_to": aside,
        }
        line, _ = self._seal(body)
        fd = self._require_fd()
        _write_all(fd, line)
        os.fsync(fd)
        self._fsyncs += 1
        self._durable_seq = self._seq
        self._recovered.append(
            f"{segment}: torn tail of {len(scan.torn)} bytes at byte offset {scan.good_bytes} "
            f"(sha256 {torn_sha256}) moved to {aside}; recovery record seq {self._seq}"
        )

    def _adopt(self, number: int, scan: _Scan) -> None:
        self._segment = number
        self._seq = self._durable_seq = scan.last_seq
        self._prev = scan.last_hash
        self._since_checkpoint = scan.since_checkpoint
        self._events_since_checkpoint = scan.events_since_checkpoint
        if scan.last_checkpoint is not None:
            self._sealed_seq = int(scan.last_checkpoint["covers_seq"])

    def _create_segment(self, number: int) -> None:
        path = self._directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        old, self._fd = self._fd, fd
        self._fd_segment = number
        if old is not None:
            os.close(old)
        fsync_dir(self._directory)

    # -- sealing (event loop thread) --------------------------------------------------

    def _seal(self, body: dict[str, Any]) -> tuple[bytes, str]:
        body["seq"] = self._seq + 1
        body["prev"] = self._prev
        line, digest = _seal_line(body)  # raises before any state moves
        self._seq += 1
        self._prev = digest
        self._size += len(line)
        if body["type"] == "checkpoint":
            self._since_checkpoint = self._events_since_checkpoint = 0
        else:
            self._since_checkpoint += 1
        return line, digest

    def _checkpoint(self) -> tuple[bytes, dict[str, Any]]:
        body: dict[str, Any] = {
            "type": "checkpoint",
            "time": _now(),
            "covers_seq": self._seq,
            "covers_hash": self._prev,
            "key_id": self._key_id,
        }
        if self._profile is not None:
            body["profile"] = self._profile
        body["signature"] = base64.b64encode(self._key.sign(_signed_payload(body))).decode()
        line, digest = self._seal(body)
        self._sealed_seq = body["covers_seq"]
        return line, {**body, "hash": digest}

    # -- the writer task --------------------------------------------------------------

    async def _run_writer(self) -> None:
        batch: list[_Item] = []
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                batch, self._pending = self._pending, []
                if batch and await self._commit(batch):
                    return
        except Exception as exc:
            # A bug here must not leave appenders waiting forever.
            self._fail(exc, [item.future for item in batch if item.future is not None])

    async def _commit(self, batch: list[_Item]) -> bool:
        """Seal, write and fsync one batch; True when the writer should stop."""
        chunks: list[tuple[int, list[bytes]]] = [(self._segment, [])]
        done: list[tuple[asyncio.Future[AuditEntry], AuditEntry]] = []
        head: tuple[str, dict[str, Any]] | None = None
        stop = False

        def checkpoint() -> None:
            nonlocal head
            line, record = self._checkpoint()
            chunks[-1][1].append(line)
            head = (segment_name(chunks[-1][0]), record)

        for item in batch:
            if item.kind == "event" and item.body is not None and item.future is not None:
                try:
                    line, digest = self._seal(item.body)
                except ValueError as exc:  # not JSON (NaN, cycles, ...): that caller's error
                    item.future.set_exception(exc)
                    continue
                except TypeError as exc:
                    item.future.set_exception(ValueError(f"record is not JSON: {exc}"))
                    continue
                chunks[-1][1].append(line)
                done.append((item.future, AuditEntry(self._seq, digest)))
                self._events_since_checkpoint += 1
                if self._events_since_checkpoint >= self._checkpoint_records:
                    checkpoint()
                if self._size > self._segment_max_bytes:
                    if self._since_checkpoint:
                        checkpoint()
                    self._segment += 1
                    self._size = 0
                    chunks.append((self._segment, []))
            elif item.kind in ("checkpoint", "close"):
                self._checkpoint_queued = False
                if self._since_checkpoint:
                    checkpoint()
                stop = stop or item.kind == "close"
        last_seq = self._seq
        writes = [(number, b"".join(lines)) for number, lines in chunks if lines]
        try:
            if writes:
                await asyncio.to_thread(self._flush, writes)
        except OSError as exc:
            # Records written but not known durable are never acknowledged; fsync errors
            # cannot be retried safely, so the log stays failed until it is reopened.
            self._fail(exc, [future for future, _ in done])
            return True
        self._durable_seq = last_seq
        for future, entry in done:
            if not future.done():
                future.set_result(entry)
        if head is not None:
            try:
                await asyncio.to_thread(
                    write_atomic, self._directory / HEAD_FILE, _head_bytes(*head), 0o600
                )
            except OSError as exc:
                # Without HEAD.json a cut tail would go unnoticed; stop taking records.
                self._fail(exc, [])
                return True
        return stop

    def _flush(self, writes: list[tuple[int, bytes]]) -> None:
        """Runs in a thread, so the event loop keeps taking appends meanwhile."""
        for number, data in writes:
            if number != self._fd_segment:
                self._create_segment(number)
            fd = self._require_fd()
            _write_all(fd, data)
            os.fsync(fd)
            self._fsyncs += 1
        self._batches += 1

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "the audit segment is not open")
        return self._fd

    def _fail(self, exc: BaseException, futures: list[asyncio.Future[AuditEntry]]) -> None:
        if self._failure is None:
            self._failure = exc
        futures = futures + [item.future for item in self._pending if item.future is not None]
        self._pending = []
        for future in futures:
            if not future.done():
                error = AuditUnavailable(f"audit write failed: {exc}")
                error.__cause__ = exc
                future.set_exception(error)

    async def _run_timer(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            if self._since_checkpoint and not self._checkpoint_queued and self._failure is None:
                self._checkpoint_queued = True
                self._pending.append(_Item("checkpoint"))
                self._wakeup.set()

    async def _close(self) -> None:
        self._state = "closing"
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._writer is not None:
            if not self._writer.done():
                self._pending.append(_Item("close"))
                self._wakeup.set()
            await self._writer
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._state = "closed"


# -- verify ---------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(byte offset, line with its newline if any, whether it is the file's last line)."""
    with path.open("rb") as handle:
        offset = 0
        previous: bytes | None = None
        for line in handle:
            if previous is not None:
                yield offset, previous, False
                offset += len(previous)
            previous = line
        if previous is not None:
            yield offset, previous, True


class _Verifier:
    def __init__(self, public_key: Ed25519PublicKey | None, head_seq: int | None) -> None:
        self.public_key = public_key
        self.head_seq = head_seq
        self.head_hash_in_log: str | None = None
        self.problems: list[Problem] = []
        self.records = 0
        self.checkpoints = 0
        self.unsealed = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.max_seq = 0
        # The last record in chain order: (seq, hash); hash None when unknown.
        self.chain: tuple[int, str | None] | None = None
        # Hashes the next record's prev may name (more than one after a duplicate seq).
        self.accept: set[str] = set()
        # Seq gaps reported as deletions, retyped as reorderings if the seq turns up later.
        self.gaps: list[tuple[int, int, int]] = []

    def problem(self, seq: int | None, kind: str, detail: str) -> None:
        self.problems.append(Problem(seq, kind, detail))

    def next_seq(self) -> int:
        return 1 if self.chain is None else self.chain[0] + 1

    def segment(self, path: Path, *, log_start: bool, last: bool) -> None:
        for offset, raw, final in _lines(path):
            where = f"{path.name} byte offset {offset}"
            if not raw.endswith(b"\n") or (last and final and not _parses(raw[:-1])):
                self.problem(
                    self.next_seq(),
                    "torn",
                    f"{where}: {len(raw)} trailing bytes are not a complete record",
                )
                continue
            self.line(raw[:-1], where, log_start=log_start and self.chain is None)

    def line(self, raw: bytes, where: str, *, log_start: bool) -> None:
        record, kind, detail = _examine(raw)
        if record is None:
            seq = self.next_seq()
            self.problem(seq, kind or "malformed", f"{where}: {detail}")
            self.chain, self.accept = (seq, None), set()
            return
        seq = record["seq"]
        self.records += 1
        self.first_seq = seq if self.first_seq is None else self.first_seq
        self.last_seq = seq
        self.max_seq = max(self.max_seq, seq)
        if seq == self.head_seq and self.head_hash_in_log is None:
            self.head_hash_in_log = record.get("hash")
        if kind is not None:
            self.problem(seq, kind, f"{where}: {detail}")
            stored = record.get("hash")
            self.advance(seq, stored if _is_hex64(stored) else None)
            self.unsealed += 1
            return
        if not self.link(record, where, log_start=log_start):
            return
        self.advance(seq, record["hash"])
        if record["type"] != "checkpoint":
            self.unsealed += 1
            return
        self.checkpoints += 1
        self.unsealed = 0
        if (record["covers_seq"], record["covers_hash"]) != (seq - 1, record["prev"]):
            self.problem(
                record["covers_seq"],
                "truncation",
                f"{where}: checkpoint seq {seq} seals seq {record['covers_seq']} hash "
                f"{record['covers_hash'][:16]}, which is not the record before it",
            )
        signature = _signature_problem(record, self.public_key)
        if signature is not None:
            self.problem(seq, signature[0], f"{where}: {signature[1]}")

    def link(self, record: dict[str, Any], where: str, *, log_start: bool) -> bool:
        """Check seq and prev against the chain; False when the record is out of place."""
        seq, prev = record["seq"], record["prev"]
        if self.chain is None:
            if log_start and seq != 1:
                self.problem(1, "deleted", f"{where}: the log starts at seq {seq}, not 1")
            elif log_start and prev != ZERO_HASH:
                self.problem(1, "inserted", f"{where}: seq 1 does not start from the zero hash")
            return True
        last, _ = self.chain
        if seq == last + 1:
            if self.accept and prev not in self.accept:
                self.problem(
                    seq, "inserted", f"{where}: prev {prev[:16]} is not the hash of seq {last}"
                )
            return True
        if seq > last + 1:
            self.gaps.append((len(self.problems), last + 1, seq - 1))
            missing = f"seq {last + 1}" if seq == last + 2 else f"seqs {last + 1}..{seq - 1}"
            self.problem(last + 1, "deleted", f"{where}: {missing} missing before seq {seq}")
            return True
        for index, low, high in self.gaps:
            if low <= seq <= high:
                self.problems[index] = Problem(
                    low, "reordered", f"{where}: seq {seq} comes after seq {last}"
                )
                break
        else:
            self.problem(seq, "inserted", f"{where}: seq {seq} appears again after seq {last}")
        if seq == last:
            self.accept.add(record["hash"])
        return False

    def advance(self, seq: int, digest: str | None) -> None:
        self.chain = (seq, digest)
        self.accept = set() if digest is None else {digest}

    def check_head(self, checkpoint: dict[str, Any]) -> None:
        seq = int(checkpoint["seq"])
        if seq > self.max_seq:
            self.problem(
                self.max_seq + 1,
                "truncation",
                f"HEAD.json seals seq {seq} (hash {checkpoint['hash'][:16]}) but the log ends "
                f"at seq {self.max_seq}",
            )
        elif self.head_hash_in_log != checkpoint["hash"]:
            found = self.head_hash_in_log
            self.problem(
                seq,
                "truncation",
                f"HEAD.json seals seq {seq} with hash {checkpoint['hash'][:16]}, but the log "
                + ("has no such seq" if found is None else f"has hash {found[:16]} there"),
            )
        else:
            return
        signature = _signature_problem(checkpoint, self.public_key)
        if signature is not None:
            self.problem(seq, signature[0], f"HEAD.json: {signature[1]}")


def verify(directory_or_file: Path, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
    """Check a log directory (or one segment, standalone from its first record's prev)."""
    path = directory_or_file
    if not path.exists():
        raise AuditInputError(f"{path}: no such file or directory")
    standalone = not path.is_dir()
    directory = path.parent if standalone else path
    notes: list[str] = []
    if public_key is None and (directory / PUBLIC_KEY_FILE).exists():
        public_key = load_public_key(directory / PUBLIC_KEY_FILE)
    if public_key is None:
        notes.append("checkpoint signatures not checked: no public key given and no audit.pub")
    head: tuple[str, dict[str, Any]] | None = None
    head_problem: str | None = None
    if not standalone:
        try:
            head = _read_head(directory)
        except ValueError as exc:
            head_problem = str(exc)
    segments = [(0, path)] if standalone else _segments(directory)
    if not segments and head is None and head_problem is None:
        raise AuditInputError(f"{path}: no audit segments (audit-NNNNNN.jsonl) and no HEAD.json")

    verifier = _Verifier(public_key, None if head is None else int(head[1]["seq"]))
    expected_number = 1
    for index, (number, segment) in enumerate(segments):
        if not standalone and number != expected_number:
            for missing in range(expected_number, number):
                verifier.problem(
                    verifier.next_seq(), "truncation", f"{segment_name(missing)} is missing"
                )
            # The gap is reported once; the next segment's first record starts a new chain.
            verifier.chain, verifier.accept = None, set()
        verifier.segment(
            segment, log_start=not standalone and number == 1, last=index == len(segments) - 1
        )
        expected_number = number + 1

    if head_problem is not None:
        verifier.problem(None, "malformed", head_problem)
    elif head is not None:
        verifier.check_head(head[1])
    elif not standalone and verifier.checkpoints:
        verifier.problem(None, "truncation", "HEAD.json is missing though the log has checkpoints")

    if verifier.unsealed and verifier.last_seq is not None:
        notes.append(
            f"{verifier.unsealed} record(s) after the last checkpoint are not sealed yet "
            f"(up to seq {verifier.last_seq})"
        )
    if not standalone:
        notes.extend(
            f"{p.name}: bytes set aside by crash recovery"
            for p in sorted(directory.glob("audit-*.jsonl.torn-*"))
        )
    return VerifyReport(
        ok=not verifier.problems,
        records=verifier.records,
        first_seq=verifier.first_seq,
        last_seq=verifier.last_seq,
        checkpoints=verifier.checkpoints,
        problems=verifier.problems,
        unsealed=verifier.unsealed,
        notes=notes,
    )
