"""Text embeddings: all-MiniLM-L6-v2 run in-process on onnxruntime, or an upstream server.

Takes texts; gives `Embeddings`, one float32 unit vector per text in the order given, and
the tokens read. `MiniLMEmbedder` checks the ONNX file's sha256 and then loads those very
bytes, truncates each input to the 256 tokens the model was trained on, and runs in a
worker thread, one batch at a time, so the event loop never blocks. `UpstreamEmbedder`
asks an OpenAI-compatible `/v1/embeddings` (vLLM, llama.cpp's server) and checks the
shape of every answer. Both raise `EmbeddingUnavailable` when they cannot answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio
import anyio.to_thread
import numpy as np
import numpy.typing as npt
import onnxruntime  # type: ignore[import-untyped]  # ships no type information
import tokenizers

from sovereign_gateway.memory.errors import EmbeddingUnavailable

Vectors = npt.NDArray[np.float32]

MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length, [CLS] and [SEP] included
MINILM_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
# The body of an upstream's error answer quoted in ours, at most.
ERROR_QUOTE_CHARS = 300


@dataclass(frozen=True, eq=False)
class Embeddings:
    vectors: Vectors  # (n, dimensions), rows of unit length
    prompt_tokens: int


class Embedder(Protocol):
    @property
    def model(self) -> str:
        """The name clients see, e.g. "all-minilm-l6-v2"."""
        ...

    @property
    def dimensions(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """The most tokens one input may have; longer inputs are truncated."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embeddings: ...

    async def close(self) -> None: ...


class MiniLMEmbedder:
    def __init__(
        self,
        *,
        model_path: Path,
        tokenizer_path: Path,
        sha256: str,
        tokenizer_sha256: str | None = None,
        threads: int | None = None,
        batch_size: int = 32,
        name: str = "all-minilm-l6-v2",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model = name
        self.max_tokens = MINILM_MAX_TOKENS
        self.batch_size = batch_size
        # Hash and load the same bytes: a file swapped after the check is never loaded.
        model = _verified(model_path, sha256, "embedding model")
        tokenizer_json = _verified(tokenizer_path, tokenizer_sha256, "embedding tokenizer")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json.decode())
        except Exception as exc:
            raise EmbeddingUnavailable(f"{tokenizer_path} is not a tokenizer: {exc}") from None
        # The file asks for padding to 128 and truncation at 128; batches are padded here.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per core
        options.inter_op_num_threads = 1
        # Idle workers would otherwise spin for the CPU the event loop and llama.cpp need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self._session: Any = onnxruntime.InferenceSession(
                model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise EmbeddingUnavailable(f"{model_path} cannot be loaded: {exc}") from None
        self._inputs = [item.name for item in self._session.get_inputs()]
        if not set(self._inputs) <= MINILM_INPUTS or "input_ids" not in self._inputs:
            raise EmbeddingUnavailable(
                f"{model_path} takes inputs {self._inputs}, not MiniLM's {sorted(MINILM_INPUTS)}"
            )
        shape = self._session.get_outputs()[0].shape
        if len(shape) != 3 or not isinstance(shape[-1], int):
            raise EmbeddingUnavailable(
                f"{model_path} gives {shape}, not (batch, sequence, dimensions)"
            )
        self.dimensions: int = shape[-1]
        # One inference at a time: it already uses every core it was given.
        self._limiter = anyio.CapacityLimiter(1)

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        batch = _texts(texts)
        if self._session is None:
            raise EmbeddingUnavailable(f"the {self.model} embedder is closed")
        # The limiter is taken per slice, so a query waits for one slice of a large
        # document's ingest, not for all of it.
        parts = [
            await anyio.to_thread.run_sync(
                self._embed, batch[start : start + slice_], limiter=self._limiter
            )
            for slice_ in (self.batch_size * 4,)
            for start in range(0, len(batch), slice_)
        ]
        if len(parts) == 1:
            return parts[0]
        return Embeddings(
            np.concatenate([part.vectors for part in parts]),
            sum(part.prompt_tokens for part in parts),
        )

    async def close(self) -> None:
        self._session = None

    def _embed(self, texts: list[str]) -> Embeddings:
        session = self._session
        if session is None:
            raise EmbeddingUnavailable(f"the {self.model} embedder is closed")
        encodings = self._tokenizer.encode_batch(texts)
        lengths = [len(encoding.ids) for encoding in encodings]
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        # Batches of similar lengths waste little on padding.
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        for begin in range(0, len(order), self.batch_size):
            rows = order[begin : begin + self.batch_size]
            width = max(lengths[row] for row in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for line, row in enumerate(rows):
                ids[line, : lengths[row]] = encodings[row].ids
                mask[line, : lengths[row]] = 1
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = session.run(None, {name: feeds[name] for name in self._inputs})[0]
            # Mean pooling over the real tokens, as sentence-transformers does.
            summed = (hidden * mask[:, :, None]).sum(axis=1)
            vectors[rows] = summed / mask.sum(axis=1, keepdims=True)
        return Embeddings(_unit_rows(vectors), sum(lengths))


class UpstreamEmbedder:
    """An OpenAI-compatible embeddings server.

    `dimensions` None: learnt from the first answer (reading it before then raises);
    afterwards every answer must keep it. `max_tokens` is what the upstream was started
    with (llama.cpp: its batch size, past which it truncates); it is not checked here.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        dimensions: int | None,
        session: Callable[[], aiohttp.ClientSession],
        timeout_seconds: float = 30,
        batch_size: int = 64,
        max_tokens: int = 512,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._dimensions = dimensions
        self._session = session
        self._timeout = timeout_seconds

    @property
    def dimensions(self) -> int:
        if self._dimensions is None:
            raise EmbeddingUnavailable(
                f"the dimensions of {self.model} at {self.base_url} are not known until it "
                "has answered once"
            )
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        batch = _texts(texts)
        parts: list[Vectors] = []
        tokens = 0
        for begin in range(0, len(batch), self.batch_size):
            vectors, used = await self._request(batch[begin : begin + self.batch_size])
            parts.append(vectors)
            tokens += used
        return Embeddings(np.vstack(parts), tokens)

    async def close(self) -> None:
        """Nothing to release: the session belongs to the gateway."""

    async def _request(self, texts: list[str]) -> tuple[Vectors, int]:
        url = f"{self.base_url}/embeddings"
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with self._session().post(
                url, json={"model": self.model, "input": texts}, timeout=timeout
            ) as reply:
                status = reply.status
                body = await reply.read()
        except TimeoutError:
            raise EmbeddingUnavailable(
                f"the embedding upstream {url} did not answer within {self._timeout:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EmbeddingUnavailable(
                f"cannot reach the embedding upstream {url}: {type(exc).__name__}: {exc}"
            ) from None
        if status != 200:
            raise EmbeddingUnavailable(
                f"the embedding upstream {url} answered HTTP {status}: {_error_message(body)}"
            )
        try:
            answer = json.loads(body)
        except ValueError:
            raise EmbeddingUnavailable(
                f"the embedding upstream {url} answered malformed JSON: {_quote(body)}"
            ) from None
        return self._vectors(answer, len(texts), url)

    def _vectors(self, answer: Any, count: int, url: str) -> tuple[Vectors, int]:
        def bad(problem: str) -> EmbeddingUnavailable:
            return EmbeddingUnavailable(f"the embedding upstream {url} {problem}")

        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != count:
            size = len(data) if isinstance(data, list) else "no"
            raise bad(f"answered {size} embeddings in `data` for {count} inputs")
        rows: list[list[float] | None] = [None] * count
        for item in data:
            index = item.get("index") if isinstance(item, dict) else None
            if type(index) is not int or not 0 <= index < count or rows[index] is not None:
                raise bad(f"answered an item without a distinct index in [0, {count})")
            vector = item.get("embedding")
            if isinstance(vector, list) and vector and isinstance(vector[0], list):
                raise bad(
                    "answered one vector per token, not per input: start it with a pooling "
                    "type (llama.cpp: --pooling mean; llama_cpp.server: "
                    "--kv_overrides <arch>.pooling_type=int:1)"
                )
            if not isinstance(vector, list) or not vector:
                raise bad(f"answered no embedding list for input {index}")
            if not all(type(value) in (float, int) for value in vector):
                raise bad(f"answered an embedding of non-numbers for input {index}")
            rows[index] = vector
        if len({len(row) for row in rows if row is not None}) != 1:
            raise bad("answered embeddings of different lengths")
        matrix = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(matrix).all():
            raise bad("answered an embedding with a non-finite value")
        if self._dimensions is None:
            self._dimensions = matrix.shape[1]
        elif matrix.shape[1] != self._dimensions:
            raise bad(f"answered {matrix.shape[1]} dimensions, not {self._dimensions}")
        if not np.linalg.norm(matrix, axis=1).all():
            raise bad("answered an all-zero embedding")
        usage = answer.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return _unit_rows(matrix), tokens if type(tokens) is int and tokens >= 0 else 0


def _verified(path: Path, sha256: str | None, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EmbeddingUnavailable(f"cannot read the {what} {path}: {exc.strerror}") from None
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise EmbeddingUnavailable(
                f"the {what} {path} has sha256 {actual}, not the pinned {sha256.lower()}; "
                "refusing to load it"
            )
    return data


def _texts(texts: Sequence[str]) -> list[str]:
    # A str is a Sequence[str] too: it would be embedded one character at a time.
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    batch = list(texts)
    if not batch:
        raise ValueError("no texts to embed")
    if not all(isinstance(text, str) for text in batch):
        raise TypeError("texts must all be strings")
    return batch


def _unit_rows(matrix: npt.NDArray[Any]) -> Vectors:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit: Vectors = (matrix / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)
    return unit


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped (or FastAPI-shaped) error body, else the body."""
    try:
        answer = json.loads(body)
    except ValueError:
        return _quote(body)
    if isinstance(answer, dict):
        error = answer.get("error", answer.get("detail", answer.get("message")))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _quote(error["message"].encode())
        if isinstance(error, str):
            return _quote(error.encode())
        if error is not None:
            return _quote(json.dumps(error).encode())
    return _quote(body)


def _quote(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return "(empty body)"
    return text if len(text) <= ERROR_QUOTE_CHARS else text[:ERROR_QUOTE_CHARS] + "..."
