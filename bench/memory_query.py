"""Vector search for the memory layer: query latency and recall@10 of the embedded engines.

Goal (issue 5): p99 <= 10 ms at 100k chunks with recall@10 >= 0.95 against exact search.

Data: 384-dim unit vectors shaped like sentence embeddings rather than uniform noise (on
which HNSW does worst): 50 topics, 20 sub-topics each (1,000 centres, each its topic plus
0.6 of a random direction), and documents of 20 chunks drawn around one centre with
gaussian noise (sigma 0.05 per dimension), normalised. A chunk's nearest neighbour then has
cosine ~0.58 and two random chunks ~0.0, as with MiniLM. 1,000 queries are drawn the same
way. Each document has a classification (uniform over the four), one of 20 owners, and
half carry the tag "hr". Exact top-10 is numpy's dot product over the chunks the filter
admits.

Engines, on the same data in the same run:
- `edge store`: `EdgeStore.search` as the gateway calls it (asyncio, a worker thread per
  search, payload returned and re-checked), built through `EdgeStore.upsert` in batches
  (each flushed and optimized, as ingest does).
- `edge raw`: the same shard's `EdgeShard.query`, no thread hop or payload; and with
  `--raw-ef` other hnsw_ef values; `edge raw, no ACORN` shows why the store enables it.
- `usearch`: `usearch.index.Index` (cos, f32, connectivity 16, expansion 128). It has no
  payload filter: filtered searches over-fetch (k / visible share x 2) and drop what is not
  visible, which is not guaranteed to give k hits ("short" counts those that did not).
- `qdrant local`: `QdrantStore` on qdrant-client's local mode, at 10k only: it searches by
  brute force in numpy and evaluates filters in Python per point.
- `numpy exact`: brute force, one query at a time, as a reference.

Filters: `none` (everything visible); `75 %` (Access: all but secret); `access 26 %`
(Access: public and internal, subject u3, denied tag hr: the query shape a user has).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import qdrant_edge as edge
from gateway_overhead import grid, machine, machine_busy, wait_for_quiet
from qdrant_client import AsyncQdrantClient
from sovereign_gateway.memory import store as memory_store
from sovereign_gateway.memory.store import (
    CLASSIFICATIONS,
    Access,
    ChunkPoint,
    EdgeStore,
    QdrantStore,
    edge_filter,
    point_id,
)
from usearch.index import Index

DIM = 384
K = 10
TOPICS, SUBTOPICS = 50, 20
CHUNKS_PER_DOC = 20
NOISE = 0.05
OWNERS = 20
GOAL_SIZE = 100_000
GOAL_P99_MS = 10.0
GOAL_RECALL = 0.95
LOCAL_MAX_SIZE = 10_000
LOCAL_QUERIES = 30
EXACT_QUERIES = 200
WARMUP = 50
FILTERS = {
    "none": Access(classifications=CLASSIFICATIONS, subject="u0"),
    "75 %": Access(classifications=("public", "internal", "confidential"), subject="u0"),
    "access 26 %": Access(
        classifications=("public", "internal"), subject="u3", denied_tags=("hr",)
    ),
}
Vectors = npt.NDArray[np.float32]


def unit(rows: npt.NDArray[np.floating]) -> Vectors:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Data:
    vectors: Vectors
    queries: Vectors
    doc: npt.NDArray[np.int64]  # the document of each chunk
    classification: npt.NDArray[np.int64]  # per document, index into CLASSIFICATIONS
    owner: npt.NDArray[np.int64]  # per document
    tagged: npt.NDArray[np.bool_]  # per document: carries "hr"

    def visible(self, access: Access) -> npt.NDArray[np.bool_]:
        allowed = np.isin(
            self.classification, [CLASSIFICATIONS.index(c) for c in access.classifications]
        )
        owned = self.owner == int(access.subject.removeprefix("u"))
        denied = self.tagged if "hr" in access.denied_tags else np.zeros_like(self.tagged)
        return (allowed & (owned | ~denied))[self.doc]

    def point(self, i: int) -> ChunkPoint:
        d = int(self.doc[i])
        return ChunkPoint(
            doc_id=f"doc{d:06d}",
            chunk=i % CHUNKS_PER_DOC,
            vector=self.vectors[i],
            classification=CLASSIFICATIONS[self.classification[d]],
            owner=f"u{self.owner[d]}",
            tags=("hr",) if self.tagged[d] else (),
            expires_at=None,
        )


def make_data(size: int, queries: int, seed: int) -> Data:
    rng = np.random.default_rng(seed)
    topics = unit(rng.standard_normal((TOPICS, DIM)))
    centres = unit(
        np.repeat(topics, SUBTOPICS, axis=0)
        + 0.6 * unit(rng.standard_normal((TOPICS * SUBTOPICS, DIM)))
    )
    docs = math.ceil(size / CHUNKS_PER_DOC)
    doc_centre = rng.integers(0, len(centres), docs)
    doc = np.arange(size) // CHUNKS_PER_DOC
    noise = NOISE * rng.standard_normal((size, DIM), dtype=np.float32)
    vectors = unit(centres[doc_centre[doc]] + noise)
    query_noise = NOISE * rng.standard_normal((queries, DIM), dtype=np.float32)
    query_vectors = unit(centres[rng.integers(0, len(centres), queries)] + query_noise)
    return Data(
        vectors=vectors,
        queries=query_vectors,
        doc=doc,
        classification=rng.integers(0, len(CLASSIFICATIONS), docs),
        owner=rng.integers(0, OWNERS, docs),
        tagged=rng.random(docs) < 0.5,
    )


def exact_top(
    data: Data, masks: dict[str, npt.NDArray[np.bool_]]
) -> dict[str, npt.NDArray[np.int64]]:
    """Each filter's exact top-K chunk indices per query, best first."""
    tops = {name: np.empty((len(data.queries), K), dtype=np.int64) for name in masks}
    for start in range(0, len(data.queries), 100):
        scores = data.queries[start : start + 100] @ data.vectors.T
        for name, mask in masks.items():
            masked = np.where(mask, scores, -np.inf)
            part = np.argpartition(-masked, K, axis=1)[:, :K]
            order = np.argsort(-np.take_along_axis(masked, part, axis=1), axis=1)
            tops[name][start : start + 100] = np.take_along_axis(part, order, axis=1)
    return tops


@dataclass
class Row:
    size: int
    engine: str
    filter: str
    visible: float
    build_s: float | None
    p50_ms: float
    p99_ms: float
    recall: float
    short: int
    queries: int


def summarise(
    latencies: Sequence[float], found: Sequence[Sequence[int]], top: npt.NDArray[np.int64]
) -> tuple[float, float, float, int]:
    ms = np.array(latencies) * 1000
    recall = float(np.mean([len(set(f) & set(top[i].tolist())) / K for i, f in enumerate(found)]))
    short = sum(1 for f in found if len(f) < K)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), recall, short


def timed(search: Callable[[int], list[int]], queries: int) -> tuple[list[float], list[list[int]]]:
    for i in range(min(WARMUP, queries // 10)):
        search(i)
    latencies, found = [], []
    for i in range(queries):
        started = time.perf_counter()
        result = search(i)
        latencies.append(time.perf_counter() - started)
        found.append(result)
    return latencies, found


async def timed_async(
    search: Callable[[int], Awaitable[list[int]]], queries: int
) -> tuple[list[float], list[list[int]]]:
    for i in range(min(WARMUP, queries // 10)):
        await search(i)
    latencies, found = [], []
    for i in range(queries):
        started = time.perf_counter()
        result = await search(i)
        latencies.append(time.perf_counter() - started)
        found.append(result)
    return latencies, found


class Bench:
    def __init__(self, data: Data, work: Path, batch: int, raw_efs: list[int]) -> None:
        self.data = data
        self.work = work
        self.batch = batch
        self.raw_efs = raw_efs
        self.size = len(data.vectors)
        self.masks = {name: data.visible(access) for name, access in FILTERS.items()}
        self.top = exact_top(data, self.masks)
        self.rows: list[Row] = []
        self.ids = {
            point_id(f"doc{int(self.data.doc[i]):06d}", i % CHUNKS_PER_DOC): i
            for i in range(self.size)
        }

    def add(
        self,
        engine: str,
        name: str,
        build_s: float | None,
        measured: tuple[list[float], list[list[int]]],
    ) -> None:
        latencies, found = measured
        p50, p99, recall, short = summarise(latencies, found, self.top[name])
        row = Row(
            self.size,
            engine,
            name,
            float(self.masks[name].mean()),
            build_s,
            p50,
            p99,
            recall,
            short,
            len(found),
        )
        self.rows.append(row)
        print(
            f"  {self.size:>7,} {engine:<26} {name:<12} p50 {p50:7.2f}  p99 {p99:7.2f} ms  "
            f"recall@10 {recall:.3f}  short {short}",
            flush=True,
        )

    def hit_index(self, doc_id: str, chunk: int) -> int:
        return int(doc_id.removeprefix("doc")) * CHUNKS_PER_DOC + chunk

    async def edge(self, queries: int) -> None:
        path = self.work / f"edge-{self.size}"
        store = await EdgeStore.open(path, DIM)
        try:
            started = time.perf_counter()
            for start in range(0, self.size, self.batch):
                points = [
                    self.data.point(i) for i in range(start, min(self.size, start + self.batch))
                ]
                await store.upsert(points)
            build = time.perf_counter() - started
            info = store.shard.info()
            print(
                f"  edge: {self.size:,} chunks upserted in batches of {self.batch:,} "
                f"in {build:.1f} s "
                f"({info.segments_count} segments, {info.indexed_vectors_count:,} vectors in HNSW)",
                flush=True,
            )
            first = True
            for name, access in FILTERS.items():

                async def search(i: int, access: Access = access) -> list[int]:
                    hits = await store.search(self.data.queries[i], K, access)
                    return [self.hit_index(hit.doc_id, hit.chunk) for hit in hits]

                self.add(
                    "edge store", name, build if first else None, await timed_async(search, queries)
                )
                first = False
            for name, access in FILTERS.items():
                for ef in self.raw_efs:
                    for acorn in (True, False):
                        if not acorn and name == "none":
                            continue
                        params = edge.SearchParams(
                            hnsw_ef=ef,
                            acorn=edge.AcornSearchParams(
                                enable=acorn, max_selectivity=memory_store.ACORN_MAX_SELECTIVITY
                            ),
                        )
                        found_filter = edge_filter(access) if name != "none" else None

                        def raw(
                            i: int,
                            params: edge.SearchParams = params,
                            f: edge.Filter | None = found_filter,
                        ) -> list[int]:
                            request = edge.QueryRequest(
                                limit=K,
                                query=edge.Query.Nearest(self.data.queries[i].tolist()),
                                filter=f,
                                params=params,
                            )
                            return [self.ids[str(point.id)] for point in store.shard.query(request)]

                        label = f"edge raw ef={ef}" + ("" if acorn else ", no ACORN")
                        self.add(label, name, None, timed(raw, queries))
        finally:
            await store.close()
            shutil.rmtree(path, ignore_errors=True)

    def usearch(self, queries: int) -> None:
        index = Index(
            ndim=DIM,
            metric="cos",
            dtype="f32",
            connectivity=16,
            expansion_add=128,
            expansion_search=128,
        )
        started = time.perf_counter()
        index.add(np.arange(self.size), self.data.vectors)
        build = time.perf_counter() - started
        first = True
        for name in FILTERS:
            mask = self.masks[name]
            fetch = K if name == "none" else math.ceil(K / float(mask.mean()) * 2)

            def search(i: int, mask: npt.NDArray[np.bool_] = mask, fetch: int = fetch) -> list[int]:
                keys = index.search(self.data.queries[i], fetch, threads=1).keys
                return [int(key) for key in keys if mask[key]][:K]

            label = "usearch" if name == "none" else f"usearch, fetch {fetch}, post-filter"
            self.add(label, name, build if first else None, timed(search, queries))
            first = False

    async def qdrant_local(self, queries: int) -> None:
        store = QdrantStore(
            AsyncQdrantClient(location=":memory:"),
            collection="bench",
            dimensions=DIM,
            where=":memory:",
        )
        await store.prepare()
        try:
            started = time.perf_counter()
            for start in range(0, self.size, self.batch):
                await store.upsert(
                    [self.data.point(i) for i in range(start, min(self.size, start + self.batch))]
                )
            build = time.perf_counter() - started
            first = True
            for name, access in FILTERS.items():

                async def search(i: int, access: Access = access) -> list[int]:
                    hits = await store.search(self.data.queries[i], K, access)
                    return [self.hit_index(hit.doc_id, hit.chunk) for hit in hits]

                self.add(
                    "qdrant local (brute force)",
                    name,
                    build if first else None,
                    await timed_async(search, queries),
                )
                first = False
        finally:
            await store.close()

    def exact(self, queries: int) -> None:
        vectors = self.data.vectors

        def search(i: int) -> list[int]:
            scores = vectors @ self.data.queries[i]
            part = np.argpartition(-scores, K)[:K]
            return [int(j) for j in part[np.argsort(-scores[part])]]

        self.add("numpy exact", "none", None, timed(search, queries))


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def table(rows: list[Row], markdown: bool) -> list[str]:
    head = [
        "chunks",
        "engine",
        "filter",
        "visible",
        "build s",
        "p50 ms",
        "p99 ms",
        "recall@10",
        "short",
        "queries",
    ]
    body = [
        [
            f"{r.size:,}",
            r.engine,
            r.filter,
            f"{r.visible:.0%}",
            "" if r.build_s is None else f"{r.build_s:.1f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.recall:.3f}",
            str(r.short),
            f"{r.queries:,}",
        ]
        for r in rows
    ]
    return grid(head, body, markdown, left=frozenset({1, 2}))


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.engine != "edge store":
            continue
        met = r.p99_ms <= GOAL_P99_MS and r.recall >= GOAL_RECALL and r.short == 0
        scope = "goal" if r.size == GOAL_SIZE else "for reference (goal is at 100k)"
        lines.append(
            f"{'PASS' if met else 'MISS'}: edge store at {r.size:,} chunks, filter {r.filter}: "
            f"p99 {r.p99_ms:.2f} ms, recall@10 {r.recall:.3f} "
            f"({scope}: p99 <= {GOAL_P99_MS:g} ms, recall >= {GOAL_RECALL})"
        )
    return lines


async def run(args: argparse.Namespace) -> list[Row]:
    sizes = [int(s) for s in args.sizes.split(",")]
    raw_efs = [int(e) for e in args.raw_ef.split(",")]
    work = Path(tempfile.mkdtemp(prefix="memory-query-"))
    rows: list[Row] = []
    try:
        for size in sizes:
            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            busy, own, wall = machine_busy(), cpu_self(), time.monotonic()
            started = time.perf_counter()
            data = make_data(size, args.queries, args.seed)
            bench = Bench(data, work, args.batch, raw_efs)
            print(
                f"{size:,} chunks: data and exact top-{K} in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            bench.exact(min(args.queries, EXACT_QUERIES))
            await bench.edge(args.queries)
            bench.usearch(args.queries)
            if size <= LOCAL_MAX_SIZE:
                await bench.qdrant_local(min(args.queries, LOCAL_QUERIES))
            others = (machine_busy() - busy - (cpu_self() - own)) / (time.monotonic() - wall)
            print(f"  others' CPUs meanwhile: {max(0.0, others):.2f}", flush=True)
            rows += bench.rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="chunks, comma-separated")
    parser.add_argument("--queries", type=int, default=1000, help="measured queries per row")
    parser.add_argument("--batch", type=int, default=1000, help="chunks per upsert while building")
    parser.add_argument(
        "--raw-ef", default=str(memory_store.HNSW_EF), help="hnsw_ef values for edge raw"
    )
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10k chunks, 200 queries")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="wait up to this long for other processes to go idle (0: not)",
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries = "10000", 200
    print(f"{machine()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(
        f"{DIM}-dim clustered vectors ({TOPICS}x{SUBTOPICS} centres, noise {NOISE}), k={K}, "
        f"{args.queries:,} queries after up to {WARMUP} warm-up; HNSW m={memory_store.HNSW_M} "
        f"ef_construct={memory_store.HNSW_EF_CONSTRUCT} ef={memory_store.HNSW_EF}, "
        f"ACORN when at most {memory_store.ACORN_MAX_SELECTIVITY:.0%} are visible",
        flush=True,
    )
    started = time.monotonic()
    rows = asyncio.run(run(args))
    print(f"\n{time.monotonic() - started:.0f} s in all\n")
    print("\n".join(table(rows, args.markdown)))
    print()
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
