"""The memory service: ingest, retrieval, deletion, retention and repair, in one place.

Takes the gateway's memory settings; gives `Memory`, which the gateway's /ingest, /query,
/embed, /v1/embeddings and DELETE /documents/{id} handlers (and the CLI) call.

Ingest keeps plaintext in RAM only: the document is parsed from bytes, chunked, embedded
and sealed in memory, and only ciphertext reaches the disk. It is atomic in four steps:
the ciphertext file is written, the document's record is staged invisibly, its vectors
are stored, then the record is committed. A crash in between leaves a file with no
record, a pending record, or vectors with no record: a query never returns any of them
and `check` removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np

from sovereign_gateway.contract import MemoryStore
from sovereign_gateway.memory import envelope
from sovereign_gateway.memory.catalog import Catalog, DocumentRecord, Vault
from sovereign_gateway.memory.chunking import Chunker
from sovereign_gateway.memory.documents import parse_document
from sovereign_gateway.memory.embeddings import (
    Embedder,
    Embeddings,
    MiniLMEmbedder,
    UpstreamEmbedder,
)
from sovereign_gateway.memory.errors import (
    DocumentRejected,
    EmbeddingUnavailable,
    MemoryFailure,
)
from sovereign_gateway.memory.store import (
    Access,
    ChunkPoint,
    Hit,
    VectorStore,
    Where,
    open_store,
)

log = logging.getLogger("sovereign_gateway.memory")

CATALOG_FILE = "catalog.db"
KEYRING_FILE = "keyring.json"
VECTORS_DIR = "vectors"
SEALED_DIR = "sealed"


class DocumentConflict(MemoryFailure):
    """The same content is stored already, under other metadata."""

    status = 409
    code = "document_exists"


@dataclass(frozen=True)
class DocumentMeta:
    classification: str
    owner: str
    tags: tuple[str, ...] = ()
    title: str | None = None
    retention_seconds: int | None = None
    media_type: str | None = None
    filename: str | None = None


@dataclass(frozen=True)
class Ingested:
    id: str
    chunks: int
    media_type: str
    size: int
    created: bool
    classification: str
    owner: str
    tags: tuple[str, ...]
    expires_at: int | None

    @property
    def digest(self) -> str:
        return f"sha256:{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "document",
            "digest": self.digest,
            "chunks": self.chunks,
            "media_type": self.media_type,
            "bytes": self.size,
            "created": self.created,
            "classification": self.classification,
            "owner": self.owner,
            "tags": list(self.tags),
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True)
class Match:
    doc_id: str
    chunk: int
    score: float
    text: str
    title: str | None
    classification: str
    owner: str
    tags: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "document": self.doc_id,
            "chunk": self.chunk,
            "score": round(self.score, 6),
            "text": self.text,
            "title": self.title,
            "classification": self.classification,
            "owner": self.owner,
            "tags": list(self.tags),
        }


@dataclass
class CheckReport:
    """Disagreements between the catalog, the ciphertext files and the vector index."""

    documents: int = 0
    # Interrupted ingests: a record never committed. Never visible; removed.
    pending: list[str] = field(default_factory=list)
    # A ciphertext file no record names. Removed.
    orphan_ciphertext: list[str] = field(default_factory=list)
    # A committed record whose ciphertext file is gone: unreadable. Removed with its vectors.
    missing_ciphertext: list[str] = field(default_factory=list)
    # Ciphertext with no index entry: a committed document without vectors. Re-indexed.
    unindexed: list[str] = field(default_factory=list)
    # Index entries with no ciphertext: vectors no record names. Removed.
    unknown_vectors: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not (
            self.pending
            or self.orphan_ciphertext
            or self.missing_ciphertext
            or self.unindexed
            or self.unknown_vectors
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "pending": self.pending,
            "orphan_ciphertext": self.orphan_ciphertext,
            "missing_ciphertext": self.missing_ciphertext,
            "unindexed": self.unindexed,
            "unknown_vectors": self.unknown_vectors,
            "clean": self.clean,
            "repaired": self.repaired,
        }


def meta_aad(doc_id: str, key_version: int) -> bytes:
    # The chunk AAD with an index no chunk has, so metadata and chunks never interchange.
    return envelope.chunk_aad(doc_id, 2**31 - 1, key_version)


def visible(access: Access, record: DocumentRecord) -> bool:
    """The policy's memory_access rule, evaluated on the catalog's own record."""
    return access.sees(record.classification, record.owner, record.tags)


class Memory:
    def __init__(
        self,
        *,
        data_dir: Path,
        keyring: envelope.KeyRing,
        store: VectorStore,
        embedder: Embedder,
        chunker: Chunker,
        default_retention_seconds: int | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.keyring = keyring
        self.store = store
        self.embedder = embedder
        self.chunker = chunker
        self.default_retention_seconds = default_retention_seconds
        self.catalog = catalog or Catalog(data_dir / CATALOG_FILE)
        self.vault = Vault(data_dir / SEALED_DIR)
        # One writer per document id; an entry lives only while someone holds or awaits it.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    async def close(self) -> None:
        try:
            await self.store.close()
            await self.embedder.close()
        finally:
            self.catalog.close()

    @asynccontextmanager
    async def _exclusive(self, doc_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(doc_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[doc_id]

    # -- ingest -----------------------------------------------------------------------

    async def ingest(self, content: bytes, meta: DocumentMeta, access: Access) -> Ingested:
        """`access` is the caller's: a stored copy it cannot read is not described to it."""
        doc_id = await anyio.to_thread.run_sync(_sha256, content)
        async with self._exclusive(doc_id):
            return await self._ingest(doc_id, content, meta, access)

    async def _ingest(
        self, doc_id: str, content: bytes, meta: DocumentMeta, access: Access
    ) -> Ingested:
        existing = await anyio.to_thread.run_sync(self.catalog.get, doc_id)
        if existing is not None and existing.state == "committed":
            if not _expired(existing, int(time.time())):
                return self._same_document(existing, meta, access)
            # Past its retention and not yet shredded: this ingest starts it afresh.
            await self._shred(doc_id)
        parsed = await anyio.to_thread.run_sync(
            parse_document, content, meta.media_type, meta.filename
        )
        chunks = await anyio.to_thread.run_sync(self.chunker.chunk, parsed.text)
        if not chunks:
            raise DocumentRejected("the document has no text to index", "content")
        embedded = await self.embedder.embed([chunk.text for chunk in chunks])
        now = int(time.time())
        retention = meta.retention_seconds or self.default_retention_seconds
        expires_at = None if retention is None else now + retention
        kek = self.keyring.current
        data_key = envelope.new_data_key()
        sealed = await anyio.to_thread.run_sync(
            envelope.seal_chunks,
            data_key,
            doc_id,
            envelope.DATA_KEY_VERSION,
            [chunk.text.encode() for chunk in chunks],
        )
        offsets = await anyio.to_thread.run_sync(self.vault.write, doc_id, sealed)
        record = DocumentRecord(
            id=doc_id,
            state="pending",
            classification=meta.classification,
            owner=meta.owner,
            tags=meta.tags,
            media_type=parsed.media_type,
            size=len(content),
            chunks=len(chunks),
            created_at=now,
            expires_at=expires_at,
            key_version=envelope.DATA_KEY_VERSION,
            kek_version=kek.version,
            wrapped_key=kek.wrap(data_key, doc_id),
            sealed_meta=envelope.seal(
                data_key,
                json.dumps({"title": meta.title, "filename": meta.filename}).encode(),
                meta_aad(doc_id, envelope.DATA_KEY_VERSION),
            ),
            offsets=offsets,
        )
        await anyio.to_thread.run_sync(self.catalog.stage, record)
        await self.store.upsert(_points(record, embedded.vectors))
        await anyio.to_thread.run_sync(self.catalog.commit, doc_id)
        return _ingested(record, created=True)

    def _same_document(
        self, existing: DocumentRecord, meta: DocumentMeta, access: Access
    ) -> Ingested:
        if not visible(access, existing):
            # Content addressing tells a caller that someone stored this content; nothing
            # more about that copy, which the caller may not read, is said.
            raise DocumentConflict(
                "a document with this content is stored already, under metadata you cannot "
                "read; it cannot be stored a second time"
            )
        differing = [
            name
            for name, stored, asked in (
                ("classification", existing.classification, meta.classification),
                ("owner", existing.owner, meta.owner),
                ("tags", tuple(sorted(existing.tags)), tuple(sorted(meta.tags))),
            )
            if stored != asked
        ]
        if differing:
            raise DocumentConflict(
                f"document {existing.id} is stored already with another "
                f"{', '.join(differing)}; delete it first to store it again"
            )
        return _ingested(existing, created=False)

    # -- retrieval --------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        return await self.embedder.embed(list(texts))

    async def query(
        self,
        text: str,
        k: int,
        access: Access,
        where: Where | None = None,
        min_score: float | None = None,
    ) -> list[Match]:
        if not access.classifications:
            return []
        vector = (await self.embedder.embed([text])).vectors[0]
        hits = await self.store.search(vector, k, access, where)
        if min_score is not None:
            hits = [hit for hit in hits if hit.score >= min_score]
        return await anyio.to_thread.run_sync(self._open_hits, hits, access)

    def _open_hits(self, hits: Sequence[Hit], access: Access) -> list[Match]:
        now = int(time.time())
        records: dict[str, DocumentRecord | None] = {}
        keys: dict[str, bytes] = {}
        titles: dict[str, str | None] = {}
        matches: list[Match] = []
        for hit in hits:
            if hit.doc_id not in records:
                records[hit.doc_id] = self.catalog.get(hit.doc_id)
            record = records[hit.doc_id]
            if record is None or record.state != "committed" or hit.chunk >= record.chunks:
                continue  # pending, or an orphan vector: `check` removes it
            if _expired(record, now):
                continue  # past its retention: the next retention run shreds it
            if not visible(access, record):
                # The index said visible, the catalog says not: trust the catalog.
                log.error("vector payload of %s disagrees with its catalog record", record.id)
                continue
            if record.id not in keys:
                keys[record.id] = self._data_key(record)
                titles[record.id] = self._title(record, keys[record.id])
            try:
                (ciphertext,) = self.vault.read(record.id, [record.span(hit.chunk)])
            except FileNotFoundError:
                log.error("document %s has lost its ciphertext file", record.id)
                continue
            text = envelope.unseal(
                keys[record.id],
                ciphertext,
                envelope.chunk_aad(record.id, hit.chunk, record.key_version),
            ).decode()
            matches.append(
                Match(
                    doc_id=record.id,
                    chunk=hit.chunk,
                    score=float(hit.score),
                    text=text,
                    title=titles[record.id],
                    classification=record.classification,
                    owner=record.owner,
                    tags=record.tags,
                )
            )
        return matches

    def _data_key(self, record: DocumentRecord) -> bytes:
        return self.keyring.kek(record.kek_version).unwrap(record.wrapped_key, record.id)

    def _title(self, record: DocumentRecord, data_key: bytes) -> str | None:
        aad = meta_aad(record.id, record.key_version)
        meta = json.loads(envelope.unseal(data_key, record.sealed_meta, aad))
        title = meta.get("title")
        return title if isinstance(title, str) else None

    async def document(self, doc_id: str) -> DocumentRecord | None:
        record = await anyio.to_thread.run_sync(self.catalog.get, doc_id)
        return None if record is None or record.state != "committed" else record

    # -- deletion, retention, repair --------------------------------------------------

    async def delete(self, doc_id: str) -> bool:
        async with self._exclusive(doc_id):
            return await self._shred(doc_id)

    async def _shred(self, doc_id: str) -> bool:
        """Crypto-shred first (the catalog drops the wrapped key), then the file and vectors.

        Once the key is gone the document is deleted, whatever happens next: vectors left by
        a failing store are vectors with no record, which `check` removes.
        """
        deleted = await anyio.to_thread.run_sync(self.catalog.delete, doc_id)
        await anyio.to_thread.run_sync(self.vault.remove, doc_id)
        try:
            await self.store.delete_document(doc_id)
        except MemoryFailure as failure:
            log.error(
                "document %s is shredded but its vectors stay until `check`: %s", doc_id, failure
            )
        return deleted

    async def expire(
        self, before_delete: Callable[[str], Awaitable[None]], now: int | None = None
    ) -> list[str]:
        """Shred every document past its retention; `before_delete` (the audit) runs first
        for each, and its failure stops the run with nothing more deleted."""
        moment = int(time.time()) if now is None else now
        expired = await anyio.to_thread.run_sync(self.catalog.expired, moment)
        done = []
        for doc_id in expired:
            async with self._exclusive(doc_id):
                record = await anyio.to_thread.run_sync(self.catalog.get, doc_id)
                if record is None or not _expired(record, moment):
                    continue  # deleted, or stored anew, since the list was made
                await before_delete(doc_id)
                await self._shred(doc_id)
                done.append(doc_id)
        return done

    async def check(self, repair: bool = False, *, shred_missing: bool = True) -> CheckReport:
        """Compare catalog, ciphertext files and index; with `repair`, fix what they disagree
        on. `shred_missing` False keeps the records whose file is gone: at start a missing
        file may be an unmounted volume, not a lost one, and shredding cannot be undone."""
        pending = await anyio.to_thread.run_sync(self.catalog.ids, "pending")
        committed = await anyio.to_thread.run_sync(self.catalog.ids, "committed")
        files = await anyio.to_thread.run_sync(self.vault.ids)
        indexed = await self.store.document_ids()
        missing = committed - files
        report = CheckReport(
            documents=len(committed),
            pending=sorted(pending),
            orphan_ciphertext=sorted(files - committed - pending),
            missing_ciphertext=sorted(missing),
            unindexed=sorted(committed - missing - indexed),
            unknown_vectors=sorted(indexed - committed - pending),
        )
        if not repair or report.clean:
            return report
        # Interrupted ingests were never visible, so they go; the client may send them again.
        for doc_id in report.pending + (report.missing_ciphertext if shred_missing else []):
            await self.delete(doc_id)
        for doc_id in report.orphan_ciphertext:
            await anyio.to_thread.run_sync(self.vault.remove, doc_id)
        for doc_id in report.unknown_vectors:
            await self.store.delete_document(doc_id)
        for doc_id in report.unindexed:
            await self._reindex(doc_id)
        report.repaired = shred_missing or not report.missing_ciphertext
        return report

    async def _reindex(self, doc_id: str) -> None:
        """Vectors lost but ciphertext intact: decrypt in RAM, embed again, store again."""
        record = await anyio.to_thread.run_sync(self.catalog.get, doc_id)
        if record is None:
            return
        data_key = self._data_key(record)
        spans = [record.span(index) for index in range(record.chunks)]
        sealed = await anyio.to_thread.run_sync(self.vault.read, doc_id, spans)
        texts = [
            envelope.unseal(
                data_key, ciphertext, envelope.chunk_aad(doc_id, index, record.key_version)
            ).decode()
            for index, ciphertext in enumerate(sealed)
        ]
        embedded = await self.embedder.embed(texts)
        await self.store.upsert(_points(record, embedded.vectors))

    def counts(self) -> dict[str, int]:
        return self.catalog.counts()


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _expired(record: DocumentRecord, now: int) -> bool:
    return record.expires_at is not None and record.expires_at <= now


def _points(record: DocumentRecord, vectors: np.ndarray) -> list[ChunkPoint]:
    return [
        ChunkPoint(
            doc_id=record.id,
            chunk=index,
            vector=vectors[index],
            classification=record.classification,
            owner=record.owner,
            tags=record.tags,
            expires_at=record.expires_at,
        )
        for index in range(record.chunks)
    ]


def _ingested(record: DocumentRecord, *, created: bool) -> Ingested:
    return Ingested(
        id=record.id,
        chunks=record.chunks,
        media_type=record.media_type,
        size=record.size,
        created=created,
        classification=record.classification,
        owner=record.owner,
        tags=record.tags,
        expires_at=record.expires_at,
    )


async def open_memory(
    settings: MemoryStore,
    resolve: Callable[[str], Path],
    session: Callable[[], aiohttp.ClientSession],
    *,
    create: bool = True,
) -> Memory:
    """Everything the memory needs, opened from the gateway's settings.

    The data dir's lock first (nothing else touches it while another process holds it),
    then the key ring: without its KEK nothing else is worth opening. Every failure is a
    `MemoryFailure` that says which part and why, and closes what was opened.
    """
    data_dir = resolve(settings.data_dir)
    catalog = Catalog(data_dir / CATALOG_FILE)
    opened: list[Callable[[], Awaitable[None]]] = []
    try:
        keyring = await anyio.to_thread.run_sync(
            partial(envelope.KeyRing.open, kek_settings(settings, resolve), create=create)
        )
        embedder = await _embedder(settings, resolve, session)
        opened.append(embedder.close)
        tokenizer = resolve(settings.embeddings.tokenizer)
        try:
            chunker = Chunker.from_file(tokenizer, settings.chunk_tokens, settings.chunk_overlap)
        except Exception as exc:  # the tokenizers library raises plain Exception
            raise EmbeddingUnavailable(f"{tokenizer}: cannot load the tokenizer: {exc}") from None
        store = await open_store(
            settings.vector_store,
            path=data_dir / VECTORS_DIR,
            dimensions=settings.embeddings.dimensions,
            qdrant_url=settings.qdrant_url,
        )
    except BaseException:
        for close in reversed(opened):
            with contextlib.suppress(Exception):
                await close()
        catalog.close()
        raise
    return Memory(
        data_dir=data_dir,
        keyring=keyring,
        store=store,
        embedder=embedder,
        chunker=chunker,
        default_retention_seconds=settings.default_retention_seconds,
        catalog=catalog,
    )


async def _embedder(
    settings: MemoryStore,
    resolve: Callable[[str], Path],
    session: Callable[[], aiohttp.ClientSession],
) -> Embedder:
    model = settings.embeddings
    if model.engine == "upstream":
        return UpstreamEmbedder(
            base_url=model.url or "",
            model=model.model,
            dimensions=model.dimensions,
            session=session,
        )
    return await anyio.to_thread.run_sync(
        partial(
            MiniLMEmbedder,
            model_path=resolve(model.weights or ""),
            tokenizer_path=resolve(model.tokenizer),
            sha256=model.sha256 or "",
            name=model.model,
        )
    )


def kek_settings(settings: MemoryStore, resolve: Callable[[str], Path]) -> envelope.KekSettings:
    return envelope.KekSettings(
        source=settings.key_source,
        keyring=resolve(settings.data_dir) / KEYRING_FILE,
        key_file=None if settings.key_file is None else resolve(settings.key_file),
        passphrase=envelope.passphrase_from_environment()
        if settings.key_source == "passphrase"
        else None,
        tpm_tcti=settings.tpm_tcti,
        tpm_pcrs=tuple(settings.tpm_pcrs),
    )
