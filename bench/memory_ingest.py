"""Memory ingest: the hash + encrypt + store path against raw SHA-256 and AES-GCM, and
embeddings per second.

Takes document sizes; prints, measured in one run on one core each:
- raw SHA-256 and raw AES-256-GCM throughput (1 MiB buffers), the two bounds;
- the ingest path as the gateway runs it once a document is chunked: SHA-256 of the
  document, a fresh data key, every chunk sealed (96-bit random nonce, AAD = document id,
  chunk index, key version), the ciphertext file written and fsynced, and the catalog
  record staged and committed (SQLite, synchronous=FULL);
- all-MiniLM-L6-v2 embeddings per second on onnxruntime, one at a time and batched;
- how long chunking each document takes (the tokenizer).
Goal (the Memory issue): the path runs at >= 50 % of the slower of the two raw figures.

    uv run python bench/memory_ingest.py [--sizes-mib 1,16] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gateway_overhead import grid
from sovereign_gateway.memory import envelope
from sovereign_gateway.memory.catalog import Catalog, DocumentRecord, Vault
from sovereign_gateway.memory.chunking import Chunker
from sovereign_gateway.memory.embeddings import MiniLMEmbedder

from sovereign import tools

MIB = 1024 * 1024
GOAL_SHARE = 0.5
RAW_BYTES = 256 * MIB
CHUNK_TOKENS = 200
CHUNK_OVERLAP = 32


def best_rate(run: Callable[[], None], size: int, repeats: int) -> float:
    """MB/s of the fastest of `repeats` runs: the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return size / min(times) / 1e6


def raw_sha256() -> float:
    buffer = os.urandom(MIB)

    def run() -> None:
        digest = hashlib.sha256()
        for _ in range(RAW_BYTES // MIB):
            digest.update(buffer)
        digest.digest()

    return best_rate(run, RAW_BYTES, 3)


def raw_aes_gcm() -> float:
    buffer = os.urandom(MIB)
    aead = AESGCM(AESGCM.generate_key(bit_length=256))

    def run() -> None:
        for _ in range(RAW_BYTES // MIB):
            aead.encrypt(os.urandom(12), buffer, b"aad")

    return best_rate(run, RAW_BYTES, 3)


def document(size: int) -> str:
    """Prose-like text: distinct sentences, so chunks differ as real ones do."""
    words = ["ward", "oxygen", "supply", "checked", "morning", "nurse", "rota", "scanner"]
    sentences = []
    total = 0
    n = 0
    while total < size:
        sentence = f"Line {n}: the {words[n % 8]} {words[(n * 7) % 8]} note {n * 7919 % 10007}. "
        sentences.append(sentence)
        total += len(sentence)
        n += 1
    return "".join(sentences)[:size]


def ingest_path(text: str, chunks: list[bytes], home: Path, kek: envelope.Kek) -> float:
    catalog = Catalog(home / "catalog.db")
    vault = Vault(home / "sealed")
    content = text.encode()
    round_ = 0

    def run() -> None:
        nonlocal round_
        round_ += 1
        # A fresh id per round, as every new document has; the content is hashed as is.
        doc_id = hashlib.sha256(content).hexdigest()[:-8] + f"{round_:08x}"
        data_key = envelope.new_data_key()
        sealed = envelope.seal_chunks(data_key, doc_id, envelope.DATA_KEY_VERSION, chunks)
        offsets = vault.write(doc_id, sealed)
        catalog.stage(
            DocumentRecord(
                id=doc_id,
                state="pending",
                classification="internal",
                owner="bench",
                tags=(),
                media_type="text/plain",
                size=len(content),
                chunks=len(chunks),
                created_at=int(time.time()),
                expires_at=None,
                key_version=envelope.DATA_KEY_VERSION,
                kek_version=kek.version,
                wrapped_key=kek.wrap(data_key, doc_id),
                sealed_meta=envelope.seal(data_key, b"{}", b"meta"),
                offsets=offsets,
            )
        )
        catalog.commit(doc_id)

    try:
        return best_rate(run, len(content), 5)
    finally:
        catalog.close()


def embeddings_per_second(texts: list[str]) -> tuple[float, float]:
    embedder = MiniLMEmbedder(
        model_path=tools.minilm_onnx(),
        tokenizer_path=tools.minilm_tokenizer(),
        sha256=tools.MINILM_ONNX_SHA256,
    )

    async def measure() -> tuple[float, float]:
        await embedder.embed(texts[:4])  # warm the session
        started = time.perf_counter()
        for text in texts[:64]:
            await embedder.embed([text])
        single = 64 / (time.perf_counter() - started)
        started = time.perf_counter()
        await embedder.embed(texts)
        batched = len(texts) / (time.perf_counter() - started)
        await embedder.close()
        return single, batched

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mib", default="1,16")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sizes = [int(float(size) * MIB) for size in args.sizes_mib.split(",")]

    sha = raw_sha256()
    aes = raw_aes_gcm()
    bound = min(sha, aes)
    chunker = Chunker.from_file(tools.minilm_tokenizer(), CHUNK_TOKENS, CHUNK_OVERLAP)
    rows = [
        ["raw SHA-256", "1 MiB buffers", f"{sha:,.0f}", ""],
        ["raw AES-256-GCM", "1 MiB buffers", f"{aes:,.0f}", ""],
    ]
    verdicts = []
    sample_chunks: list[str] = []
    chunking: list[str] = []
    with tempfile.TemporaryDirectory(prefix="memory-ingest-") as scratch:
        ring = envelope.KeyRing.open(
            envelope.KekSettings(
                source="file",
                keyring=Path(scratch) / "keyring.json",
                key_file=Path(scratch) / "memory.kek",
            )
        )
        for size in sizes:
            text = document(size)
            started = time.perf_counter()
            chunks = chunker.chunk(text)
            chunking.append(f"{size // MIB} MiB in {time.perf_counter() - started:.2f} s")
            sample_chunks = sample_chunks or [chunk.text for chunk in chunks[:512]]
            home = Path(scratch) / f"path-{size}"
            rate = ingest_path(text, [c.text.encode() for c in chunks], home, ring.current)
            share = rate / bound
            rows.append(
                [
                    "hash + seal + store",
                    f"{size // MIB} MiB, {len(chunks):,} chunks",
                    f"{rate:,.0f}",
                    f"{share:.0%}",
                ]
            )
            verdict = "PASS" if share >= GOAL_SHARE else "MISS"
            verdicts.append(
                f"{verdict}: {size // MIB} MiB at {rate:,.0f} MB/s is {share:.0%} of the slower "
                f"raw figure ({bound:,.0f} MB/s; goal >= {GOAL_SHARE:.0%})"
            )
    single, batched = embeddings_per_second(sample_chunks)
    print(f"# memory ingest, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    for line in grid(["path", "input", "MB/s", "of bound"], rows, args.markdown, frozenset({0, 1})):
        print(line)
    print()
    print(
        f"embeddings/s (all-MiniLM-L6-v2, {len(sample_chunks)} chunks of {CHUNK_TOKENS} "
        f"tokens): {single:,.1f} one at a time, {batched:,.1f} batched; median chunk "
        f"{statistics.median(len(c) for c in sample_chunks):,.0f} characters"
    )
    print(f"chunking (MiniLM tokenizer, {CHUNK_TOKENS}/{CHUNK_OVERLAP}): {', '.join(chunking)}")
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
