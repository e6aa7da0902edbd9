"""Request and response shapes of the gateway's API, and the OpenAPI document built from them.

Takes raw request bodies; gives validated models, or `ApiError` 400 naming the bad field.
The OpenAPI document is generated from these same models, so it cannot drift from them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from sovereign_gateway.contract import Classification
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


# The profile's tag syntax: what a payload index and a policy rule can match exactly.
Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")]
DocumentId = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Up to 100 years: beyond that an expiry overflows what the catalog stores, and no
# retention law asks for more.
RetentionDuration = Annotated[str, Field(pattern=r"^([1-9][0-9]{0,9}[smhdw]|[1-9][0-9]?y|100y)$")]


class QueryFilter(BaseModel):
    """The caller's own narrowing; policy filtering applies on top, always."""

    model_config = ConfigDict(strict=True, extra="forbid")
    documents: list[DocumentId] = Field(default_factory=list, max_length=100)
    tags: list[Tag] = Field(default_factory=list, max_length=32, description="any of these")
    classifications: list[Classification] = Field(default_factory=list)
    owner: str | None = Field(default=None, min_length=1, max_length=256)


class Retrieval(BaseModel):
    """Extension: ground this chat on the caller's documents (RAG)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    enabled: bool = True
    top_k: int | None = Field(default=None, ge=1, le=50)
    min_score: float | None = Field(default=None, ge=-1, le=1)
    filter: QueryFilter | None = None


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
    retrieval: bool | Retrieval | None = None

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
    # OpenAI's limits: at most 2048 inputs, none of them empty. Token-id inputs are not taken.
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class IngestRequest(_Strict):
    """A document and its metadata; as JSON (base64 `content`, or `text`) or multipart."""

    content: str | None = Field(default=None, min_length=1, description="the document, base64")
    text: str | None = Field(default=None, min_length=1, description="or the document as text")
    media_type: str | None = Field(
        default=None, max_length=255, description="e.g. application/pdf; else from filename"
    )
    filename: str | None = Field(default=None, min_length=1, max_length=255)
    title: str | None = Field(default=None, min_length=1, max_length=1024)
    classification: Classification = "internal"
    owner: str | None = Field(
        default=None, min_length=1, max_length=256, description="default: the caller (sub)"
    )
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    retention: RetentionDuration | None = Field(
        default=None, description="keep for this long, e.g. 30d; default: the profile's"
    )

    def texts(self) -> list[str]:
        # Documents are not DLP-scanned: they are stored for retrieval, not sent anywhere.
        return []

    def resource(self, subject: str) -> dict[str, Any]:
        """What the policy decides on: the document as it would be stored."""
        return {
            "classification": self.classification,
            "owner": self.owner or subject,
            "tags": sorted(set(self.tags)),
        }

    def document(self) -> bytes:
        if (self.content is None) == (self.text is None):
            raise ApiError(
                400,
                "content: give the document as base64 `content` or as `text`, not both",
                "invalid_request",
                param="content",
            )
        if self.text is not None:
            return self.text.encode()
        try:
            return base64.b64decode(self.content or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(
                400, f"content: not valid base64: {exc}", "invalid_base64", param="content"
            ) from None


class EmbedRequest(_Strict):
    input: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=2048)] = (
        Field(min_length=1)
    )

    def texts(self) -> list[str]:
        return []

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class QueryRequest(_Strict):
    query: str = Field(min_length=1, max_length=8192)
    top_k: int = Field(default=5, ge=1, le=100)
    min_score: float | None = Field(default=None, ge=-1, le=1)
    filter: QueryFilter | None = None

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


def parse(raw: bytes, model: type[BaseModel]) -> Any:
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
    memory = (400, 401, 403, 413, 500, 503)
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
                    refusals=(400, 401, 403, 404, 413, 503),
                )
            },
            "/ingest": {
                "post": _operation(
                    "document ingestion: JSON (base64 `content` or `text`) or multipart/form-data "
                    "with a `file` part; 201 when stored, 200 when stored already",
                    IngestRequest,
                    _json(object_schema, "the document's id, digest and chunk count"),
                    refusals=(400, 401, 403, 409, 413, 422, 500, 503),
                )
            },
            "/embed": {
                "post": _operation(
                    "vector embedding, for service clients only",
                    EmbedRequest,
                    _json(object_schema, "vectors"),
                    refusals=memory,
                )
            },
            "/query": {
                "post": _operation(
                    "memory retrieval: the top k chunks the caller's clearance allows",
                    QueryRequest,
                    _json(object_schema, "matches"),
                    refusals=memory,
                )
            },
            "/documents/{document_id}": {
                "delete": {
                    **_operation(
                        "crypto-shred a document: its data key is destroyed",
                        None,
                        _json(object_schema, "deleted"),
                        refusals=(400, 401, 403, 404, 503),
                    ),
                    "parameters": [
                        {
                            "name": "document_id",
                            "in": "path",
                            "required": True,
                            "description": "the document's SHA-256, 64 lowercase hex digits",
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        }
                    ],
                }
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


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def _multipart_parts(raw: bytes, boundary: bytes) -> list[_Part]:
    """Every part, in RAM. Starlette's form parser spools files over 1 MiB to a temporary
    file, which would put a document's plaintext on disk; this parser never does."""
    parts: list[_Part] = []
    header: list[bytes] = [b"", b""]

    def begin() -> None:
        parts.append(_Part())

    def data(buffer: bytes, start: int, end: int) -> None:
        parts[-1].data += buffer[start:end]

    def header_field(buffer: bytes, start: int, end: int) -> None:
        header[0] += buffer[start:end]

    def header_value(buffer: bytes, start: int, end: int) -> None:
        header[1] += buffer[start:end]

    def header_end() -> None:
        parts[-1].headers[header[0].decode("latin-1").lower()] = header[1].decode("latin-1")
        header[0], header[1] = b"", b""

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": begin,
            "on_part_data": data,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
        },
    )
    try:
        parser.write(raw)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(
            400, f"the multipart body is malformed: {exc}", "invalid_multipart"
        ) from None
    return parts


# Form fields of a multipart ingest, besides the `file` part.
_INGEST_FIELDS = frozenset({"title", "classification", "owner", "tags", "retention"})


def parse_ingest(raw: bytes, content_type: str) -> IngestRequest:
    """An ingest request from JSON, or from multipart/form-data with a `file` part."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        request: IngestRequest = parse(raw, IngestRequest)
        return request
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data needs a boundary", "invalid_multipart")
    fields: dict[str, Any] = {}
    tags: list[str] = []
    for part in _multipart_parts(raw, boundary):
        _, disposition = parse_options_header(part.headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            if "content" in fields:
                raise ApiError(
                    400, "file: give one file per request", "invalid_request", param="file"
                )
            fields["content"] = base64.b64encode(bytes(part.data)).decode()
            filename = disposition.get(b"filename")
            if filename:
                fields["filename"] = filename.decode("utf-8", "replace")
            declared = part.headers.get("content-type")
            if declared and declared != "application/octet-stream":
                fields["media_type"] = declared
        elif name in _INGEST_FIELDS:
            try:
                value = bytes(part.data).decode()
            except UnicodeDecodeError:
                raise ApiError(400, f"{name}: not UTF-8", "invalid_type", param=name) from None
            if name == "tags":
                tags.extend(tag.strip() for tag in value.split(",") if tag.strip())
            else:
                fields[name] = value
        else:
            raise ApiError(
                400,
                f"{name or '(unnamed)'}: unknown form field; expected file, "
                + ", ".join(sorted(_INGEST_FIELDS)),
                "invalid_request",
                param=name or None,
            )
    if "content" not in fields:
        raise ApiError(
            400, "file: a multipart ingest needs a `file` part", "invalid_request", param="file"
        )
    if tags:
        fields["tags"] = tags
    try:
        return IngestRequest.model_validate(fields)
    except ValidationError as exc:
        first = _most_telling(exc)
        name = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{name}: {first['msg']}", "invalid_type", param=name) from None
