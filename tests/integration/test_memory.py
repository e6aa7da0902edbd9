"""The memory layer through a real gateway: ingest, retrieval, isolation, grounding, deletion.

Every test runs `sovereign-gateway` on loopback with the embedded MiniLM model, the
embedded Qdrant Edge store and a file KEK. Chat answers come from `bench/fixed_upstream.py`
(standing in for vLLM, which needs a GPU): asked `echo-prompt: ...` it returns the whole
prompt it received, so a test sees exactly what the gateway grounded the model on.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration import documents
from tests.integration.conftest import GatewayFactory, RunningGateway

# Lines under identity.roles, then identity.clearances: query alone grants no clearance.
ROLES = """\
    hr: [chat, ingest, query]
    legal: [chat, ingest, query]
    reader: [ingest, query]
  clearances:
    hr: confidential
"""
MEMORY = """\
  restricted_tags:
    hr: [hr, admin]
    legal: [legal, admin]
"""


def memory_gateway(factory: GatewayFactory, **options: Any) -> RunningGateway:
    options.setdefault("roles", ROLES)
    options.setdefault("memory", MEMORY)
    return factory(**options)


def ingest(gateway: RunningGateway, token: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = gateway.call("POST", "/ingest", body, token=token)
    return status, json.loads(raw)


def query(
    gateway: RunningGateway, token: str, text: str, **options: Any
) -> tuple[int, dict[str, Any]]:
    status, _, raw = gateway.call("POST", "/query", {"query": text, **options}, token=token)
    return status, json.loads(raw)


def test_ingest_every_format_as_json_or_multipart_and_find_it(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    admin = gateway.token("ada", ("admin",))
    sources: dict[str, tuple[str, bytes]] = {
        "text/plain": ("notes.txt", b"The ward's oxygen supply is checked every morning at six."),
        "text/markdown": ("plan.md", b"# Plan\n\nThe **backup generator** is tested on Fridays."),
        "text/html": ("page.html", documents.html("Visitors", "Visiting hours end at eight.")),
        "application/pdf": ("report.pdf", documents.pdf("The MRI scanner is serviced in May.")),
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document": (
            "rota.docx",
            documents.docx_bytes(
                "The night rota is published on Sundays.",
                table=[["Shift", "Lead"], ["Night", "Dr. Okafor"]],
            ),
        ),
    }
    ids = {}
    for index, (media_type, (filename, content)) in enumerate(sources.items()):
        if index % 2:
            raw, content_type = documents.multipart(
                {"title": filename, "tags": "ops, ward", "classification": "internal"},
                (filename, media_type, content),
            )
            status, _, body = gateway.call(
                "POST", "/ingest", raw=raw, headers={"content-type": content_type}, token=admin
            )
            answer = json.loads(body)
        else:
            status, answer = ingest(
                gateway,
                admin,
                content=documents.b64(content),
                filename=filename,
                title=filename,
                tags=["ops", "ward"],
            )
        assert status == 201, answer
        digest = hashlib.sha256(content).hexdigest()
        assert answer["id"] == digest
        assert answer["digest"] == f"sha256:{digest}"
        assert answer["chunks"] >= 1
        assert answer["media_type"] == media_type
        assert answer["owner"] == "ada"
        assert answer["tags"] == ["ops", "ward"]
        ids[media_type] = digest

    for question, media_type, words in [
        ("When is the MRI scanner serviced?", "application/pdf", "serviced in May"),
        ("Who leads the night shift?", sources_key(sources, "rota.docx"), "Okafor"),
        ("When do visiting hours end?", "text/html", "Visiting hours end at eight"),
        ("How often is the generator tested?", "text/markdown", "backup generator"),
    ]:
        status, found = query(gateway, admin, question, top_k=1)
        assert status == 200, found
        best = found["data"][0]
        assert best["document"] == ids[media_type], (question, found)
        assert words in best["text"]
        assert "script text" not in best["text"]


def sources_key(sources: dict[str, tuple[str, bytes]], filename: str) -> str:
    return next(key for key, (name, _) in sources.items() if name == filename)


def test_ingest_is_idempotent_and_refuses_the_same_content_under_other_metadata(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("ada", ("admin",))
    status, first = ingest(gateway, token, text="Drug trial results are embargoed until June.")
    assert status == 201
    status, again = ingest(gateway, token, text="Drug trial results are embargoed until June.")
    assert status == 200
    assert again["created"] is False
    assert again["id"] == first["id"]
    assert again["chunks"] == first["chunks"]
    status, conflict = ingest(
        gateway, token, text="Drug trial results are embargoed until June.", classification="secret"
    )
    assert status == 409
    assert conflict["error"]["code"] == "document_exists"
    assert "classification" in conflict["error"]["message"]
    status, found = query(gateway, token, "When are the trial results released?", top_k=10)
    assert [hit["document"] for hit in found["data"]] == [first["id"]]


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"content": "not base64!"}, 400, "invalid_base64", "content"),
        ({"text": "a", "content": "YQ=="}, 400, "invalid_request", "content"),
        ({}, 400, "invalid_request", "content"),
        ({"text": "x", "classification": "top-secret"}, 400, "invalid_type", "classification"),
        ({"text": "x", "tags": ["no spaces allowed"]}, 400, "invalid_type", "tags.0"),
        ({"text": "x", "retention": "forever"}, 400, "invalid_type", "retention"),
        ({"text": "x", "colour": "red"}, 400, "invalid_type", "colour"),
        (
            {"content": documents.b64(b"%PDF-1.4 not really"), "media_type": "application/pdf"},
            422,
            "document_rejected",
            "content",
        ),
        (
            {"content": documents.b64(b"\xff\xfe\x00bad"), "filename": "a.txt"},
            422,
            "document_rejected",
            "content",
        ),
    ],
)
def test_ingest_refuses_bad_input_naming_the_field_and_stores_nothing(
    gateway_factory: GatewayFactory, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("ada", ("admin",))
    got, answer = ingest(gateway, token, **body)
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["param"] == param
    assert "Traceback" not in json.dumps(answer)
    counts = json.loads(gateway.call("GET", "/health")[2])["components"]["memory"]["detail"]
    assert counts.startswith("0 document(s), 0 chunk(s)")


def test_ingest_refuses_a_document_over_the_size_limit(gateway_factory: GatewayFactory) -> None:
    gateway = memory_gateway(gateway_factory, memory=MEMORY + "  max_document_bytes: 2048\n")
    token = gateway.token("ada", ("admin",))
    status, answer = ingest(gateway, token, text="x" * 2049)
    assert status == 413
    assert answer["error"]["code"] == "document_too_large"
    status, answer = ingest(gateway, token, content=documents.b64(b"y" * 100_000))
    assert status == 413
    assert answer["error"]["code"] == "body_too_large"


def corpus(gateway: RunningGateway) -> dict[str, str]:
    """One document per access rule; gives name -> document id."""
    admin = gateway.token("ada", ("admin",))
    hr = gateway.token("hana", ("hr",))
    bob = gateway.token("bob", ("legal",))
    plan = [
        ("public", admin, {"classification": "public"}, "The cafeteria opens at seven."),
        ("internal", admin, {"classification": "internal"}, "The cafeteria menu changes weekly."),
        (
            "confidential",
            admin,
            {"classification": "confidential"},
            "Cafeteria staff salaries rise.",
        ),
        ("secret", admin, {"classification": "secret"}, "The cafeteria is closing for good."),
        ("hr", hr, {"classification": "internal", "tags": ["hr"]}, "Cafeteria staff complaint."),
        (
            "legal",
            bob,
            {"classification": "internal", "tags": ["legal"]},
            "Cafeteria lease dispute.",
        ),
    ]
    ids = {}
    for name, token, meta, text in plan:
        status, answer = ingest(gateway, token, text=text, **meta)
        assert status == 201, (name, answer)
        ids[name] = answer["id"]
    return ids


def visible_to(gateway: RunningGateway, token: str, ids: dict[str, str]) -> set[str]:
    status, found = query(gateway, token, "What is happening with the cafeteria?", top_k=100)
    assert status == 200, found
    names = {value: key for key, value in ids.items()}
    return {names[hit["document"]] for hit in found["data"]}


def test_retrieval_never_returns_a_chunk_above_the_callers_clearance(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    ids = corpus(gateway)
    service = gateway.token("sovereign-memory", ("service",), client_id="sovereign-memory")
    expected = {
        # admin: secret clearance and every restricted tag
        gateway.token("ada", ("admin",)): {
            "public",
            "internal",
            "confidential",
            "secret",
            "hr",
            "legal",
        },
        # hr: confidential by profile, and the hr tag
        gateway.token("hana", ("hr",)): {"public", "internal", "confidential", "hr"},
        # legal: internal by profile, the legal tag (and owns the legal document)
        gateway.token("bob", ("legal",)): {"public", "internal", "legal"},
        # another legal member: the tag, not the ownership, lets them read it
        gateway.token("lena", ("legal",)): {"public", "internal", "legal"},
        # the internal retrieval client: full clearance, but no restricted tag
        service: {"public", "internal", "confidential", "secret"},
    }
    for token, names in expected.items():
        assert visible_to(gateway, token, ids) == names
    # A user whose roles grant no query is refused outright, not shown an empty list.
    status, answer = query(gateway, gateway.token("carl", ("user",)), "cafeteria")
    assert status == 403
    assert answer["error"]["code"] == "policy_denied"


def test_an_owner_reads_a_restricted_tag_on_their_own_document(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("rita", ("reader",))
    status, answer = ingest(gateway, token, text="Rita's HR appeal letter.", tags=["hr"])
    assert status == 201, answer
    other = gateway.token("otto", ("reader",))
    status, found = query(gateway, token, "appeal letter")
    assert [hit["document"] for hit in found["data"]] == [answer["id"]]
    status, found = query(gateway, other, "appeal letter")
    assert found["data"] == []


def test_query_filters_narrow_within_what_policy_allows(gateway_factory: GatewayFactory) -> None:
    gateway = memory_gateway(gateway_factory)
    ids = corpus(gateway)
    hr = gateway.token("hana", ("hr",))
    status, found = query(gateway, hr, "cafeteria", top_k=100, filter={"tags": ["hr", "legal"]})
    assert [hit["document"] for hit in found["data"]] == [ids["hr"]]
    status, found = query(
        gateway, hr, "cafeteria", top_k=100, filter={"classifications": ["secret", "public"]}
    )
    assert [hit["document"] for hit in found["data"]] == [ids["public"]]
    status, found = query(
        gateway, hr, "cafeteria", top_k=100, filter={"documents": [ids["secret"]]}
    )
    assert found["data"] == []
    status, answer = query(gateway, hr, "cafeteria", filter={"documents": ["nope"]})
    assert status == 400
    assert answer["error"]["param"] == "filter.documents.0"


def test_chat_is_never_grounded_above_the_callers_clearance(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    admin = gateway.token("ada", ("admin",))
    secret_fact = documents.canary()
    status, secret = ingest(
        gateway,
        admin,
        text=f"The launch code of Project Zephyr is {secret_fact}.",
        classification="secret",
        title="Zephyr launch",
    )
    assert status == 201
    status, internal = ingest(
        gateway,
        admin,
        text="Project Zephyr launches from the north pad in spring.",
        classification="internal",
        title="Zephyr schedule",
    )
    assert status == 201

    def grounded(token: str, **extra: Any) -> tuple[str, list[dict[str, Any]]]:
        status, answer = gateway.chat(
            "echo-prompt: What is the launch code of Project Zephyr?", token, **extra
        )
        assert status == 200, answer
        return answer["choices"][0]["message"]["content"], answer.get("citations")

    prompt, citations = grounded(gateway.token("uma", ("user",)), retrieval=True)
    assert secret_fact not in prompt
    assert "north pad" in prompt
    assert "untrusted document content" in prompt
    assert [c["document"] for c in citations] == [internal["id"]]
    assert set(citations[0]) == {"document", "chunk", "score", "title"}
    # The positive control: the same question from a cleared caller reaches the secret.
    prompt, citations = grounded(admin, retrieval={"top_k": 2})
    assert secret_fact in prompt
    assert {c["document"] for c in citations} == {secret["id"], internal["id"]}
    # Without retrieval (the profile's default here) nothing is added.
    prompt, citations = grounded(admin)
    assert citations is None
    assert "north pad" not in prompt
    grounding = [r for r in gateway.records() if (r.get("memory") or {}).get("retrieved")]
    assert any(r["actor"]["sub"] == "uma" for r in grounding)
    for record in grounding:
        if record["actor"]["sub"] == "uma":
            assert secret["id"] not in json.dumps(record)


def test_streaming_chat_carries_citations_in_a_leading_chunk(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory, memory=MEMORY + "  retrieval:\n    chat: true\n")
    token = gateway.token("ada", ("admin",))
    status, doc = ingest(gateway, token, text="The helipad lights are tested nightly.")
    assert status == 201
    status, _, raw = gateway.call(
        "POST",
        "/v1/chat/completions",
        {
            "model": "echo-1",
            "stream": True,
            "messages": [{"role": "user", "content": "When are the helipad lights tested?"}],
        },
        token=token,
    )
    assert status == 200
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    lead = json.loads(events[0])
    assert lead["choices"] == []
    assert [c["document"] for c in lead["citations"]] == [doc["id"]]
    assert events[-1] == "[DONE]"


def test_delete_crypto_shreds_the_document(gateway_factory: GatewayFactory) -> None:
    gateway = memory_gateway(gateway_factory)
    owner = gateway.token("ada", ("admin",))
    status, doc = ingest(gateway, owner, text="Room 12 is reserved for the inspection.")
    assert status == 201
    catalog = gateway.home / "memory" / "catalog.db"
    with sqlite3.connect(catalog) as db:
        wrapped, sealed_meta = db.execute(
            "SELECT wrapped_key, sealed_meta FROM documents WHERE id = ?", (doc["id"],)
        ).fetchone()
    stranger = gateway.token("uma", ("user",))
    status, _, raw = gateway.call("DELETE", f"/documents/{doc['id']}", token=stranger)
    # Another user with ingest permission may not delete someone else's document.
    assert status == 403, raw
    ciphertext = gateway.home / "memory" / "sealed" / f"{doc['id']}.sealed"
    assert ciphertext.exists()
    backup = ciphertext.read_bytes()
    status, _, raw = gateway.call("DELETE", f"/documents/{doc['id']}", token=owner)
    assert status == 200, raw
    assert json.loads(raw) == {"id": doc["id"], "object": "document.deleted", "deleted": True}
    # The data key is gone from every file, so a copy of the ciphertext is noise now.
    for file in (gateway.home / "memory").rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            assert bytes(wrapped) not in content, file
            assert bytes(sealed_meta) not in content, file
    assert not ciphertext.exists()
    assert b"Room 12" not in backup
    status, found = query(gateway, owner, "Which room is reserved?")
    assert found["data"] == []
    status, _, raw = gateway.call("DELETE", f"/documents/{doc['id']}", token=owner)
    assert status == 404
    status, _, raw = gateway.call("DELETE", "/documents/not-an-id", token=owner)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "document_id"
    actions = [
        (r["action"], r["status"]) for r in gateway.records() if r.get("phase") == "complete"
    ]
    assert ("delete", 200) in actions
    assert ("delete", 403) in actions
    assert ("ingest", 201) in actions


def test_a_document_above_clearance_cannot_be_deleted_or_probed(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = memory_gateway(gateway_factory)
    ids = corpus(gateway)
    hr = gateway.token("hana", ("hr",))
    status, _, raw = gateway.call("DELETE", f"/documents/{ids['secret']}", token=hr)
    assert status == 404
    assert json.loads(raw)["error"]["code"] == "document_not_found"


def test_retention_expires_documents_and_audits_it(gateway_factory: GatewayFactory) -> None:
    gateway = memory_gateway(gateway_factory, memory=MEMORY + "  retention_interval: 1s\n")
    token = gateway.token("ada", ("admin",))
    status, short = ingest(gateway, token, text="A visitor pass valid today only.", retention="1s")
    assert status == 201
    status, long = ingest(gateway, token, text="The building's fire exits are marked green.")
    assert status == 201
    # Hidden as soon as it expires, shredded (and audited) by the next retention run.
    deadline = time.monotonic() + 20
    while not any(r.get("action") == "memory.retention" for r in gateway.records()):
        if time.monotonic() > deadline:
            pytest.fail("no retention run shredded the expired document")
        time.sleep(0.5)
    found = query(gateway, token, "visitor pass", top_k=10)[1]["data"]
    assert short["id"] not in {hit["document"] for hit in found}
    assert not (gateway.home / "memory" / "sealed" / f"{short['id']}.sealed").exists()
    kept = query(gateway, token, "fire exits")[1]["data"]
    assert long["id"] in {hit["document"] for hit in kept}
    expired = [r for r in gateway.records() if r.get("action") == "memory.retention"]
    assert [r["memory"]["document"] for r in expired] == [short["id"]]


def test_embeddings_through_the_openai_sdk_and_the_internal_endpoint(
    gateway_factory: GatewayFactory,
) -> None:
    openai = pytest.importorskip("openai")
    gateway = memory_gateway(gateway_factory)
    user = gateway.token("uma", ("user",))
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=user) as client:
        # The SDK asks for base64 and decodes it; the vectors are unit length.
        result = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a kitten"])
        assert [len(item.embedding) for item in result.data] == [384, 384]
        cosine = sum(
            a * b for a, b in zip(result.data[0].embedding, result.data[1].embedding, strict=True)
        )
        assert cosine > 0.6
        assert result.usage.prompt_tokens > 0
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="text-embedding-3-small", input="x")
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="all-minilm-l6-v2", input="x", dimensions=128)
    status, _, raw = gateway.call("POST", "/embed", {"input": "a cat"}, token=user)
    assert status == 403
    service = gateway.token("sovereign-memory", ("service",), client_id="sovereign-memory")
    status, _, raw = gateway.call("POST", "/embed", {"input": ["a cat"]}, token=service)
    assert status == 200
    vector = json.loads(raw)["data"][0]["embedding"]
    assert vector == pytest.approx(result.data[0].embedding, abs=1e-5)


def test_a_wrong_key_file_keeps_memory_closed_and_chat_open(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    first = memory_gateway(gateway_factory, name="node")
    token = first.token("ada", ("admin",))
    assert ingest(first, token, text="The pharmacy restocks on Tuesdays.")[0] == 201
    first.stop()
    key_file = first.home / "keys" / "memory.kek"
    key_file.write_bytes(bytes(32))
    second = memory_gateway(gateway_factory, name="node")
    token = second.token("ada", ("admin",))
    health = json.loads(second.call("GET", "/health")[2])
    assert health["components"]["memory"]["ready"] is False
    assert "key file" in health["components"]["memory"]["detail"]
    status, answer = query(second, token, "pharmacy")
    assert status == 503
    assert answer["error"]["code"] == "memory_unavailable"
    assert second.chat("hello", token)[0] == 200
    status, answer = second.chat("hello", token, retrieval=True)
    assert status == 503


def test_tampered_ciphertext_is_refused_never_returned(gateway_factory: GatewayFactory) -> None:
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("ada", ("admin",))
    status, doc = ingest(gateway, token, text="The lab freezer holds samples at minus eighty.")
    assert status == 201
    sealed = gateway.home / "memory" / "sealed" / f"{doc['id']}.sealed"
    flipped = bytearray(sealed.read_bytes())
    flipped[20] ^= 0x01
    sealed.write_bytes(bytes(flipped))
    status, answer = query(gateway, token, "freezer temperature")
    assert status == 500
    assert answer["error"]["code"] == "memory_integrity_error"
    assert "minus eighty" not in json.dumps(answer)


@pytest.mark.parametrize("dlp", ["block", "redact"])
def test_retrieved_excerpts_pass_dlp_before_they_reach_the_model(
    gateway_factory: GatewayFactory, dlp: str
) -> None:
    gateway = memory_gateway(gateway_factory, dlp=dlp)
    admin = gateway.token("ada", ("admin",))
    status, flagged = ingest(
        gateway, admin, text="Ward 9 admission: the patient's SSN is 078-05-1120."
    )
    assert status == 201
    status, clean = ingest(gateway, admin, text="Ward 9 admissions close at nine at night.")
    assert status == 201
    status, answer = gateway.chat(
        "echo-prompt: When are Ward 9 admissions?", admin, retrieval={"top_k": 2}
    )
    assert status == 200, answer
    prompt = answer["choices"][0]["message"]["content"]
    cited = {citation["document"] for citation in answer["citations"]}
    assert "078-05-1120" not in prompt
    assert "close at nine" in prompt
    if dlp == "block":
        assert cited == {clean["id"]}
    else:
        assert cited == {clean["id"], flagged["id"]}
        assert "[REDACTED:us_ssn]" in prompt
    grounded = [r for r in gateway.records() if (r.get("memory") or {}).get("retrieved")]
    assert grounded[-1]["memory"]["withheld_by_dlp"] == (1 if dlp == "block" else 0)
