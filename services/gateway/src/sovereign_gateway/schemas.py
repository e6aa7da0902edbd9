"""Request and response shapes of the gateway's API, and the OpenAPI document built from them.

Takes raw request bodies; gives validated models, or `ApiError` 400 naming the bad field.
The OpenAPI document is generated from these same models, so it cannot drift from them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from sovereign_gateway.errors import ApiError


class _Request(BaseModel):
    # Unknown OpenAI parameters pass through to the engine; known ones are type-checked.
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # OpenAI takes up to 4 stop sequences; an empty one would stop before the first token.
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = (
        None
    )
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    # llama.cpp's extension (vLLM calls its own repetition_penalty).
    repeat_penalty: float | None = Field(default=None, gt=0, le=2)
    n: int | None = Field(default=None, ge=1, le=8)
    user: str | None = None

    def texts(self) -> list[str]:
        found: list[str] = []
        for message in self.messages:
            if isinstance(message.content, str):
                found.append(message.content)
            elif message.content is not None:
                found.extend(part.text for part in message.content)
        return found


class EmbeddingsRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class IngestRequest(_Request):
    content: str = Field(min_length=1, description="the document, text or base64")
    title: str | None = None
    classification: Literal["public", "internal", "confidential", "secret"] = "internal"

    def texts(self) -> list[str]:
        return []


class EmbedRequest(_Request):
    input: str | list[str] = Field(min_length=1)

    def texts(self) -> list[str]:
        return []


class QueryRequest(_Request):
    query: str = Field(min_length=1)
    top_k: int = Field(default=5, ge=1, le=100)

    def texts(self) -> list[str]:
        return [self.query]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ComponentHealth(BaseModel):
    ready: bool
    detail: str


class ReplicaHealth(BaseModel):
    replica: str
    state: Literal["ready", "starting", "down", "refused"]
    detail: str


class ModelHealth(BaseModel):
    ready: bool
    engine: str
    in_flight: int
    waiting: int
    replicas: list[ReplicaHealth]


class Health(BaseModel):
    status: Literal["ok"]
    ready: bool
    profile: str
    components: dict[str, ComponentHealth]
    models: dict[str, ModelHealth]
    lock: dict[str, Any]


def parse(raw: bytes, model: type[_Request]) -> Any:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = _most_telling(exc)
        field = ".".join(str(p) for p in first["loc"] if not _UNION_TAG.match(str(p))) or "body"
        raise ApiError(400, f"{field}: {first['msg']}", "invalid_type", param=field) from None


# Pydantic names the member of a union it tried (`str`, `list[...]`) inside an error's loc.
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[A-Za-z_-]+\[.*\])$")


def _most_telling(exc: ValidationError) -> ErrorDetails:
    """For a union, the error of the member the value was meant for, not "wrong type"."""
    errors = exc.errors(include_url=False)
    for error in errors:
        if not error["type"].endswith("_type"):
            return error
    return errors[0]


_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _operation(
    summary: str,
    request: type[BaseModel] | None,
    ok: dict[str, Any],
    *,
    secured: bool = True,
    refusals: tuple[int, ...] = (400, 401, 403, 404, 413, 503),
) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    responses: dict[str, Any] = {"200": ok}
    for status in refusals:
        responses[str(status)] = {"description": f"refused ({status})", "content": error}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{request.__name__}"}}
            },
        }
    operation["security"] = _SECURED if secured else []
    return operation


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(version: str) -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        ChatCompletionRequest,
        EmbeddingsRequest,
        IngestRequest,
        EmbedRequest,
        QueryRequest,
        ErrorResponse,
        ModelList,
        Health,
    ]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    object_schema = {"type": "object"}
    not_yet = (400, 401, 403, 404, 413, 501, 503)
    internal = (400, 401, 403, 413, 501, 503)
    return {
        "openapi": "3.1.0",
        "info": {"title": "SovereignStack gateway", "version": version},
        "paths": {
            "/v1/chat/completions": {
                "post": _operation(
                    "OpenAI-compatible chat completion; `stream: true` answers with SSE",
                    ChatCompletionRequest,
                    {
                        "description": "a chat completion, or an SSE stream of chunks",
                        "content": {
                            "application/json": {"schema": object_schema},
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    refusals=(400, 401, 403, 404, 413, 429, 502, 503, 504),
                )
            },
            "/v1/models": {
                "get": _operation(
                    "the models this caller may use",
                    None,
                    _json({"$ref": "#/components/schemas/ModelList"}, "the caller's models"),
                    refusals=(401, 403, 503),
                )
            },
            "/v1/embeddings": {
                "post": _operation(
                    "OpenAI-compatible embeddings",
                    EmbeddingsRequest,
                    _json(object_schema, "embeddings"),
                    refusals=not_yet,
                )
            },
            "/ingest": {
                "post": _operation(
                    "document ingestion",
                    IngestRequest,
                    _json(object_schema, "ingested"),
                    refusals=internal,
                )
            },
            "/embed": {
                "post": _operation(
                    "vector embedding, for service clients only",
                    EmbedRequest,
                    _json(object_schema, "vectors"),
                    refusals=internal,
                )
            },
            "/query": {
                "post": _operation(
                    "memory retrieval, for service clients only",
                    QueryRequest,
                    _json(object_schema, "matches"),
                    refusals=internal,
                )
            },
            "/health": {
                "get": {
                    "summary": "liveness, and readiness per component",
                    "security": [],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Health"}, "ready"),
                        "503": _json({"$ref": "#/components/schemas/Health"}, "not ready"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "metrics in the Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
