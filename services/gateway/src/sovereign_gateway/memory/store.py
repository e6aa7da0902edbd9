"""The vector store: chunk vectors and their access payload, searched under the caller's access.

Takes `ChunkPoint`s (a chunk's L2-normalised vector and its doc_id, chunk number,
classification, owner, tags and expiry; never its text) and queries with an `Access` (what
the policy lets the caller see) and an optional `Where` (the caller's own filters). Gives
`Hit`s, best first. Two engines behind one `VectorStore` interface:

- `EdgeStore` ("embedded"): a Qdrant Edge shard in a directory, in this process.
- `QdrantStore` ("qdrant"): a collection on a Qdrant server.

Access is enforced inside the index (the filter is part of the search, so k visible hits
come back when k exist), then every hit is checked again here; a hit that fails the check is
dropped and logged as an error. An empty `Access.classifications` sees nothing.
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import anyio
import anyio.to_thread
import httpx
import numpy as np
import numpy.typing as npt
import qdrant_edge as edge
from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ApiException

from sovereign_gateway.contract import CLASSIFICATIONS
from sovereign_gateway.contract import VectorStore as VectorStoreKind
from sovereign_gateway.memory.errors import StoreUnavailable

log = logging.getLogger("sovereign_gateway.memory")


# HNSW settings for both engines, chosen with bench/memory_query.py (docs/benchmarks.md):
# recall@10 >= 0.95 against exact search at 100k chunks, with and without an access filter.
HNSW_M: Final = 16
HNSW_EF_CONSTRUCT: Final = 100
HNSW_EF: Final = 128
# Every filtered search also walks the graph through points the filter rejects (ACORN):
# without it recall@10 at 100k falls to 0.4-0.7 when a quarter of the chunks are visible,
# and to 0.96 with three quarters (Qdrant's default uses ACORN below 0.4 only).
ACORN_MAX_SELECTIVITY: Final = 1.0
# Below this many KB of matching vectors a filtered search scans them instead of walking
# the graph (Qdrant's default); exact and cheap at that size.
FULL_SCAN_THRESHOLD_KB: Final = 10_000
# A vector's norm may be this far from 1 (float32 rounding of a normalised embedding).
NORM_TOLERANCE: Final = 1e-3

_POINT_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "sovereign-memory/chunk")
_KEYWORD_FIELDS: Final = ("doc_id", "classification", "owner", "tags")
_EDGE_CONFIG_FILE: Final = "edge_config.json"
_LOCAL_INDEX_WARNING: Final = "Payload indexes have no effect in the local Qdrant"


def _strings(name: str, value: object) -> tuple[str, ...]:
    """`value` as a tuple of non-empty strings; a bare string is refused (it is not a list)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a sequence of strings, got {value!r}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{name}: expected non-empty strings, got {item!r}")
    return items


def _classifications(name: str, value: object) -> tuple[str, ...]:
    items = _strings(name, value)
    for item in items:
        if item not in CLASSIFICATIONS:
            raise ValueError(f"{name}: unknown classification {item!r}")
    return items


@dataclass(frozen=True)
class ChunkPoint:
    """One chunk's vector (float32, L2-normalised) and the payload searches filter on."""

    doc_id: str
    chunk: int
    vector: npt.NDArray[np.float32]
    classification: str
    owner: str
    tags: tuple[str, ...]
    expires_at: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.doc_id, str) or not self.doc_id:
            raise ValueError(f"doc_id: expected a non-empty string, got {self.doc_id!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"chunk: expected an integer >= 0, got {self.chunk!r}")
        _classifications("classification", (self.classification,))
        if not isinstance(self.owner, str) or not self.owner:
            raise ValueError(f"owner: expected a non-empty string, got {self.owner!r}")
        object.__setattr__(self, "tags", _strings("tags", self.tags))
        if self.expires_at is not None and (
            isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int)
        ):
            raise ValueError(f"expires_at: expected unix seconds or None, got {self.expires_at!r}")


@dataclass(frozen=True)
class Access:
    """What the caller may see, from the policy decision: a chunk is visible iff its
    classification is in `classifications` AND (its owner == subject OR it carries none of
    `denied_tags`)."""

    classifications: tuple[str, ...]
    subject: str
    denied_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "classifications",
            _classifications("access.classifications", self.classifications),
        )
        if not isinstance(self.subject, str) or not self.subject:
            raise ValueError(f"access.subject: expected a non-empty string, got {self.subject!r}")
        object.__setattr__(self, "denied_tags", _strings("access.denied_tags", self.denied_tags))

    def sees(self, classification: str, owner: str, tags: Sequence[str]) -> bool:
        if classification not in self.classifications:
            return False
        return owner == self.subject or not set(tags) & set(self.denied_tags)


@dataclass(frozen=True)
class Where:
    """The caller's own filters (all optional, ANDed)."""

    doc_ids: tuple[str, ...] = ()
    tags_any: tuple[str, ...] = ()
    classifications: tuple[str, ...] = ()
    owner: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_ids", _strings("where.doc_ids", self.doc_ids))
        object.__setattr__(self, "tags_any", _strings("where.tags_any", self.tags_any))
        object.__setattr__(
            self,
            "classifications",
            _classifications("where.classifications", self.classifications),
        )
        if self.owner is not None and (not isinstance(self.owner, str) or not self.owner):
            raise ValueError(f"where.owner: expected a non-empty string, got {self.owner!r}")

    def admits(self, hit: Hit) -> bool:
        return (
            (not self.doc_ids or hit.doc_id in self.doc_ids)
            and (not self.tags_any or bool(set(hit.tags) & set(self.tags_any)))
            and (not self.classifications or hit.classification in self.classifications)
            and (self.owner is None or hit.owner == self.owner)
        )


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk: int
    score: float
    classification: str
    owner: str
    tags: tuple[str, ...]


class VectorStore(Protocol):
    kind: str  # "embedded" | "qdrant"

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        """Insert or overwrite (same doc_id and chunk) points; durable when it returns."""
        ...

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        k: int,
        access: Access,
        where: Where | None = None,
    ) -> list[Hit]:
        """The at most k nearest chunks `access` (and `where`) admit, best first."""
        ...

    async def delete_document(self, doc_id: str) -> None: ...

    async def document_ids(self) -> set[str]:
        """Every doc_id with at least one point."""
        ...

    async def expired(self, now: int) -> set[str]:
        """The doc_ids with a point whose expires_at <= now."""
        ...

    async def count(self) -> int: ...

    async def ready(self) -> tuple[bool, str]: ...

    async def close(self) -> None: ...


def point_id(doc_id: str, chunk: int) -> str:
    """The point's id: a UUID fixed by (doc_id, chunk), so re-ingesting overwrites."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{doc_id}\x00{chunk}"))


async def open_store(
    kind: VectorStoreKind,
    *,
    path: Path,
    dimensions: int,
    qdrant_url: str | None = None,
    collection: str = "sovereign-memory",
) -> VectorStore:
    """The store the settings name, opened and ready; `StoreUnavailable` if it cannot be."""
    if kind == "embedded":
        return await EdgeStore.open(path, dimensions)
    if kind == "qdrant":
        if not qdrant_url:
            raise StoreUnavailable("qdrant_url: required when the vector store is qdrant")
        return await QdrantStore.connect(qdrant_url, collection=collection, dimensions=dimensions)
    raise StoreUnavailable(f"vector_store: unknown kind {kind!r} (embedded or qdrant)")


# -- what both engines share --------------------------------------------------------------


@dataclass(frozen=True)
class _AnyOf:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class _Is:
    key: str
    value: str


@dataclass(frozen=True)
class _OwnerOrNoneOf:
    """owner == `owner`, or `tags` holds none of `denied`."""

    owner: str
    denied: tuple[str, ...]


_Condition: TypeAlias = _AnyOf | _Is | _OwnerOrNoneOf


def _conditions(access: Access, where: Where | None) -> list[_Condition] | None:
    """The search filter as conditions to AND, one plan for both engines; None when the
    caller can see nothing at all (then no search is made)."""
    where = where or Where()
    allowed = access.classifications
    if where.classifications:
        allowed = tuple(c for c in allowed if c in where.classifications)
    if not allowed:
        return None
    conditions: list[_Condition] = [_AnyOf("classification", allowed)]
    if access.denied_tags:
        conditions.append(_OwnerOrNoneOf(access.subject, access.denied_tags))
    if where.doc_ids:
        conditions.append(_AnyOf("doc_id", where.doc_ids))
    if where.tags_any:
        conditions.append(_AnyOf("tags", where.tags_any))
    if where.owner is not None:
        conditions.append(_Is("owner", where.owner))
    return conditions


def _payload(point: ChunkPoint) -> dict[str, Any]:
    return {
        "doc_id": point.doc_id,
        "chunk": point.chunk,
        "classification": point.classification,
        "owner": point.owner,
        "tags": list(point.tags),
        "expires_at": point.expires_at,
    }


def _checked_vector(vector: object, dimensions: int, name: str) -> list[float]:
    array = np.asarray(vector, dtype=np.float32)
    if array.shape != (dimensions,):
        raise ValueError(f"{name}: expected shape ({dimensions},), got {array.shape}")
    norm = float(np.linalg.norm(array))
    if not math.isfinite(norm) or abs(norm - 1.0) > NORM_TOLERANCE:
        raise ValueError(f"{name}: expected an L2-normalised vector, its norm is {norm:.6f}")
    values: list[float] = array.tolist()
    return values


def _checked_points(points: Sequence[ChunkPoint], dimensions: int) -> list[list[float]]:
    return [
        _checked_vector(point.vector, dimensions, f"points[{index}].vector")
        for index, point in enumerate(points)
    ]


def _checked_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")


def checked_hits(
    scored: Sequence[tuple[float, dict[str, Any] | None]], access: Access, where: Where | None
) -> list[Hit]:
    """Hits from (score, payload) pairs, each checked again against `access` and `where`."""
    hits = []
    for score, payload in scored:
        try:
            if payload is None:
                raise KeyError("payload")
            hit = Hit(
                doc_id=str(payload["doc_id"]),
                chunk=int(payload["chunk"]),
                score=float(score),
                classification=str(payload["classification"]),
                owner=str(payload["owner"]),
                tags=tuple(str(tag) for tag in payload["tags"]),
            )
        except (KeyError, TypeError, ValueError):
            log.error("vector store returned a point without a valid payload: %r; dropped", payload)
            continue
        if not access.sees(hit.classification, hit.owner, hit.tags) or (
            where is not None and not where.admits(hit)
        ):
            # The index filter should have excluded it: a bug in the filter or the engine.
            log.error(
                "vector store returned a chunk outside the caller's filter: %s#%d "
                "(classification %s, owner %s, tags %s) for %s; dropped",
                hit.doc_id,
                hit.chunk,
                hit.classification,
                hit.owner,
                list(hit.tags),
                access.subject,
            )
            continue
        hits.append(hit)
    return hits


# -- embedded: Qdrant Edge ----------------------------------------------------------------


def _edge_condition(condition: _Condition) -> edge.FieldCondition | edge.Filter:
    if isinstance(condition, _AnyOf):
        return edge.FieldCondition(condition.key, match=edge.MatchAny(list(condition.values)))
    if isinstance(condition, _Is):
        return edge.FieldCondition(condition.key, match=edge.MatchValue(condition.value))
    return edge.Filter(
        should=[
            edge.FieldCondition("owner", match=edge.MatchValue(condition.owner)),
            edge.Filter(
                must_not=[edge.FieldCondition("tags", match=edge.MatchAny(list(condition.denied)))]
            ),
        ]
    )


# Callers ask with the same few Access values over and over; the filter is built once.
@functools.lru_cache(maxsize=1024)
def edge_filter(access: Access, where: Where | None = None) -> edge.Filter | None:
    """The Qdrant Edge filter for `access` and `where`; None when nothing is visible."""
    conditions = _conditions(access, where)
    if conditions is None:
        return None
    return edge.Filter(must=[_edge_condition(condition) for condition in conditions])


EDGE_SEARCH_PARAMS: Final = edge.SearchParams(
    hnsw_ef=HNSW_EF,
    acorn=edge.AcornSearchParams(enable=True, max_selectivity=ACORN_MAX_SELECTIVITY),
)


def _edge_config(dimensions: int) -> edge.EdgeConfig:
    return edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(size=dimensions, distance=edge.Distance.Cosine),
        hnsw_config=edge.HnswIndexConfig(
            m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=FULL_SCAN_THRESHOLD_KB
        ),
    )


class EdgeStore:
    """A Qdrant Edge shard (qdrant-edge-py) in `path`, created on first open.

    The shard is synchronous. Searches run on worker threads (the engine releases the GIL
    while it searches); writes run on a worker thread one at a time, and each is flushed to
    disk before it returns. An update alone is in the shard's WAL, which is an mmap that
    survives the process being killed but is not synced, so without the flush a power
    loss could lose it. After each write the shard's optimizer runs (it builds the HNSW
    graph once enough points are unindexed, and vacuums deletions); qdrant-edge-py 0.9.0
    holds the GIL while it optimizes, so a write that triggers a build stalls the event
    loop for as long as the build takes (seconds per ten thousand points).
    """

    kind = "embedded"

    def __init__(self, shard: edge.EdgeShard, path: Path, dimensions: int) -> None:
        self.shard = shard  # public for bench/memory_query.py, which also queries it raw
        self.path = path
        self.dimensions = dimensions
        self._writing = anyio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: Path, dimensions: int) -> EdgeStore:
        if dimensions < 1:
            raise StoreUnavailable(f"dimensions: expected >= 1, got {dimensions}")
        try:
            shard = await anyio.to_thread.run_sync(cls._open_shard, path, dimensions)
        except Exception as exc:
            raise StoreUnavailable(
                f"{path}: cannot open the embedded vector store: {exc}"
            ) from None
        return cls(shard, path, dimensions)

    @staticmethod
    def _open_shard(path: Path, dimensions: int) -> edge.EdgeShard:
        config = _edge_config(dimensions)
        if (path / _EDGE_CONFIG_FILE).exists():
            # With a config, load checks it against the stored segments (dimensions).
            shard = edge.EdgeShard.load(str(path), config)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            shard = edge.EdgeShard.create(str(path), config)
        try:
            # Indexes before the first point: every filter is planned on them from the start,
            # and facets (document_ids, expired) need the doc_id one.
            indexed = shard.info().payload_schema
            for name in _KEYWORD_FIELDS:
                if name not in indexed:
                    shard.update(
                        edge.UpdateOperation.create_field_index(
                            name, edge.PayloadSchemaType.Keyword
                        )
                    )
            if "expires_at" not in indexed:
                shard.update(
                    edge.UpdateOperation.create_field_index(
                        "expires_at", edge.IntegerIndexParams(lookup=False, range=True)
                    )
                )
            shard.flush()
        except BaseException:
            shard.close()
            raise
        return shard

    def _usable(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self.path}: the embedded vector store is closed")

    def _unavailable(self, action: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"{self.path}: {action} failed in the embedded vector store: {exc}")

    async def _write(self, operation: edge.UpdateOperation, action: str) -> None:
        def apply() -> None:
            self.shard.update(operation)
            self.shard.flush()
            self.shard.optimize()

        async with self._writing:
            self._usable()
            try:
                await anyio.to_thread.run_sync(apply)
            except Exception as exc:
                raise self._unavailable(action, exc) from None

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        vectors = _checked_points(points, self.dimensions)
        if not points:
            return
        operation = edge.UpdateOperation.upsert_points(
            [
                edge.Point(point_id(point.doc_id, point.chunk), vector, _payload(point))
                for point, vector in zip(points, vectors, strict=True)
            ]
        )
        await self._write(operation, "upsert")

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        k: int,
        access: Access,
        where: Where | None = None,
    ) -> list[Hit]:
        _checked_k(k)
        query = _checked_vector(vector, self.dimensions, "vector")
        found = edge_filter(access, where)
        if found is None:
            return []
        self._usable()
        request = edge.QueryRequest(
            limit=k,
            query=edge.Query.Nearest(query),
            filter=found,
            with_payload=True,
            params=EDGE_SEARCH_PARAMS,
        )
        try:
            scored = await anyio.to_thread.run_sync(self.shard.query, request)
        except Exception as exc:
            raise self._unavailable("search", exc) from None
        return checked_hits([(point.score, point.payload) for point in scored], access, where)

    async def delete_document(self, doc_id: str) -> None:
        _strings("doc_id", (doc_id,))
        by_doc = edge.Filter(must=[edge.FieldCondition("doc_id", match=edge.MatchValue(doc_id))])
        await self._write(edge.UpdateOperation.delete_points_by_filter(by_doc), "delete")

    async def _doc_ids(self, only: edge.Filter | None) -> set[str]:
        self._usable()

        def facet() -> set[str]:
            # A facet lists each doc_id once; its limit must cover every distinct one.
            limit = self.shard.count(edge.CountRequest(exact=True))
            if limit == 0:
                return set()
            request = edge.FacetRequest("doc_id", limit=limit, exact=True, filter=only)
            # An exact facet still lists a deleted document's doc_id, with count 0.
            return {str(hit.value) for hit in self.shard.facet(request).hits if hit.count > 0}

        try:
            return await anyio.to_thread.run_sync(facet)
        except Exception as exc:
            raise self._unavailable("listing documents", exc) from None

    async def document_ids(self) -> set[str]:
        return await self._doc_ids(None)

    async def expired(self, now: int) -> set[str]:
        due = edge.Filter(must=[edge.FieldCondition("expires_at", range=edge.RangeFloat(lte=now))])
        return await self._doc_ids(due)

    async def count(self) -> int:
        self._usable()
        try:
            return await anyio.to_thread.run_sync(self.shard.count, edge.CountRequest(exact=True))
        except Exception as exc:
            raise self._unavailable("count", exc) from None

    async def ready(self) -> tuple[bool, str]:
        try:
            points = await self.count()
        except StoreUnavailable as exc:
            return False, str(exc)
        return True, f"embedded vector store {self.path}: {points} chunks"

    async def close(self) -> None:
        async with self._writing:
            if self._closed:
                return
            self._closed = True
            try:
                await anyio.to_thread.run_sync(self.shard.close)
            except Exception as exc:
                raise self._unavailable("close", exc) from None


# -- Qdrant server ------------------------------------------------------------------------


def _qdrant_condition(condition: _Condition) -> qm.FieldCondition | qm.Filter:
    if isinstance(condition, _AnyOf):
        return qm.FieldCondition(key=condition.key, match=qm.MatchAny(any=list(condition.values)))
    if isinstance(condition, _Is):
        return qm.FieldCondition(key=condition.key, match=qm.MatchValue(value=condition.value))
    return qm.Filter(
        should=[
            qm.FieldCondition(key="owner", match=qm.MatchValue(value=condition.owner)),
            qm.Filter(
                must_not=[
                    qm.FieldCondition(key="tags", match=qm.MatchAny(any=list(condition.denied)))
                ]
            ),
        ]
    )


# Callers ask with the same few Access values over and over; the filter is built once.
@functools.lru_cache(maxsize=1024)
def qdrant_filter(access: Access, where: Where | None = None) -> qm.Filter | None:
    """The qdrant-client filter for `access` and `where`; None when nothing is visible."""
    conditions = _conditions(access, where)
    if conditions is None:
        return None
    return qm.Filter(must=[_qdrant_condition(condition) for condition in conditions])


# What a client call raises when the server is unreachable or refuses the request.
_QDRANT_FAILURES = (ApiException, httpx.HTTPError, OSError, ValueError)


class QdrantStore:
    """A collection on a Qdrant server through qdrant-client's `AsyncQdrantClient`.

    `connect` makes the client for a URL; the constructor takes a ready client, which is
    how the tests run it: qdrant-client's local mode (`location=":memory:"`) runs the same
    client API in-process, because a Qdrant server binary cannot be had on the machines the
    tests run on. Local mode searches by brute force and ignores payload indexes, so it
    checks the semantics here, not the server's HNSW. Writes wait until the server has
    applied them; their durability is the server's (its WAL settings).
    """

    kind = "qdrant"

    def __init__(
        self, client: AsyncQdrantClient, *, collection: str, dimensions: int, where: str
    ) -> None:
        self.client = client
        self.collection = collection
        self.dimensions = dimensions
        self.where = where  # the URL, or what the client is, for messages
        options = client.init_options
        # Local mode searches exactly and warns about any search params it is given.
        self.local = options.get("location") == ":memory:" or options.get("path") is not None
        self.search_params = qm.SearchParams(
            hnsw_ef=HNSW_EF,
            acorn=qm.AcornSearchParams(enable=True, max_selectivity=ACORN_MAX_SELECTIVITY),
        )

    @classmethod
    async def connect(cls, url: str, *, collection: str, dimensions: int) -> QdrantStore:
        # The compatibility check runs in a thread of its own and only warns; `prepare`
        # asks the server anyway.
        client = AsyncQdrantClient(url=url, timeout=10, check_compatibility=False)
        store = cls(client, collection=collection, dimensions=dimensions, where=url)
        try:
            await store.prepare()
        except BaseException:
            await client.close()
            raise
        return store

    def _unavailable(self, action: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"{self.where}: {action} failed on Qdrant: {exc}")

    async def prepare(self) -> None:
        """Create the collection and its payload indexes if missing; check its vectors."""
        if self.dimensions < 1:
            raise StoreUnavailable(f"dimensions: expected >= 1, got {self.dimensions}")
        try:
            if await self.client.collection_exists(self.collection):
                info = await self.client.get_collection(self.collection)
                params = info.config.params.vectors
                if not isinstance(params, qm.VectorParams) or (
                    params.size,
                    params.distance,
                ) != (self.dimensions, qm.Distance.COSINE):
                    raise StoreUnavailable(
                        f"{self.where}: collection {self.collection} has vectors {params}, "
                        f"expected {self.dimensions} dimensions, cosine distance"
                    )
                indexed = set(info.payload_schema)
            else:
                await self.client.create_collection(
                    self.collection,
                    vectors_config=qm.VectorParams(
                        size=self.dimensions, distance=qm.Distance.COSINE
                    ),
                    hnsw_config=qm.HnswConfigDiff(
                        m=HNSW_M,
                        ef_construct=HNSW_EF_CONSTRUCT,
                        full_scan_threshold=FULL_SCAN_THRESHOLD_KB,
                    ),
                )
                indexed = set()
            with warnings.catch_warnings():
                # Local mode (the tests) warns that it has no payload indexes; a server has.
                warnings.filterwarnings("ignore", _LOCAL_INDEX_WARNING, UserWarning)
                for name in _KEYWORD_FIELDS:
                    if name not in indexed:
                        await self.client.create_payload_index(
                            self.collection, name, qm.PayloadSchemaType.KEYWORD, wait=True
                        )
                if "expires_at" not in indexed:
                    await self.client.create_payload_index(
                        self.collection,
                        "expires_at",
                        qm.IntegerIndexParams(
                            type=qm.IntegerIndexType.INTEGER, lookup=False, range=True
                        ),
                        wait=True,
                    )
        except _QDRANT_FAILURES as exc:
            raise self._unavailable(f"opening collection {self.collection}", exc) from None

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        vectors = _checked_points(points, self.dimensions)
        if not points:
            return
        structs = [
            qm.PointStruct(
                id=point_id(point.doc_id, point.chunk), vector=vector, payload=_payload(point)
            )
            for point, vector in zip(points, vectors, strict=True)
        ]
        try:
            await self.client.upsert(self.collection, points=structs, wait=True)
        except _QDRANT_FAILURES as exc:
            raise self._unavailable("upsert", exc) from None

    async def search(
        self,
        vector: npt.NDArray[np.float32],
        k: int,
        access: Access,
        where: Where | None = None,
    ) -> list[Hit]:
        _checked_k(k)
        query = _checked_vector(vector, self.dimensions, "vector")
        found = qdrant_filter(access, where)
        if found is None:
            return []
        try:
            response = await self.client.query_points(
                self.collection,
                query=query,
                query_filter=found,
                limit=k,
                with_payload=True,
                search_params=None if self.local else self.search_params,
            )
        except _QDRANT_FAILURES as exc:
            raise self._unavailable("search", exc) from None
        return checked_hits(
            [(point.score, point.payload) for point in response.points], access, where
        )

    async def delete_document(self, doc_id: str) -> None:
        _strings("doc_id", (doc_id,))
        by_doc = qm.Filter(
            must=[qm.FieldCondition(key="doc_id", match=qm.MatchValue(value=doc_id))]
        )
        try:
            await self.client.delete(
                self.collection, points_selector=qm.FilterSelector(filter=by_doc), wait=True
            )
        except _QDRANT_FAILURES as exc:
            raise self._unavailable("delete", exc) from None

    async def _doc_ids(self, only: qm.Filter | None) -> set[str]:
        try:
            # A facet lists each doc_id once; its limit must cover every distinct one.
            limit = (await self.client.count(self.collection, exact=True)).count
            if limit == 0:
                return set()
            facet = await self.client.facet(
                self.collection, "doc_id", facet_filter=only, limit=limit, exact=True
            )
        except _QDRANT_FAILURES as exc:
            raise self._unavailable("listing documents", exc) from None
        return {str(hit.value) for hit in facet.hits if hit.count > 0}

    async def document_ids(self) -> set[str]:
        return await self._doc_ids(None)

    async def expired(self, now: int) -> set[str]:
        due = qm.Filter(must=[qm.FieldCondition(key="expires_at", range=qm.Range(lte=now))])
        return await self._doc_ids(due)

    async def count(self) -> int:
        try:
            return (await self.client.count(self.collection, exact=True)).count
        except _QDRANT_FAILURES as exc:
            raise self._unavailable("count", exc) from None

    async def ready(self) -> tuple[bool, str]:
        try:
            points = await self.count()
        except StoreUnavailable as exc:
            return False, str(exc)
        return True, f"Qdrant {self.where}, collection {self.collection}: {points} chunks"

    async def close(self) -> None:
        await self.client.close()
