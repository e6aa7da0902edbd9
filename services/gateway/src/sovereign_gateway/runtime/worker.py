"""The embedded llama.cpp engine's worker process: one model, one request at a time.

Started by `embedded.EmbeddedWorker` as `python -m sovereign_gateway.runtime.worker`.
Takes JSON lines on stdin (`generate`, `cancel`); gives JSON lines on a private copy of
stdout (`ready`, `refused`, `start`, `delta`, `done`, `error`). File descriptor 1 itself is
pointed at stderr, so nothing llama.cpp prints can corrupt the protocol. It verifies the
weights' sha256 before loading them and exits 3 (after `refused`) on a mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import secrets
import sys
import threading
from collections.abc import Generator, Iterator
from typing import IO, Any, cast

EXIT_REFUSED = 3
# llama-cpp-python's own defaults for a completion. Its server differs in repeat_penalty
# (1.1), which a request may set to compare the two.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_REPEAT_PENALTY = 1.0


class Channel:
    """The protocol stream: one JSON object per line, flushed, safe from two threads."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()


class RequestError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def release_safe_text(pending: str, stops: list[str]) -> int:
    """How much of `pending` can be sent: none of it may be the start of a stop sequence."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop), len(pending)), 0, -1):
            if pending.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return len(pending) - hold


class Engine:
    def __init__(self, weights: str, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = Llama(
            model_path=weights,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.n_ctx = n_ctx
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{weights} carries no chat template (tokenizer.chat_template)")
        model = self.llm._model
        eos = model.token_get_text(self.llm.token_eos()) if self.llm.token_eos() != -1 else ""
        bos = model.token_get_text(self.llm.token_bos()) if self.llm.token_bos() != -1 else ""
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        try:
            prompt = self.formatter(messages=cast(Any, messages)).prompt
        except Exception as exc:
            raise RequestError(
                400, "invalid_messages", f"the chat template refused: {exc}"
            ) from None
        # Tokens, not text, go to llama.cpp: then the count below is exactly what it evaluates.
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))

    def generate(
        self, params: dict[str, Any], cancelled: threading.Event
    ) -> Iterator[dict[str, Any]]:
        tokens = self.prompt_tokens(params["messages"])
        prompt_count = len(tokens)
        if prompt_count >= self.n_ctx:
            raise RequestError(
                400,
                "context_length_exceeded",
                f"this model's maximum context length is {self.n_ctx} tokens; the messages "
                f"have {prompt_count} tokens",
                "messages",
            )
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            max_tokens = self.n_ctx - prompt_count
        elif prompt_count + max_tokens > self.n_ctx:
            raise RequestError(
                400,
                "context_length_exceeded",
                f"this model's maximum context length is {self.n_ctx} tokens; you requested "
                f"{prompt_count + max_tokens} tokens ({prompt_count} in the messages, "
                f"{max_tokens} for the completion)",
                "max_tokens",
            )
        yield {"event": "start", "prompt_tokens": prompt_count}

        sampled = 0

        def count(input_ids: Any, scores: Any) -> Any:
            nonlocal sampled
            sampled += 1
            return scores

        stop = params.get("stop") or []
        stops = [stop] if isinstance(stop, str) else list(stop)
        pending = ""
        finish = "length"
        end_of_generation = False
        from llama_cpp import LogitsProcessorList

        generation = self.llm.create_completion(
            tokens,
            max_tokens=max_tokens,
            temperature=params.get("temperature", DEFAULT_TEMPERATURE),
            top_p=params.get("top_p", DEFAULT_TOP_P),
            frequency_penalty=params.get("frequency_penalty", 0.0),
            presence_penalty=params.get("presence_penalty", 0.0),
            repeat_penalty=params.get("repeat_penalty", DEFAULT_REPEAT_PENALTY),
            # Without one, llama-cpp-python derives each seed from the last, so every process
            # would sample the same sequence after a start; unseeded means random here.
            seed=params["seed"] if params.get("seed") is not None else secrets.randbits(32),
            # Stop sequences are handled here, so an end-of-generation token is the only
            # reason llama.cpp itself says "stop" and the token count stays exact.
            stop=[],
            stream=True,
            logits_processor=LogitsProcessorList([count]),
        )
        stream = cast(Generator[dict[str, Any], None, None], generation)
        try:
            for chunk in stream:
                if cancelled.is_set():
                    finish = "cancelled"
                    break
                choice = chunk["choices"][0]
                pending += choice["text"]
                hit = min((pending.find(s) for s in stops if s in pending), default=-1)
                if hit >= 0:
                    if hit:
                        yield {"event": "delta", "text": pending[:hit]}
                    finish = "stop"
                    break
                ready = release_safe_text(pending, stops)
                if ready:
                    yield {"event": "delta", "text": pending[:ready]}
                    pending = pending[ready:]
                if choice["finish_reason"] is not None:
                    finish = choice["finish_reason"]
                    end_of_generation = finish == "stop"
        finally:
            stream.close()
        if pending and (end_of_generation or finish == "length"):
            # Held back as a possible stop-sequence start, but generation ended first.
            yield {"event": "delta", "text": pending}
        # The end-of-generation token is sampled but, as in OpenAI's usage, not counted.
        completion = sampled - 1 if end_of_generation else sampled
        yield {
            "event": "done",
            "finish_reason": finish,
            "prompt_tokens": prompt_count,
            "completion_tokens": max(completion, 0),
        }


def read_commands(source: IO[bytes], inbox: queue.Queue[dict[str, Any] | None],
                  cancels: dict[str, threading.Event], lock: threading.Lock) -> None:  # fmt: skip
    for line in source:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("op") == "cancel":
            with lock:
                event = cancels.get(message.get("id", ""))
            if event is not None:
                event.set()
        else:
            inbox.put(message)
    inbox.put(None)  # the gateway closed stdin: finish and exit


def serve(engine: Engine, channel: Channel) -> None:
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    cancels: dict[str, threading.Event] = {}
    lock = threading.Lock()
    threading.Thread(
        target=read_commands, args=(sys.stdin.buffer, inbox, cancels, lock), daemon=True
    ).start()
    while (message := inbox.get()) is not None:
        request_id = str(message.get("id", ""))
        cancelled = threading.Event()
        with lock:
            cancels[request_id] = cancelled
        try:
            for event in engine.generate(message, cancelled):
                channel.send({**event, "id": request_id})
        except RequestError as exc:
            channel.send(
                {
                    "event": "error",
                    "id": request_id,
                    "status": exc.status,
                    "code": exc.code,
                    "message": str(exc),
                    "param": exc.param,
                }
            )
        finally:
            with lock:
                cancels.pop(request_id, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sovereign_gateway.runtime.worker")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--sha256")
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    # The protocol gets a private duplicate of stdout; fd 1 then goes to stderr.
    channel = Channel(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    if args.sha256 is not None:
        try:
            actual = sha256_of(args.weights)
        except OSError as exc:
            channel.send({"event": "refused", "reason": f"cannot read {args.weights}: {exc}"})
            return EXIT_REFUSED
        if actual != args.sha256:
            channel.send(
                {
                    "event": "refused",
                    "reason": f"sha256 mismatch for {args.weights}: expected {args.sha256}, "
                    f"got {actual}",
                }
            )
            return EXIT_REFUSED
    try:
        engine = Engine(args.weights, args.n_ctx, args.threads)
    except ImportError as exc:
        channel.send(
            {
                "event": "refused",
                "reason": f"llama-cpp-python is not installed ({exc}); install the gateway "
                "with its llamacpp extra",
            }
        )
        return EXIT_REFUSED
    except (RuntimeError, ValueError, OSError) as exc:
        channel.send({"event": "refused", "reason": f"cannot load {args.weights}: {exc}"})
        return EXIT_REFUSED
    channel.send({"event": "ready", "pid": os.getpid(), "n_ctx": engine.n_ctx})
    serve(engine, channel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
