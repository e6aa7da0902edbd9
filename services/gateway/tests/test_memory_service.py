"""The memory service on real parts: MiniLM on onnxruntime, Qdrant Edge, SQLite, files.

Covers what the gateway tests reach only by crashing a process: each state an interrupted
ingest can leave, what `check` reports for it and how `--repair` fixes it, crypto-shredding,
and key rotation rewrapping every data key without touching a ciphertext.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sovereign_gateway.memory import envelope
from sovereign_gateway.memory.chunking import Chunker
from sovereign_gateway.memory.embeddings import MiniLMEmbedder
from sovereign_gateway.memory.errors import KeyUnavailable, Tampered
from sovereign_gateway.memory.service import DocumentConflict, DocumentMeta, Memory
from sovereign_gateway.memory.store import Access, open_store

from services.gateway.tests import models

EVERYTHING = Access(classifications=("public", "internal", "confidential", "secret"), subject="t")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings(home: Path, key_file: str = "memory.kek") -> envelope.KekSettings:
    return envelope.KekSettings(
        source="file", keyring=home / "keyring.json", key_file=home / key_file
    )


async def open_memory(home: Path, key_file: str = "memory.kek") -> Memory:
    keyring = envelope.KeyRing.open(settings(home, key_file))
    return Memory(
        data_dir=home,
        keyring=keyring,
        store=await open_store("embedded", path=home / "vectors", dimensions=384),
        embedder=MiniLMEmbedder(
            model_path=models.minilm_onnx(),
            tokenizer_path=models.minilm_tokenizer(),
            sha256=models.MINILM_ONNX_SHA256,
        ),
        chunker=Chunker.from_file(models.minilm_tokenizer(), 64, 8),
    )


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[Memory]:
    opened = await open_memory(tmp_path)
    yield opened
    await opened.close()


def meta(**overrides: object) -> DocumentMeta:
    values: dict[str, object] = {"classification": "internal", "owner": "t"}
    values.update(overrides)
    return DocumentMeta(**values)  # type: ignore[arg-type]


TEXT = " ".join(f"Sentence {n} is about the hospital's linen supply." for n in range(60))


@pytest.mark.anyio
async def test_ingest_then_query_round_trips_through_ciphertext(memory: Memory) -> None:
    result = await memory.ingest(TEXT.encode(), meta(title="Linen"), EVERYTHING)
    assert result.id == hashlib.sha256(TEXT.encode()).hexdigest()
    assert result.chunks > 3
    matches = await memory.query("linen supply", 3, EVERYTHING)
    assert [m.doc_id for m in matches] == [result.id] * 3
    assert all(m.text in TEXT and m.title == "Linen" for m in matches)
    sealed = memory.vault.path(result.id).read_bytes()
    assert b"linen" not in sealed.lower()


@pytest.mark.anyio
async def test_check_finds_and_repairs_every_kind_of_orphan(memory: Memory) -> None:
    kept = await memory.ingest(b"The pharmacy opens at eight.", meta(), EVERYTHING)
    unindexed = await memory.ingest(b"The chapel is on the second floor.", meta(), EVERYTHING)
    missing = await memory.ingest(b"The car park closes at midnight.", meta(), EVERYTHING)
    await memory.store.delete_document(unindexed.id)
    memory.vault.remove(missing.id)
    memory.vault.write("f" * 64, [b"orphan ciphertext"])
    # A pending record with its vectors: an ingest killed between upsert and commit.
    pending_text = b"The lift on the east side is out of order."
    await memory.ingest(pending_text, meta(), EVERYTHING)
    pending_id = hashlib.sha256(pending_text).hexdigest()
    memory.catalog._db.execute("UPDATE documents SET state = 'pending' WHERE id = ?", (pending_id,))
    report = await memory.check()
    assert report.as_dict() == {
        "documents": 3,
        "pending": [pending_id],
        "orphan_ciphertext": ["f" * 64],
        "missing_ciphertext": [missing.id],
        "unindexed": [unindexed.id],
        "unknown_vectors": [],
        "clean": False,
        "repaired": False,
    }
    assert pending_id not in {
        m.doc_id for m in await memory.query("lift out of order", 5, EVERYTHING)
    }
    repaired = await memory.check(repair=True)
    assert repaired.repaired
    assert (await memory.check()).clean
    found = {m.doc_id for m in await memory.query("Where is the chapel?", 5, EVERYTHING)}
    assert unindexed.id in found  # re-indexed from its ciphertext
    assert kept.id in {m.doc_id for m in await memory.query("pharmacy hours", 5, EVERYTHING)}
    assert await memory.document(missing.id) is None
    assert await memory.document(pending_id) is None


@pytest.mark.anyio
async def test_vectors_without_a_record_are_reported_and_removed(memory: Memory) -> None:
    doc = await memory.ingest(b"The canteen serves soup on Mondays.", meta(), EVERYTHING)
    memory.catalog.delete(doc.id)  # the record is gone, the vectors and file remain
    report = await memory.check()
    assert report.unknown_vectors == [doc.id]
    assert report.orphan_ciphertext == [doc.id]
    await memory.check(repair=True)
    assert await memory.store.document_ids() == set()
    assert not memory.vault.path(doc.id).exists()


@pytest.mark.anyio
async def test_deleting_destroys_the_key_so_a_kept_ciphertext_is_unreadable(
    memory: Memory,
) -> None:
    doc = await memory.ingest(TEXT.encode(), meta(), EVERYTHING)
    record = await memory.document(doc.id)
    assert record is not None
    kept = memory.vault.path(doc.id).read_bytes()
    assert await memory.delete(doc.id)
    assert await memory.document(doc.id) is None
    assert not await memory.delete(doc.id)
    # Even with the old wrapped key, the right KEK is the only way in; the catalog no
    # longer has it, and no other document's key opens this ciphertext.
    other = await memory.ingest(b"Another document.", meta(), EVERYTHING)
    other_record = await memory.document(other.id)
    assert other_record is not None
    other_key = memory.keyring.kek(other_record.kek_version).unwrap(
        other_record.wrapped_key, other.id
    )
    start, end = record.span(0)
    with pytest.raises(Tampered):
        envelope.unseal(other_key, kept[start:end], envelope.chunk_aad(doc.id, 0, 1))
    assert memory.catalog.get(doc.id) is None


@pytest.mark.anyio
async def test_rotation_rewraps_every_key_and_leaves_ciphertexts_alone(tmp_path: Path) -> None:
    memory = await open_memory(tmp_path)
    first = await memory.ingest(b"The blood bank is in the basement.", meta(), EVERYTHING)
    second = await memory.ingest(TEXT.encode(), meta(), EVERYTHING)
    files = {doc: memory.vault.path(doc).read_bytes() for doc in (first.id, second.id)}
    before = {doc: memory.catalog.get(doc) for doc in files}

    def rewrap(ring: envelope.KeyRing, new: envelope.Kek) -> int:
        def one(doc_id: str, version: int, wrapped: bytes) -> bytes:
            return new.wrap(ring.kek(version).unwrap(wrapped, doc_id), doc_id)

        return memory.catalog.rewrap(one, new.version)

    count = memory.keyring.rotate(settings(tmp_path, "memory-2.kek"), rewrap)
    assert count == 2
    for doc, content in files.items():
        assert memory.vault.path(doc).read_bytes() == content
        after, earlier = memory.catalog.get(doc), before[doc]
        assert after is not None
        assert earlier is not None
        assert after.kek_version == memory.keyring.current.version != earlier.kek_version
        assert after.wrapped_key != earlier.wrapped_key
    await memory.close()
    reopened = await open_memory(tmp_path, "memory-2.kek")
    assert {m.doc_id for m in await reopened.query("blood bank", 2, EVERYTHING)} >= {first.id}
    await reopened.close()
    # The retired key file is gone, and the keyring no longer names it.
    assert not (tmp_path / "memory.kek").exists()
    with pytest.raises(KeyUnavailable, match="sovereign keys rotate"):
        envelope.KeyRing.open(settings(tmp_path, "memory.kek"), create=False)


@pytest.mark.anyio
async def test_a_missing_ciphertext_is_only_reported_unless_shredding_is_asked_for(
    memory: Memory,
) -> None:
    doc = await memory.ingest(b"The morgue is in the basement.", meta(), EVERYTHING)
    memory.vault.remove(doc.id)  # as if the volume were not mounted yet
    report = await memory.check(repair=True, shred_missing=False)
    assert report.missing_ciphertext == [doc.id]
    assert not report.repaired
    assert await memory.document(doc.id) is not None  # the key survives for a later mount
    await memory.check(repair=True)
    assert await memory.document(doc.id) is None


@pytest.mark.anyio
async def test_retention_audits_each_document_before_it_goes(memory: Memory) -> None:
    kept = await memory.ingest(b"Kept for good.", meta(), EVERYTHING)
    first = await memory.ingest(b"Expires first.", meta(retention_seconds=10), EVERYTHING)
    second = await memory.ingest(b"Expires too.", meta(retention_seconds=20), EVERYTHING)
    audited: list[str] = []

    async def audit(doc_id: str) -> None:
        if len(audited) == 1:
            raise OSError("audit log full")
        audited.append(doc_id)

    later = first.expires_at + 100  # type: ignore[operator]
    with pytest.raises(OSError, match="audit log full"):
        await memory.expire(audit, now=later)
    # The first went after its record; the second stays, since its record failed.
    assert audited == [first.id]
    assert await memory.document(first.id) is None
    assert await memory.document(second.id) is not None
    assert await memory.document(kept.id) is not None


@pytest.mark.anyio
async def test_the_same_content_is_described_only_to_a_caller_who_may_read_it(
    memory: Memory,
) -> None:
    await memory.ingest(b"Payroll for March.", meta(classification="secret"), EVERYTHING)
    reader = Access(classifications=("public", "internal"), subject="u")
    with pytest.raises(DocumentConflict) as refused:
        await memory.ingest(b"Payroll for March.", meta(), reader)
    assert "secret" not in str(refused.value)
    assert "classification" not in str(refused.value)
    with pytest.raises(DocumentConflict, match="classification"):
        await memory.ingest(b"Payroll for March.", meta(), EVERYTHING)
