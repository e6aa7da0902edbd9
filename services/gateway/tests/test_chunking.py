"""Chunking with MiniLM's real tokenizer: coverage, overlap, size, boundaries, speed."""

from __future__ import annotations

import itertools
import re
import time

import anyio
import anyio.to_thread
import pytest
import tokenizers
from sovereign_gateway.memory.chunking import Chunk, Chunker

from services.gateway.tests import models

PROSE = (
    "Sovereign nodes keep their data at home. Every document is parsed in memory, cut "
    "into chunks and embedded on the node itself! Nothing leaves the machine unless "
    "policy allows it? Administrators can audit each decision.\n\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(models.minilm_tokenizer()))


def chunker(tokenizer: tokenizers.Tokenizer, size: int = 64, overlap: int = 8) -> Chunker:
    return Chunker(tokenizer, size, overlap)


LONGEST_WORD = 5  # tokens, "unbelievably"


def mixed_text(words: int, seed: int = 7) -> str:
    """Prose with long words (several WordPieces), numbers, CJK and accents."""
    vocabulary = [
        "the", "node", "encrypts", "unbelievably", "internationalisation", "3.14159",
        "Zürich", "naïve", "東京都", "データ", "—", "e-mail", "don't", "(see", "appendix)",
    ]  # fmt: skip
    out: list[str] = []
    for index in range(words):
        out.append(vocabulary[(index * 7 + seed) % len(vocabulary)])
        if index % 13 == 12:
            out.append([".", "!", "?", ".\n\n", "\u3002"][index % 5])
    return " ".join(out)


def check_invariants(chunker: Chunker, text: str, chunks: list[Chunk]) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert 0 < chunk.tokens <= chunker.size
        # Cut at word boundaries only, so the slice re-tokenizes to what it claims.
        assert chunker.count(chunk.text) == chunk.tokens
    covered = [False] * len(text)
    for chunk in chunks:
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    missed = [i for i, char in enumerate(text) if not char.isspace() and not covered[i]]
    assert missed == []
    # A window starts at a word's start: back from `overlap` tokens before the previous
    # end (more overlap) while that still moves forward, else on (less, by at most a word).
    short = 0 if chunker.size * 4 // 5 - chunker.overlap > LONGEST_WORD else LONGEST_WORD - 1
    for before, after in itertools.pairwise(chunks):
        assert before.start < after.start
        shared = text[after.start : before.end] if after.start < before.end else ""
        assert chunker.count(shared) >= chunker.overlap - short


def test_tiny_text_is_one_chunk(tokenizer: tokenizers.Tokenizer) -> None:
    text = "  Hello, world.  "
    chunks = chunker(tokenizer).chunk(text)
    assert chunks == [Chunk(0, "Hello, world.", 2, 15, 4)]


def test_empty_and_blank_text_give_no_chunks(tokenizer: tokenizers.Tokenizer) -> None:
    assert chunker(tokenizer).chunk("") == []
    assert chunker(tokenizer).chunk(" \n\n\t ") == []


@pytest.mark.parametrize(("size", "overlap"), [(64, 8), (16, 0), (32, 31), (5, 2), (6, 5)])
def test_coverage_size_and_overlap(
    tokenizer: tokenizers.Tokenizer, size: int, overlap: int
) -> None:
    text = mixed_text(600)
    splitter = Chunker(tokenizer, size, overlap)
    chunks = splitter.chunk(text)
    assert len(chunks) > 1
    check_invariants(splitter, text, chunks)


def test_windows_advance_by_size_minus_overlap_on_plain_words(
    tokenizer: tokenizers.Tokenizer,
) -> None:
    # One token per word and no sentence ends: every window is exactly full.
    text = " ".join(["node"] * 100)
    chunks = Chunker(tokenizer, 10, 3).chunk(text)
    assert [c.tokens for c in chunks] == [10] * 13 + [9]
    assert [c.start for c in chunks[:3]] == [0, 7 * 5, 14 * 5]
    singles = Chunker(tokenizer, 1, 0).chunk("a b c")
    assert [(c.text, c.start) for c in singles] == [("a", 0), ("b", 2), ("c", 4)]


def words(count: int, end: str = "") -> str:
    """`count` one-token words; `end` is glued to the last one."""
    return " ".join(["node"] * count) + end


@pytest.mark.parametrize(
    ("text", "first_chunk"),
    [
        # A paragraph break in the last fifth (tokens 16-20 of 20) beats a later sentence end.
        (words(16, ".") + "\n\n" + words(1, ".") + " " + words(10), words(16, ".")),
        # A sentence end there beats the full window.
        (words(17, "!") + " " + words(10), words(17, "!")),
        (words(16, "。") + words(10), words(16, "。")),
        # One earlier than the last fifth does not count: the window is filled.
        (words(10, ".") + " " + words(20), words(10, ".") + " " + words(9)),
        # Nor does a full stop inside a number.
        (words(16) + " 3.14 " + words(10), words(16) + " 3.14 node"),
    ],
)
def test_prefers_paragraph_then_sentence_ends(
    tokenizer: tokenizers.Tokenizer, text: str, first_chunk: str
) -> None:
    splitter = Chunker(tokenizer, 20, 0)
    chunks = splitter.chunk(text)
    assert chunks[0].text == first_chunk
    check_invariants(splitter, text, chunks)


def test_prose_chunks_end_at_sentences(tokenizer: tokenizers.Tokenizer) -> None:
    # A 41-token paragraph of four sentences: every window of 48 has a sentence end or
    # the paragraph break in its last fifth.
    text = PROSE * 20
    splitter = chunker(tokenizer, size=48, overlap=4)
    chunks = splitter.chunk(text)
    check_invariants(splitter, text, chunks)
    assert all(chunk.text.endswith((".", "!", "?")) for chunk in chunks)


def test_a_word_longer_than_the_window_is_split(tokenizer: tokenizers.Tokenizer) -> None:
    text = "x" + "a" * 400  # one word of many WordPieces
    splitter = Chunker(tokenizer, 8, 2)
    chunks = splitter.chunk(text)
    assert all(c.tokens <= 8 for c in chunks)
    assert chunks[0].start == 0
    assert chunks[-1].end == len(text)


def test_offsets_point_into_the_original_unicode(tokenizer: tokenizers.Tokenizer) -> None:
    # The tokenizer lowercases and strips accents; chunk text is still the source's.
    text = "ÉCOLE naïve Ünïcödé. 東京は日本の首都です。データを暗号化する。" * 10
    splitter = Chunker(tokenizer, 12, 3)
    chunks = splitter.chunk(text)
    check_invariants(splitter, text, chunks)
    assert chunks[0].text.startswith("ÉCOLE naïve")
    assert any(re.search("[東京日本]", c.text) for c in chunks)
    assert any(c.text.endswith("。") for c in chunks[:-1])


def test_counts_exclude_special_tokens(tokenizer: tokenizers.Tokenizer) -> None:
    assert chunker(tokenizer).count("hello world") == 2
    assert chunker(tokenizer).count("") == 0


def test_the_callers_tokenizer_is_left_alone(tokenizer: tokenizers.Tokenizer) -> None:
    tokenizer.enable_truncation(4)
    try:
        splitter = chunker(tokenizer, size=64, overlap=0)
        assert splitter.count(" ".join(["node"] * 10)) == 10
        assert tokenizer.truncation is not None
    finally:
        tokenizer.no_truncation()


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [(0, 0, "size must be at least 1"), (10, -1, "overlap must be in"), (10, 10, "overlap")],
)
def test_invalid_settings_are_refused(
    tokenizer: tokenizers.Tokenizer, size: int, overlap: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Chunker(tokenizer, size, overlap)


def test_from_file_reads_the_tokenizer() -> None:
    splitter = Chunker.from_file(models.minilm_tokenizer(), 256, 32)
    assert splitter.count("hello world") == 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_one_megabyte_chunks_in_a_worker_thread_without_holding_the_loop(
    tokenizer: tokenizers.Tokenizer,
) -> None:
    text = (mixed_text(20_000) + "\n\n") * 8
    text = text[: 1 << 20]
    splitter = Chunker(tokenizer, 256, 32)
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        began = time.perf_counter()
        chunks = await anyio.to_thread.run_sync(splitter.chunk, text)
        elapsed = time.perf_counter() - began
        done.set()
    assert chunks[-1].end == len(text.rstrip())
    # How long it takes is measured in bench/memory_ingest.py, not asserted here.
    # The tokenizer let go of the GIL: the loop ticked at least a quarter of the time
    # (with `Tokenizer.encode`, which holds it, 6 ticks in 1.2 s; now about 100).
    assert ticks >= elapsed / 0.04, (ticks, elapsed)
