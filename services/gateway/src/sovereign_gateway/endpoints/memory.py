"""`POST /ingest`, `POST /query`, `DELETE /documents/{id}`: the caller's encrypted memory.

Takes allowed requests; gives documents stored, chunks the policy's `memory_access` lets
the caller read, and documents shredded. Chat's retrieval uses the helpers here.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sovereign_gateway.contract import ModelRoute, duration_seconds
from sovereign_gateway.endpoints import Endpoints
from sovereign_gateway.errors import ApiError
from sovereign_gateway.guard import Call, denied
from sovereign_gateway.memory.service import DocumentMeta, Match, visible
from sovereign_gateway.memory.store import Access, Where
from sovereign_gateway.policy import Decision
from sovereign_gateway.schemas import IngestRequest, QueryFilter, QueryRequest

DOCUMENT_ID = re.compile(r"[0-9a-f]{64}")


class MemoryEndpoints(Endpoints):
    def routes(self) -> list[Route]:
        return [
            self.guard.route("/ingest", "ingest", IngestRequest, self.ingest, "POST"),
            self.guard.route("/query", "query", QueryRequest, self.query, "POST"),
            self.guard.route("/documents/{document_id}", "delete", None, self.delete, "DELETE"),
        ]

    async def ingest(
        self, call: Call, body: IngestRequest, route: ModelRoute | None, decision: Decision
    ) -> Response:
        memory = self.parts.require_memory()
        content = body.document()
        limit = self.parts.config.memory.max_document_bytes
        if len(content) > limit:
            raise ApiError(
                413,
                f"content: the document is {len(content)} bytes, more than the {limit} allowed",
                "document_too_large",
                param="content",
            )
        meta = DocumentMeta(
            classification=body.classification,
            owner=body.resource(call.principal.sub if call.principal else "")["owner"],
            tags=tuple(sorted(set(body.tags))),
            title=body.title,
            retention_seconds=None if body.retention is None else duration_seconds(body.retention),
            media_type=body.media_type,
            filename=body.filename,
        )
        result = await memory.ingest(content, meta, access(decision))
        call.memory = {"document": result.id, "chunks": result.chunks, "created": result.created}
        return JSONResponse(result.as_dict(), status_code=201 if result.created else 200)

    async def query(
        self, call: Call, body: QueryRequest, route: ModelRoute | None, decision: Decision
    ) -> Response:
        matches = await self.parts.require_memory().query(
            decision.mask(body.query),
            body.top_k,
            access(decision),
            narrowing(body.filter),
            body.min_score,
        )
        call.memory = {"retrieved": [cited(match, title=False) for match in matches]}
        return JSONResponse({"object": "list", "data": [match.as_dict() for match in matches]})

    async def delete(
        self, call: Call, body: None, route: ModelRoute | None, decision: Decision
    ) -> Response:
        doc_id = call.params["document_id"]
        if not DOCUMENT_ID.fullmatch(doc_id):
            raise ApiError(
                400,
                f"document_id: {doc_id[:80]!r} is not a document id (64 lowercase hex digits, "
                "the SHA-256 of the document)",
                "invalid_request",
                param="document_id",
            )
        memory = self.parts.require_memory()
        record = await memory.document(doc_id)
        # A document the caller cannot read is one it cannot learn exists, either.
        if record is None or not visible(access(decision), record):
            raise ApiError(404, f"document {doc_id} does not exist", "document_not_found")
        verdict = await self.guard.ask(
            call.principal,
            "delete",
            None,
            [],
            call.resource,
            {
                "classification": record.classification,
                "owner": record.owner,
                "tags": list(record.tags),
            },
        )
        if not verdict.allow:
            raise ApiError(403, f"request denied by policy: {denied(verdict)}", "policy_denied")
        await memory.delete(doc_id)
        call.memory = {"document": doc_id, "deleted": True}
        return JSONResponse({"id": doc_id, "object": "document.deleted", "deleted": True})


def access(decision: Decision) -> Access:
    """The policy's retrieval filter; one that cannot be used refuses the request."""
    granted: Any = decision.obligations.get("memory_access")
    try:
        return Access(
            classifications=tuple(granted["classifications"]),
            subject=granted["subject"],
            denied_tags=tuple(granted["denied_tags"]),
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise ApiError(
            503,
            f"the policy's memory_access obligation cannot be used: {exc}",
            "policy_unavailable",
        ) from None


def narrowing(query_filter: QueryFilter | None) -> Where | None:
    """What the caller asked to narrow retrieval to, within what the policy grants."""
    if query_filter is None:
        return None
    return Where(
        doc_ids=tuple(query_filter.documents),
        tags_any=tuple(query_filter.tags),
        classifications=tuple(query_filter.classifications),
        owner=query_filter.owner,
    )


def cited(match: Match, *, title: bool = True) -> dict[str, Any]:
    """A citation for the caller; the audit's copy leaves out the title, which is sealed."""
    citation: dict[str, Any] = {
        "document": match.doc_id,
        "chunk": match.chunk,
        "score": round(match.score, 6),
    }
    if title:
        citation["title"] = match.title
    return citation
