"""A fixed-latency OpenAI-compatible upstream on loopback, for gateway tests and benchmarks.

It stands in for vLLM, which needs a GPU this machine does not have. It echoes the last
user message (so callers can see what reached the model) after a fixed delay. A last
message that starts with `echo-prompt:` gets the whole prompt back instead, as JSON, so a
test can see everything the gateway put before it (retrieved context, for one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def create_app(latency_s: float) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "bench"}],
            }
        )

    async def chat(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        if latency_s:
            await asyncio.sleep(latency_s)
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content", "")
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
        reply = json.dumps(messages) if text.startswith("echo-prompt:") else f"echo: {text}"
        created = int(time.time())
        model = body.get("model", "echo")
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(reply.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-echo",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        async def events() -> Any:
            for index, word in enumerate(reply.split(" ")):
                chunk = {
                    "id": "chatcmpl-echo",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": word if index == 0 else f" {word}"},
                            "finish_reason": None,
                        }
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
            final = {
                "id": "chatcmpl-echo",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": usage,
            }
            yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.latency_ms / 1000),
        host="127.0.0.1",
        port=args.port,
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
