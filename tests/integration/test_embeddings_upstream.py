"""The upstream embedder against real llama.cpp servers (`python -m llama_cpp.server`).

SmolLM2-135M is a chat model, but llama.cpp embeds with any model: mean pooling over its
576-wide hidden states, forced with `--kv_overrides llama.pooling_type=int:1` because the
GGUF names no pooling and llama_cpp.server has no `--pooling` flag. Two more servers show
how llama.cpp fails: one started without `--embedding` answers HTTP 500, one without
pooling answers a vector per token. All three share the module, one thread each.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from sovereign_gateway.memory.embeddings import UpstreamEmbedder
from sovereign_gateway.memory.errors import EmbeddingUnavailable

from sovereign import tools
from tests.integration.conftest import START_TIMEOUT_S, free_port, start, stop, wait_listening

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
HIDDEN_SIZE = 576  # SmolLM2-135M's n_embd
MEAN_POOLING = "llama.pooling_type=int:1"  # enum llama_pooling_type: 0 none, 1 mean
TEXTS = [
    "The node keeps its documents encrypted at rest.",
    "Quarterly revenue grew by ten percent.",
    "A kitten naps on the couch.",
    "Rust guarantees memory safety.",
    "東京は日本の首都です。",
]


@dataclass(frozen=True)
class Servers:
    pooled: str  # --embedding with mean pooling: what a deployment runs
    chat_only: str  # no --embedding
    per_token: str  # --embedding, no pooling


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    gguf = tools.smollm2_gguf()
    logs = tmp_path_factory.mktemp("llama-embeddings")
    variants = {
        "pooled": ["--embedding", "true", "--kv_overrides", MEAN_POOLING],
        "chat_only": [],
        "per_token": ["--embedding", "true"],
    }
    started: dict[str, tuple[str, Path]] = {}
    processes = []
    try:
        # Started together, waited for in turn: the three loads overlap.
        for name, extra in variants.items():
            port = free_port()
            log = logs / f"{name}.log"
            command = [
                sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512",
                "--n_threads", "1", "--n_threads_batch", "1", "--model_alias", MODEL,
                "--verbose", "False", *extra,
            ]  # fmt: skip
            processes.append(start(command, log))
            started[name] = (f"http://127.0.0.1:{port}/v1", log)
        for process, (url, log) in zip(processes, started.values(), strict=True):
            wait_listening(f"{url}/models", process, log, START_TIMEOUT_S)
        yield Servers(**{name: url for name, (url, _) in started.items()})
    finally:
        for process in processes:
            stop(process)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def embedder(
    url: str, client: aiohttp.ClientSession, dimensions: int | None = None, batch_size: int = 64
) -> UpstreamEmbedder:
    return UpstreamEmbedder(
        base_url=url,
        model=MODEL,
        dimensions=dimensions,
        session=lambda: client,
        timeout_seconds=60,
        batch_size=batch_size,
    )


@pytest.mark.anyio
async def test_unit_vectors_of_the_models_hidden_size(
    servers: Servers, client: aiohttp.ClientSession
) -> None:
    upstream = embedder(servers.pooled, client)
    result = await upstream.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), HIDDEN_SIZE)
    assert result.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-6)
    assert upstream.dimensions == HIDDEN_SIZE
    assert result.prompt_tokens >= len(" ".join(TEXTS).split())


@pytest.mark.anyio
async def test_order_is_kept_and_batches_agree(
    servers: Servers, client: aiohttp.ClientSession
) -> None:
    together = (await embedder(servers.pooled, client).embed(TEXTS)).vectors
    batched = (await embedder(servers.pooled, client, batch_size=2).embed(TEXTS)).vectors
    alone = np.vstack(
        [(await embedder(servers.pooled, client).embed([text])).vectors for text in TEXTS]
    )
    # llama.cpp decodes a batch's sequences together: the same vectors up to rounding.
    for vectors in (batched, alone):
        similarity = together @ vectors.T
        assert np.diag(similarity).min() > 0.999
        assert (similarity.argmax(axis=1) == np.arange(len(TEXTS))).all()


@pytest.mark.anyio
async def test_configured_dimensions_are_enforced(
    servers: Servers, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(EmbeddingUnavailable, match=f"answered {HIDDEN_SIZE} dimensions, not 384"):
        await embedder(servers.pooled, client, dimensions=384).embed(["hello"])


@pytest.mark.anyio
async def test_a_closed_port_is_unavailable(client: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EmbeddingUnavailable, match="cannot reach the embedding upstream") as caught:
        await embedder(url, client).embed(["hello"])
    assert caught.value.status == 503
    assert url in str(caught.value)


@pytest.mark.anyio
async def test_a_server_error_carries_the_servers_message(
    servers: Servers, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(EmbeddingUnavailable) as caught:
        await embedder(servers.chat_only, client).embed(["hello"])
    assert "answered HTTP 500: Llama model must be created with embedding=True" in str(caught.value)


@pytest.mark.anyio
async def test_per_token_vectors_are_refused_with_the_fix(
    servers: Servers, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(EmbeddingUnavailable, match=r"one vector per token.*pooling_type"):
        await embedder(servers.per_token, client).embed(["hello world"])
