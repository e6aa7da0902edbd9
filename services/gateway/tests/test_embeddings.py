"""The embedded MiniLM embedder on the real pinned model, and the upstream embedder's checks.

MiniLM runs from the tools cache (`sovereign tools install minilm`). The upstream tests
use a small aiohttp server on loopback that answers canned bodies: a double standing in
for misbehaving servers (wrong shapes, per-token vectors, NaNs), which no real engine can
be made to produce on demand. A real llama.cpp server is in
tests/integration/test_embeddings_upstream.py.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import numpy as np
import pytest
from aiohttp import web
from sovereign_gateway.memory.embeddings import Embedder, MiniLMEmbedder, UpstreamEmbedder
from sovereign_gateway.memory.errors import EmbeddingUnavailable

from services.gateway.tests import models

PARAPHRASES = [
    ("How do I reset my password?", "What are the steps to change my login password?"),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("The quarterly revenue increased by ten percent.", "Sales grew 10% this quarter."),
    ("Where is the nearest train station?", "How can I get to the closest railway station?"),
]
UNRELATED = [
    "Photosynthesis converts sunlight into chemical energy.",
    "The stock market closed lower on Friday.",
    "She plays the violin in an orchestra.",
    "Rust guarantees memory safety without garbage collection.",
]
# Measured on this model: paraphrase pairs 0.70-0.85, unrelated pairs at most 0.15.
PARAPHRASE_AT_LEAST = 0.6
UNRELATED_AT_MOST = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def minilm(**overrides: Any) -> MiniLMEmbedder:
    options: dict[str, Any] = {
        "model_path": models.minilm_onnx(),
        "tokenizer_path": models.minilm_tokenizer(),
        "sha256": models.MINILM_ONNX_SHA256,
        "tokenizer_sha256": models.MINILM_TOKENIZER_SHA256,
        "threads": 2,
    }
    options.update(overrides)
    return MiniLMEmbedder(**options)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return minilm()


def test_is_an_embedder(embedder: MiniLMEmbedder) -> None:
    typed: Embedder = embedder
    assert (typed.model, typed.dimensions, typed.max_tokens) == ("all-minilm-l6-v2", 384, 256)


@pytest.mark.anyio
async def test_vectors_are_float32_unit_rows(embedder: MiniLMEmbedder) -> None:
    result = await embedder.embed(["hello world", "", "Zürich 東京"])
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)
    # [CLS] hello world [SEP] + [CLS] [SEP] + [CLS] zurich 東 京 [SEP]
    assert result.prompt_tokens == 4 + 2 + 5


@pytest.mark.anyio
async def test_paraphrases_score_higher_than_unrelated_sentences(
    embedder: MiniLMEmbedder,
) -> None:
    texts = [text for pair in PARAPHRASES for text in pair] + UNRELATED
    vectors = (await embedder.embed(texts)).vectors
    similarity = vectors @ vectors.T
    pairs = len(PARAPHRASES)
    for pair in range(pairs):
        assert similarity[2 * pair, 2 * pair + 1] >= PARAPHRASE_AT_LEAST, PARAPHRASES[pair]
    for i in range(len(texts)):
        for j in range(len(texts)):
            same_pair = i < 2 * pairs and j < 2 * pairs and i // 2 == j // 2
            if i != j and not same_pair:
                assert similarity[i, j] <= UNRELATED_AT_MOST, (texts[i], texts[j])


@pytest.mark.anyio
async def test_batches_match_one_by_one_in_order() -> None:
    texts = [text for pair in PARAPHRASES for text in pair] + UNRELATED + ["x " * 300]
    small_batches = minilm(batch_size=3)  # several batches, sorted by length and put back
    together = (await small_batches.embed(texts)).vectors
    alone = np.vstack([(await small_batches.embed([text])).vectors for text in texts])
    assert np.abs(together - alone).max() < 1e-5


@pytest.mark.anyio
async def test_long_input_is_truncated_to_256_tokens(embedder: MiniLMEmbedder) -> None:
    words = [f"w{index}" for index in range(1000)]  # "w", "##N...": two or three tokens each
    long = " ".join(words)
    result = await embedder.embed([long])
    assert result.prompt_tokens == 256
    # What the model saw: the first 254 tokens between [CLS] and [SEP].
    encoding = embedder._tokenizer.encode(long)
    prefix = long[: encoding.offsets[-2][1]]
    assert np.abs(result.vectors - (await embedder.embed([prefix])).vectors).max() < 1e-5


@pytest.mark.anyio
async def test_concurrent_calls_do_not_mix_results(embedder: MiniLMEmbedder) -> None:
    results: dict[int, np.ndarray[Any, Any]] = {}

    async def one(index: int, text: str) -> None:
        results[index] = (await embedder.embed([text] * 3)).vectors

    async with anyio.create_task_group() as group:
        for index, text in enumerate(UNRELATED):
            group.start_soon(one, index, text)
    expected = (await embedder.embed(UNRELATED)).vectors
    for index in range(len(UNRELATED)):
        assert np.abs(results[index] - expected[index]).max() < 1e-5


@pytest.mark.anyio
async def test_inference_leaves_the_event_loop_free(embedder: MiniLMEmbedder) -> None:
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await embedder.embed(["a sentence of moderate length about memory " * 20] * 16)
        during = ticks
        done.set()
    # Blocking inference would have let the ticker run once at most.
    assert during >= 3


@pytest.mark.anyio
async def test_bad_input_is_refused(embedder: MiniLMEmbedder) -> None:
    with pytest.raises(ValueError, match="no texts to embed"):
        await embedder.embed([])
    with pytest.raises(TypeError, match="not one string"):
        await embedder.embed("hello")
    with pytest.raises(TypeError, match="must all be strings"):
        await embedder.embed(["ok", 3])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_closed_embedder_is_unavailable() -> None:
    closing = minilm()
    await closing.close()
    with pytest.raises(EmbeddingUnavailable, match="closed"):
        await closing.embed(["hello"])


def flipped_copy(tmp_path: Path) -> tuple[Path, str]:
    """The model with one byte of a weight changed, and the sha256 of that copy."""
    copy = tmp_path / "model.onnx"
    shutil.copyfile(models.minilm_onnx(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of the file is inside a weight tensor
    copy.write_bytes(bytes(data))
    return copy, hashlib.sha256(data).hexdigest()


def test_digest_mismatch_is_refused_before_loading(tmp_path: Path) -> None:
    copy, actual = flipped_copy(tmp_path)
    with pytest.raises(EmbeddingUnavailable) as caught:
        minilm(model_path=copy)
    message = str(caught.value)
    assert str(copy) in message
    assert models.MINILM_ONNX_SHA256 in message
    assert actual in message
    assert caught.value.status == 503
    # The same bytes load when pinned: the digest, not a broken file, refused them.
    assert minilm(model_path=copy, sha256=actual).dimensions == 384


def test_tokenizer_digest_mismatch_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "tokenizer.json"
    copy.write_text(models.minilm_tokenizer().read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(EmbeddingUnavailable, match=r"embedding tokenizer .* has sha256"):
        minilm(tokenizer_path=copy)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingUnavailable, match=f"{tmp_path}/none.onnx"):
        minilm(model_path=tmp_path / "none.onnx")
    with pytest.raises(EmbeddingUnavailable, match=f"{tmp_path}/none.json"):
        minilm(tokenizer_path=tmp_path / "none.json")


def test_a_file_that_is_not_a_model_is_unavailable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EmbeddingUnavailable, match="cannot be loaded"):
        minilm(model_path=junk, sha256=hashlib.sha256(b"not a model").hexdigest())


# -- the upstream embedder's checks, against canned answers ------------------------------

Answer = Callable[[dict[str, Any]], web.Response]


def embedding_answer(vectors: list[Any], indices: list[Any] | None = None) -> dict[str, Any]:
    indices = list(range(len(vectors))) if indices is None else indices
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector}
            for index, vector in zip(indices, vectors, strict=True)
        ],
        "model": "m",
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }


@pytest.fixture
async def canned() -> AsyncIterator[tuple[str, list[Answer], list[dict[str, Any]]]]:
    """A loopback server answering POST /v1/embeddings with the next canned answer."""
    answers: list[Answer] = []
    requests: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        requests.append(body)
        return answers.pop(0)(body)

    app = web.Application()
    app.router.add_post("/v1/embeddings", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1", answers, requests
    finally:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def upstream(url: str, client: aiohttp.ClientSession, **options: Any) -> UpstreamEmbedder:
    return UpstreamEmbedder(
        base_url=url, model="m", dimensions=None, session=lambda: client, **options
    )


def json_answer(payload: Any, status: int = 200) -> Answer:
    return lambda _: web.json_response(payload, status=status)


@pytest.mark.anyio
async def test_upstream_vectors_are_normalised_and_reordered(
    canned: tuple[str, list[Answer], list[dict[str, Any]]], client: aiohttp.ClientSession
) -> None:
    url, answers, requests = canned
    answers.append(json_answer(embedding_answer([[0.0, 3.0], [4.0, 0.0]], indices=[1, 0])))
    embedder = upstream(url, client)
    result = await embedder.embed(["first", "second"])
    assert requests == [{"model": "m", "input": ["first", "second"]}]
    assert result.vectors.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert result.vectors.dtype == np.float32
    assert result.prompt_tokens == 7
    assert embedder.dimensions == 2


@pytest.mark.anyio
async def test_upstream_batches_large_requests(
    canned: tuple[str, list[Answer], list[dict[str, Any]]], client: aiohttp.ClientSession
) -> None:
    url, answers, requests = canned
    for size in (2, 1):
        answers.append(json_answer(embedding_answer([[1.0, 1.0]] * size)))
    result = await upstream(url, client, batch_size=2).embed(["a", "b", "c"])
    assert [body["input"] for body in requests] == [["a", "b"], ["c"]]
    assert result.vectors.shape == (3, 2)
    assert result.prompt_tokens == 14


@pytest.mark.anyio
async def test_upstream_dimensions_unknown_until_it_answers(
    canned: tuple[str, list[Answer], list[dict[str, Any]]], client: aiohttp.ClientSession
) -> None:
    url, answers, _ = canned
    embedder = upstream(url, client)
    with pytest.raises(EmbeddingUnavailable, match="not known until"):
        _ = embedder.dimensions
    answers.append(json_answer(embedding_answer([[1.0, 2.0, 2.0]])))
    answers.append(json_answer(embedding_answer([[1.0, 2.0]])))
    await embedder.embed(["a"])
    assert embedder.dimensions == 3
    with pytest.raises(EmbeddingUnavailable, match="answered 2 dimensions, not 3"):
        await embedder.embed(["a"])


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            json_answer({"error": {"message": "model overloaded"}}, 500),
            "HTTP 500: model overloaded",
        ),
        (json_answer({"detail": "Not Found"}, 404), "HTTP 404: Not Found"),
        (lambda _: web.Response(status=502, text="<html>bad gateway</html>"), "HTTP 502: <html>"),
        (lambda _: web.Response(status=200, text="{not json"), "malformed JSON: {not json"),
        (json_answer({"data": "nope"}), "no embeddings in `data` for 1 inputs"),
        (json_answer(embedding_answer([[1.0], [1.0]])), "answered 2 embeddings in `data`"),
        (json_answer(embedding_answer([[1.0]], indices=[5])), "without a distinct index"),
        (json_answer(embedding_answer([[1.0]], indices=["0"])), "without a distinct index"),
        (json_answer(embedding_answer([[[1.0, 0.0], [0.0, 1.0]]])), "one vector per token"),
        (json_answer(embedding_answer([["1.0"]])), "non-numbers"),
        (json_answer(embedding_answer([[]])), "no embedding list"),
        (json_answer(embedding_answer([[0.0, 0.0]])), "all-zero"),
        (lambda _: web.Response(text='{"data":[{"index":0,"embedding":[NaN]}]}'), "non-finite"),
    ],
)
@pytest.mark.anyio
async def test_upstream_misbehaviour_is_unavailable(
    canned: tuple[str, list[Answer], list[dict[str, Any]]],
    client: aiohttp.ClientSession,
    answer: Answer,
    message: str,
) -> None:
    url, answers, _ = canned
    answers.append(answer)
    with pytest.raises(EmbeddingUnavailable, match=re.escape(message)) as caught:
        await upstream(url, client).embed(["only"])
    assert f"{url}/embeddings" in str(caught.value)


@pytest.mark.anyio
async def test_upstream_that_does_not_answer_in_time(client: aiohttp.ClientSession) -> None:
    # A listening socket nobody accepts from: the kernel completes the connection and
    # the request sits unanswered.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with pytest.raises(EmbeddingUnavailable, match=r"did not answer within 0\.3 s"):
            await upstream(url, client, timeout_seconds=0.3).embed(["a"])
