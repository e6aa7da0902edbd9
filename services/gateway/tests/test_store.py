"""The vector store: one suite run against both engines, checked against exact search.

The embedded engine is a real Qdrant Edge shard in a temp directory. The Qdrant engine is
qdrant-client's local mode (`location=":memory:"`): the same client API as against a
server, run in-process, since no Qdrant server binary can be had on these machines; it
searches by brute force. At this size both search exactly, so every search is compared with
an exact numpy oracle: same chunks, same order.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import numpy.typing as npt
import pytest
from qdrant_client import AsyncQdrantClient
from sovereign_gateway.memory.errors import StoreUnavailable
from sovereign_gateway.memory.store import (
    CLASSIFICATIONS,
    Access,
    ChunkPoint,
    EdgeStore,
    Hit,
    QdrantStore,
    VectorStore,
    Where,
    checked_hits,
    open_store,
    point_id,
)

DIM = 64
NOW = 1_800_000_000


@dataclass(frozen=True)
class Doc:
    doc_id: str
    classification: str
    owner: str
    tags: tuple[str, ...]
    chunks: int
    expires_at: int | None = None


# A few hundred chunks over every classification, owners with and without tagged documents.
CORPUS = (
    Doc("pub-a", "public", "alice", (), 40),
    Doc("pub-c", "public", "carol", ("legal",), 30, expires_at=NOW - 10),
    Doc("int-b", "internal", "bob", (), 40),
    Doc("hr-alice", "internal", "alice", ("hr",), 25),
    Doc("hr-bob", "internal", "bob", ("hr", "finance"), 25, expires_at=NOW),
    Doc("fin-carol", "internal", "carol", ("finance",), 20, expires_at=NOW + 1),
    Doc("conf-c", "confidential", "carol", (), 30),
    Doc("conf-hr", "confidential", "bob", ("hr",), 20),
    Doc("sec-admin", "secret", "admin", (), 30),
)
DOCS = {doc.doc_id: doc for doc in CORPUS}


def unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def corpus_points(seed: int = 7) -> list[ChunkPoint]:
    rng = np.random.default_rng(seed)
    return [
        ChunkPoint(
            doc_id=doc.doc_id,
            chunk=chunk,
            vector=unit(rng.standard_normal(DIM)),
            classification=doc.classification,
            owner=doc.owner,
            tags=doc.tags,
            expires_at=doc.expires_at,
        )
        for doc in CORPUS
        for chunk in range(doc.chunks)
    ]


POINTS = corpus_points()
QUERIES = unit(np.random.default_rng(11).standard_normal((6, DIM)))
EVERYONE = Access(classifications=CLASSIFICATIONS, subject="admin")


def may_see(access: Access, doc: Doc) -> bool:
    """The rule as the policy states it, written out again for the oracle."""
    if doc.classification not in access.classifications:
        return False
    return doc.owner == access.subject or not any(tag in access.denied_tags for tag in doc.tags)


def exact(
    query: npt.NDArray[np.float32],
    k: int,
    access: Access,
    where: Where | None = None,
    points: Sequence[ChunkPoint] = POINTS,
) -> list[tuple[str, int]]:
    where = where or Where()
    kept = [
        p
        for p in points
        if may_see(access, DOCS[p.doc_id])
        and (not where.doc_ids or p.doc_id in where.doc_ids)
        and (not where.tags_any or set(p.tags) & set(where.tags_any))
        and (not where.classifications or p.classification in where.classifications)
        and (where.owner is None or p.owner == where.owner)
    ]
    kept.sort(key=lambda p: -float(np.dot(p.vector, query)))
    return [(p.doc_id, p.chunk) for p in kept[:k]]


def keys(hits: Sequence[Hit]) -> list[tuple[str, int]]:
    return [(hit.doc_id, hit.chunk) for hit in hits]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["embedded", "qdrant"])
async def empty(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    store: VectorStore
    if request.param == "embedded":
        store = await EdgeStore.open(tmp_path / "vectors", DIM)
    else:
        qdrant = QdrantStore(
            AsyncQdrantClient(location=":memory:"),
            collection="test",
            dimensions=DIM,
            where=":memory:",
        )
        await qdrant.prepare()
        store = qdrant
    yield store
    await store.close()


@pytest.fixture
async def store(empty: VectorStore) -> VectorStore:
    await empty.upsert(POINTS)
    return empty


# -- search -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_search_returns_the_nearest_chunks_best_first(store: VectorStore) -> None:
    for query in QUERIES:
        hits = await store.search(query, 10, EVERYONE)
        assert keys(hits) == exact(query, 10, EVERYONE)
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)
        by_key = {(p.doc_id, p.chunk): p for p in POINTS}
        for hit in hits:
            point = by_key[(hit.doc_id, hit.chunk)]
            assert hit.score == pytest.approx(float(np.dot(point.vector, query)), abs=1e-4)
            assert (hit.classification, hit.owner, hit.tags) == (
                point.classification,
                point.owner,
                point.tags,
            )


@pytest.mark.anyio
async def test_a_chunk_finds_itself_first(store: VectorStore) -> None:
    point = POINTS[123]
    hits = await store.search(point.vector, 1, EVERYONE)
    assert keys(hits) == [(point.doc_id, point.chunk)]
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)


@pytest.mark.anyio
@pytest.mark.parametrize("k", [1, 3, 10, 50])
async def test_k_is_honoured(store: VectorStore, k: int) -> None:
    hits = await store.search(QUERIES[0], k, EVERYONE)
    assert keys(hits) == exact(QUERIES[0], k, EVERYONE)
    assert len(hits) == k


SUBJECTS = {
    "public-only user": Access(classifications=("public",), subject="dave"),
    "internal user, hr denied": Access(
        classifications=("public", "internal"), subject="dave", denied_tags=("hr",)
    ),
    "secret admin": Access(classifications=CLASSIFICATIONS, subject="admin"),
    "owner of a denied-tag doc": Access(
        classifications=("public", "internal", "confidential"),
        subject="alice",
        denied_tags=("hr", "finance"),
    ),
    "two denied tags, other owner": Access(
        classifications=("public", "internal"), subject="bob", denied_tags=("legal", "finance")
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("who", list(SUBJECTS))
async def test_access_decides_what_each_subject_sees(store: VectorStore, who: str) -> None:
    access = SUBJECTS[who]
    visible = {doc.doc_id for doc in CORPUS if may_see(access, doc)}
    for query in QUERIES[:3]:
        hits = await store.search(query, 10, access)
        assert keys(hits) == exact(query, 10, access)
        assert {hit.doc_id for hit in hits} <= visible
    # Asked for everything: exactly the visible documents come back, all of their chunks.
    everything = await store.search(QUERIES[0], len(POINTS), access)
    assert {hit.doc_id for hit in everything} == visible
    assert len(everything) == sum(DOCS[doc_id].chunks for doc_id in visible)


@pytest.mark.anyio
async def test_owner_sees_own_tagged_doc_and_not_others(store: VectorStore) -> None:
    alice = SUBJECTS["owner of a denied-tag doc"]
    own = POINTS[[p.doc_id for p in POINTS].index("hr-alice")]
    hits = await store.search(own.vector, 5, alice)
    assert hits[0].doc_id == "hr-alice"
    # The nearest chunk of a doc alice may not see (hr, owned by bob) is not returned, even
    # when the query is that chunk itself; the next visible ones are.
    bobs = next(p for p in POINTS if p.doc_id == "hr-bob")
    hits = await store.search(bobs.vector, 10, alice)
    assert "hr-bob" not in {hit.doc_id for hit in hits}
    assert len(hits) == 10
    assert keys(hits) == exact(bobs.vector, 10, alice)
    fin = next(p for p in POINTS if p.doc_id == "fin-carol")
    assert "fin-carol" not in {hit.doc_id for hit in await store.search(fin.vector, 10, alice)}


@pytest.mark.anyio
async def test_no_classifications_sees_nothing(store: VectorStore) -> None:
    nobody = Access(classifications=(), subject="admin")
    assert await store.search(QUERIES[0], 10, nobody) == []
    assert await store.search(QUERIES[0], 10, nobody, Where(classifications=("public",))) == []


@pytest.mark.anyio
async def test_k_above_the_visible_set_gives_exactly_the_visible_chunks(
    store: VectorStore,
) -> None:
    access = Access(classifications=("secret",), subject="eve")
    hits = await store.search(QUERIES[1], 100, access)
    assert keys(hits) == exact(QUERIES[1], 100, access)
    assert len(hits) == DOCS["sec-admin"].chunks


WHERES = {
    "doc_ids": Where(doc_ids=("pub-a", "conf-c", "sec-admin")),
    "tags_any": Where(tags_any=("finance", "legal")),
    "classifications": Where(classifications=("internal", "secret")),
    "owner": Where(owner="bob"),
    "all four": Where(
        doc_ids=("hr-bob", "int-b", "fin-carol"),
        tags_any=("finance",),
        classifications=("internal",),
        owner="bob",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(WHERES))
async def test_where_narrows_the_search(store: VectorStore, name: str) -> None:
    where = WHERES[name]
    for access in (EVERYONE, SUBJECTS["internal user, hr denied"]):
        for query in QUERIES[:2]:
            hits = await store.search(query, 15, access, where)
            assert keys(hits) == exact(query, 15, access, where)
            assert all(where.admits(hit) for hit in hits)
    # With k past everything, the filter alone decides the set.
    everything = await store.search(QUERIES[0], len(POINTS), EVERYONE, where)
    assert keys(everything) == exact(QUERIES[0], len(POINTS), EVERYONE, where)


@pytest.mark.anyio
async def test_where_classifications_outside_access_see_nothing(store: VectorStore) -> None:
    public_only = SUBJECTS["public-only user"]
    assert await store.search(QUERIES[0], 10, public_only, Where(classifications=("secret",))) == []
    assert await store.search(QUERIES[0], 10, EVERYONE, Where(doc_ids=("no-such-doc",))) == []


# -- writes -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_count_and_document_ids(empty: VectorStore) -> None:
    assert await empty.count() == 0
    assert await empty.document_ids() == set()
    await empty.upsert(POINTS)
    assert await empty.count() == len(POINTS)
    assert await empty.document_ids() == set(DOCS)


@pytest.mark.anyio
async def test_delete_document_removes_all_its_chunks(store: VectorStore) -> None:
    await store.delete_document("hr-bob")
    assert await store.count() == len(POINTS) - DOCS["hr-bob"].chunks
    assert await store.document_ids() == set(DOCS) - {"hr-bob"}
    bobs = next(p for p in POINTS if p.doc_id == "hr-bob")
    hits = await store.search(bobs.vector, len(POINTS), EVERYONE)
    assert "hr-bob" not in {hit.doc_id for hit in hits}
    remaining = [p for p in POINTS if p.doc_id != "hr-bob"]
    assert keys(hits[:10]) == exact(bobs.vector, 10, EVERYONE, points=remaining)
    # Deleting what is not there is not an error and changes nothing.
    await store.delete_document("hr-bob")
    await store.delete_document("never-stored")
    assert await store.count() == len(remaining)


@pytest.mark.anyio
async def test_upserting_again_overwrites_the_same_points(store: VectorStore) -> None:
    await store.upsert(POINTS)
    assert await store.count() == len(POINTS)
    # Re-ingest under new metadata and new vectors: same ids, so the old payload is gone.
    moved = [
        ChunkPoint(
            doc_id=p.doc_id,
            chunk=p.chunk,
            vector=p.vector,
            classification="secret",
            owner="admin",
            tags=(),
            expires_at=None,
        )
        for p in POINTS
        if p.doc_id == "pub-a"
    ]
    await store.upsert(moved)
    assert await store.count() == len(POINTS)
    public = Access(classifications=("public",), subject="dave")
    hits = await store.search(moved[0].vector, len(POINTS), public)
    assert {hit.doc_id for hit in hits} == {"pub-c"}
    secret = await store.search(moved[0].vector, 1, Access(("secret",), "admin"))
    assert keys(secret) == [("pub-a", 0)]


@pytest.mark.anyio
async def test_expired_lists_documents_due_at_or_before_now(store: VectorStore) -> None:
    assert await store.expired(NOW - 11) == set()
    assert await store.expired(NOW - 10) == {"pub-c"}
    assert await store.expired(NOW) == {"pub-c", "hr-bob"}
    assert await store.expired(NOW + 10**6) == {"pub-c", "hr-bob", "fin-carol"}
    await store.delete_document("pub-c")
    assert await store.expired(NOW) == {"hr-bob"}


@pytest.mark.anyio
async def test_concurrent_searches_during_writes(store: VectorStore) -> None:
    access = SUBJECTS["internal user, hr denied"]
    expected = exact(QUERIES[2], 10, access)
    results: list[list[Hit]] = []

    async def search() -> None:
        results.append(await store.search(QUERIES[2], 10, access))

    async with anyio.create_task_group() as group:
        group.start_soon(store.upsert, POINTS[:50])
        for _ in range(20):
            group.start_soon(search)
        group.start_soon(store.delete_document, "sec-admin")
    assert all(keys(hits) == expected for hits in results)
    assert len(results) == 20
    assert await store.count() == len(POINTS) - DOCS["sec-admin"].chunks


@pytest.mark.anyio
async def test_ready_reports_the_chunk_count(store: VectorStore) -> None:
    ok, detail = await store.ready()
    assert ok
    assert f"{len(POINTS)} chunks" in detail


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_bad_vectors_and_k_are_refused_naming_the_field(empty: VectorStore) -> None:
    good = POINTS[0]
    short = ChunkPoint("d", 0, good.vector[:10], "public", "alice", (), None)
    with pytest.raises(ValueError, match=r"points\[1\]\.vector: expected shape \(64,\)"):
        await empty.upsert([good, short])
    loose = ChunkPoint("d", 0, good.vector * 2, "public", "alice", (), None)
    with pytest.raises(ValueError, match=r"points\[0\]\.vector: expected an L2-normalised"):
        await empty.upsert([loose])
    assert await empty.count() == 0  # nothing of a refused batch is written
    with pytest.raises(ValueError, match=r"^vector: expected an L2-normalised"):
        await empty.search(np.full(DIM, np.nan, dtype=np.float32), 3, EVERYONE)
    with pytest.raises(ValueError, match=r"^k: expected an integer >= 1"):
        await empty.search(good.vector, 0, EVERYONE)


def test_bad_payloads_and_filters_are_refused_naming_the_field() -> None:
    vector = POINTS[0].vector
    with pytest.raises(ValueError, match=r"^classification: unknown classification 'top'"):
        ChunkPoint("d", 0, vector, "top", "alice", (), None)
    with pytest.raises(ValueError, match=r"^chunk: expected an integer >= 0"):
        ChunkPoint("d", -1, vector, "public", "alice", (), None)
    with pytest.raises(ValueError, match=r"^tags: expected a sequence of strings"):
        ChunkPoint("d", 0, vector, "public", "alice", "hr", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^expires_at: expected unix seconds"):
        ChunkPoint("d", 0, vector, "public", "alice", (), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^access\.classifications: expected a sequence"):
        Access(classifications="public", subject="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^access\.classifications: unknown classification"):
        Access(classifications=("public", "restricted"), subject="a")
    with pytest.raises(ValueError, match=r"^access\.subject: expected a non-empty string"):
        Access(classifications=("public",), subject="")
    with pytest.raises(ValueError, match=r"^where\.owner: expected a non-empty string"):
        Where(owner="")
    with pytest.raises(ValueError, match=r"^where\.tags_any: expected non-empty strings"):
        Where(tags_any=("",))


# -- defence in depth ---------------------------------------------------------------------


def test_a_hit_outside_access_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    access = Access(classifications=("public",), subject="dave", denied_tags=("hr",))
    seen = {"doc_id": "a", "chunk": 0, "classification": "public", "owner": "x", "tags": []}
    secret = {**seen, "doc_id": "b", "classification": "secret"}
    tagged = {**seen, "doc_id": "c", "tags": ["hr"]}
    broken = {"doc_id": "d"}
    with caplog.at_level(logging.ERROR, logger="sovereign_gateway.memory"):
        hits = checked_hits(
            [(0.9, seen), (0.8, secret), (0.7, tagged), (0.6, broken), (0.5, None)], access, None
        )
    assert keys(hits) == [("a", 0)]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    assert "b#0" in errors[0]
    assert "c#0" in errors[1]
    outside_where = checked_hits([(0.9, seen)], access, Where(owner="someone-else"))
    assert outside_where == []


def test_point_ids_are_stable_uuids_per_chunk() -> None:
    assert point_id("a" * 64, 0) == point_id("a" * 64, 0)
    ids = {point_id(doc, chunk) for doc in ("a" * 64, "b" * 64) for chunk in range(100)}
    assert len(ids) == 200
    assert point_id("ab", 1) != point_id("a", 21)  # no ambiguity between doc_id and chunk


# -- the embedded engine on disk ----------------------------------------------------------


@pytest.mark.anyio
async def test_embedded_store_reopens_with_its_points(tmp_path: Path) -> None:
    first = await EdgeStore.open(tmp_path / "vectors", DIM)
    await first.upsert(POINTS)
    await first.delete_document("conf-c")
    await first.close()
    assert (await first.ready())[0] is False
    again = await EdgeStore.open(tmp_path / "vectors", DIM)
    try:
        assert await again.count() == len(POINTS) - DOCS["conf-c"].chunks
        hits = await again.search(QUERIES[0], 10, EVERYONE)
        remaining = [p for p in POINTS if p.doc_id != "conf-c"]
        assert keys(hits) == exact(QUERIES[0], 10, EVERYONE, points=remaining)
    finally:
        await again.close()
    with pytest.raises(StoreUnavailable, match="expected vector size 32, but got 64"):
        await EdgeStore.open(tmp_path / "vectors", 32)


CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import anyio
    from test_store import POINTS, DIM
    from sovereign_gateway.memory.store import EdgeStore


    async def main() -> None:
        store = await EdgeStore.open(Path(sys.argv[1]), DIM)
        await store.upsert(POINTS)
        await store.delete_document("sec-admin")
        print("written", flush=True)
        sys.stdin.read()  # killed here, never closed


    anyio.run(main)
    """
)


def test_embedded_writes_survive_sigkill_right_after_they_return(tmp_path: Path) -> None:
    """A writer killed right after upsert and delete returned: a reopen sees both."""
    script = tmp_path / "writer.py"
    script.write_text(CRASHING_WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    with subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "vectors")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as writer:
        assert writer.stdout is not None
        line = writer.stdout.readline()
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert line == "written\n"
    assert writer.returncode == -signal.SIGKILL

    async def reopen() -> tuple[int, set[str], list[Hit]]:
        store = await EdgeStore.open(tmp_path / "vectors", DIM)
        try:
            return (
                await store.count(),
                await store.document_ids(),
                await store.search(QUERIES[0], 5, EVERYONE),
            )
        finally:
            await store.close()

    count, doc_ids, hits = anyio.run(reopen)
    remaining = [p for p in POINTS if p.doc_id != "sec-admin"]
    assert count == len(remaining)
    assert doc_ids == set(DOCS) - {"sec-admin"}
    assert keys(hits) == exact(QUERIES[0], 5, EVERYONE, points=remaining)


@pytest.mark.anyio
async def test_embedded_store_in_a_file_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "vectors"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match=str(blocker)):
        await open_store("embedded", path=blocker, dimensions=DIM)


# -- the Qdrant engine's connection -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.anyio
async def test_unreachable_qdrant_is_unavailable_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailable, match=f"^{url}: opening collection sovereign-memory"):
        await open_store("qdrant", path=tmp_path, dimensions=DIM, qdrant_url=url)
    with pytest.raises(StoreUnavailable, match="qdrant_url: required"):
        await open_store("qdrant", path=tmp_path, dimensions=DIM)


@pytest.mark.anyio
async def test_qdrant_collection_with_other_dimensions_is_refused() -> None:
    client = AsyncQdrantClient(location=":memory:")
    try:
        await QdrantStore(client, collection="c", dimensions=DIM, where=":memory:").prepare()
        other = QdrantStore(client, collection="c", dimensions=32, where=":memory:")
        with pytest.raises(StoreUnavailable, match="expected 32 dimensions, cosine"):
            await other.prepare()
    finally:
        await client.close()
