"""Where sealed documents live: a SQLite catalog of metadata and wrapped data keys, and
one ciphertext file per document (`Vault`).

Takes sealed material only: nothing here ever sees plaintext. Gives atomic steps for the
ingest protocol (ciphertext file, then `stage`, then `commit` once the vectors are
stored), crypto-shredding deletes, key rewrapping for rotation, and the listings
`sovereign memory check` compares with the vector store.

The ciphertexts are plain files because they are large and written once: a file write
runs at disk speed, where SQLite rows ran at a tenth of it (docs/benchmarks.md). The
catalog is small and transactional. SQLite runs in WAL mode with `synchronous=FULL`, so a
step that returned survives a SIGKILL or power loss, and with `secure_delete`, so a
deleted wrapped key is overwritten in the file rather than left in a free page; the WAL is
truncated after each delete so no old copy stays there either. Once the wrapped key is
gone, a ciphertext file (or any backup of it) is unreadable: that is the shredding.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sovereign_gateway.memory.errors import StoreUnavailable

SCHEMA_VERSION = 1
State = Literal["pending", "committed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    classification TEXT NOT NULL,
    owner TEXT NOT NULL,
    tags TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    key_version INTEGER NOT NULL,
    kek_version INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    sealed_meta BLOB NOT NULL,
    offsets BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS documents_expiry ON documents (expires_at)
    WHERE expires_at IS NOT NULL;
"""


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    state: State
    classification: str
    owner: str
    tags: tuple[str, ...]
    media_type: str
    size: int
    chunks: int
    created_at: int
    expires_at: int | None
    key_version: int
    kek_version: int
    wrapped_key: bytes
    sealed_meta: bytes
    offsets: tuple[int, ...]  # where each sealed chunk starts in the file, then its end

    def span(self, chunk: int) -> tuple[int, int]:
        return self.offsets[chunk], self.offsets[chunk + 1]


_COLUMNS = (
    "id, state, classification, owner, tags, media_type, size, chunks, created_at, "
    "expires_at, key_version, kek_version, wrapped_key, sealed_meta, offsets"
)
# Built from the constant column list only; every value is a bound parameter.
_SELECT = f"SELECT {_COLUMNS} FROM documents WHERE id = ?"  # noqa: S608
_INSERT = f"INSERT INTO documents ({_COLUMNS}) VALUES ({', '.join('?' * 15)})"  # noqa: S608


def _record(row: sqlite3.Row) -> DocumentRecord:
    return DocumentRecord(
        id=row["id"],
        state=row["state"],
        classification=row["classification"],
        owner=row["owner"],
        tags=tuple(json.loads(row["tags"])),
        media_type=row["media_type"],
        size=row["size"],
        chunks=row["chunks"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        key_version=row["key_version"],
        kek_version=row["kek_version"],
        wrapped_key=bytes(row["wrapped_key"]),
        sealed_meta=bytes(row["sealed_meta"]),
        offsets=tuple(array("Q", bytes(row["offsets"]))),
    )


def _hold(lock_path: Path) -> int:
    """One process owns a data dir: a rotation or repair racing a running gateway could
    wrap new keys under a KEK it is retiring, or remove a document being ingested."""
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StoreUnavailable(
            f"{lock_path.parent} is in use by another process (a running gateway?); stop it first"
        ) from None
    return descriptor


class Catalog:
    """Synchronous and thread-safe; the memory service calls it from worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"{path.parent}: cannot create the data dir: {exc}") from None
        self._owner = _hold(path.with_suffix(".lock"))
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "secure_delete=ON",
                "foreign_keys=ON",
            ):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.executescript(_SCHEMA)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{path}: catalog schema {version} is not the supported {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            os.close(self._owner)
            raise StoreUnavailable(f"{path}: cannot open the document catalog: {exc}") from None
        path.chmod(0o600)
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        os.close(self._owner)

    def get(self, doc_id: str) -> DocumentRecord | None:
        with self._lock:
            row = self._db.execute(_SELECT, (doc_id,)).fetchone()
        return None if row is None else _record(row)

    def stage(self, record: DocumentRecord) -> None:
        """Step 2 of ingest, after its ciphertext file is durable: the document's record,
        invisible until `commit`. A pending leftover of an interrupted ingest is replaced."""
        with self._transaction() as db:
            db.execute("DELETE FROM documents WHERE id = ? AND state = 'pending'", (record.id,))
            db.execute(
                _INSERT,
                (
                    record.id,
                    "pending",
                    record.classification,
                    record.owner,
                    json.dumps(list(record.tags)),
                    record.media_type,
                    record.size,
                    record.chunks,
                    record.created_at,
                    record.expires_at,
                    record.key_version,
                    record.kek_version,
                    record.wrapped_key,
                    record.sealed_meta,
                    array("Q", record.offsets).tobytes(),
                ),
            )

    def commit(self, doc_id: str) -> None:
        """Step 4 of ingest, after the vectors are durable: the document becomes visible."""
        with self._transaction() as db:
            db.execute("UPDATE documents SET state = 'committed' WHERE id = ?", (doc_id,))

    def delete(self, doc_id: str) -> bool:
        """Crypto-shred: the wrapped data key is destroyed; the ciphertext is then noise."""
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM documents WHERE id = ?", (doc_id,)).rowcount
        self._truncate_wal()
        return deleted > 0

    def _truncate_wal(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def ids(self, state: State | None = None) -> set[str]:
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT id FROM documents").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT id FROM documents WHERE state = ?", (state,)
                ).fetchall()
        return {row[0] for row in rows}

    def expired(self, now: int) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM documents WHERE expires_at IS NOT NULL AND expires_at <= ? "
                "ORDER BY expires_at",
                (now,),
            ).fetchall()
        return [row[0] for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            documents = self._db.execute(
                "SELECT COUNT(*) FROM documents WHERE state = 'committed'"
            ).fetchone()[0]
            chunks = self._db.execute(
                "SELECT COALESCE(SUM(chunks), 0) FROM documents WHERE state = 'committed'"
            ).fetchone()[0]
        return {"documents": documents, "chunks": chunks}

    def rewrap(self, rewrap_key: Callable[[str, int, bytes], bytes], new_kek_version: int) -> int:
        """Rewrap every data key under another KEK version in one transaction.

        `rewrap_key(doc_id, kek_version, wrapped)` returns the key wrapped anew; the
        ciphertexts are untouched. Any failure rolls the whole rotation back.
        """
        with self._transaction() as db:
            rows = db.execute("SELECT id, kek_version, wrapped_key FROM documents").fetchall()
            for row in rows:
                db.execute(
                    "UPDATE documents SET wrapped_key = ?, kek_version = ? WHERE id = ?",
                    (
                        rewrap_key(row["id"], row["kek_version"], bytes(row["wrapped_key"])),
                        new_kek_version,
                        row["id"],
                    ),
                )
        self._truncate_wal()
        return len(rows)


def _write_all(descriptor: int, pieces: Sequence[bytes]) -> None:
    """Gather-write the pieces in order, without first copying them into one buffer."""
    batch = os.sysconf("SC_IOV_MAX")
    for start in range(0, len(pieces), batch):
        pending = [memoryview(piece) for piece in pieces[start : start + batch]]
        first = 0
        while first < len(pending):
            written = os.writev(descriptor, pending[first:])
            while first < len(pending) and written >= len(pending[first]):
                written -= len(pending[first])
                first += 1
            if written:  # a short write ended inside this piece
                pending[first] = pending[first][written:]


class Vault:
    """One ciphertext file per document: `<dir>/<id>.sealed`, the sealed chunks in order."""

    SUFFIX = ".sealed"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"{directory}: cannot create the ciphertext store: {exc}"
            ) from None

    def path(self, doc_id: str) -> Path:
        return self.directory / f"{doc_id}{self.SUFFIX}"

    def write(self, doc_id: str, sealed_chunks: Sequence[bytes]) -> tuple[int, ...]:
        """Step 1 of ingest: the file, durable and whole before anything names it."""
        offsets = [0]
        for sealed in sealed_chunks:
            offsets.append(offsets[-1] + len(sealed))
        final = self.path(doc_id)
        partial = final.with_suffix(".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(descriptor, sealed_chunks)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(partial, final)
        self._sync_directory()
        return tuple(offsets)

    def read(self, doc_id: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        with self.path(doc_id).open("rb") as file:
            return [os.pread(file.fileno(), end - start, start) for start, end in spans]

    def remove(self, doc_id: str) -> None:
        self.path(doc_id).unlink(missing_ok=True)
        self.path(doc_id).with_suffix(".partial").unlink(missing_ok=True)

    def ids(self) -> set[str]:
        return {
            path.name.split(".", 1)[0]
            for pattern in (f"*{self.SUFFIX}", "*.partial")
            for path in self.directory.glob(pattern)
        }

    def _sync_directory(self) -> None:
        descriptor = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
