"""`POST /v1/embeddings` (OpenAI-compatible) and `POST /embed` (internal service clients):
vectors from the memory's embedding model for allowed texts, as floats or base64.
"""

from __future__ import annotations

import base64

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.endpoints import Endpoints
from sovereign_gateway.errors import ApiError
from sovereign_gateway.guard import Call
from sovereign_gateway.policy import Decision
from sovereign_gateway.schemas import EmbeddingsRequest, EmbedRequest


class EmbeddingEndpoints(Endpoints):
    def routes(self) -> list[Route]:
        return [
            self.guard.route(
                "/v1/embeddings", "embeddings", EmbeddingsRequest, self.embeddings, "POST"
            ),
            self.guard.route("/embed", "embed", EmbedRequest, self.embed, "POST"),
        ]

    async def embed(
        self, call: Call, body: EmbedRequest, route: ModelRoute | None, decision: Decision
    ) -> Response:
        return await self._vectors(body.inputs(), "float")

    async def embeddings(
        self, call: Call, body: EmbeddingsRequest, route: ModelRoute | None, decision: Decision
    ) -> Response:
        model = self.parts.config.memory.embeddings
        if body.model != model.model:
            raise ApiError(
                404,
                f"the embedding model {body.model!r} does not exist on this node; it serves "
                f"{model.model!r}",
                "model_not_found",
                param="model",
            )
        if body.dimensions is not None and body.dimensions != model.dimensions:
            raise ApiError(
                400,
                f"dimensions: {model.model} gives {model.dimensions} dimensions and cannot "
                f"shorten them",
                "unsupported_parameter",
                param="dimensions",
            )
        return await self._vectors(body.texts(), body.encoding_format or "float")

    async def _vectors(self, inputs: list[str], encoding: str) -> Response:
        memory = self.parts.require_memory()
        result = await memory.embed(inputs)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if encoding == "base64"
                else vector.tolist(),
            }
            for index, vector in enumerate(result.vectors)
        ]
        return JSONResponse(
            {
                "object": "list",
                "model": memory.embedder.model,
                "data": data,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "total_tokens": result.prompt_tokens,
                },
            }
        )
