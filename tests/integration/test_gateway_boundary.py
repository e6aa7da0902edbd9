"""The gateway as a running process: auth, policy with DLP, lock, audit and bad input.

Takes a rendered personal profile trusting the local issuer, a real OPA where the remote
engine is used, and the loopback upstream standing in for vLLM (no GPU here).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
from typing import TYPE_CHECKING, Any

import pytest
from openai import OpenAI
from sovereign_gateway.audit import verify

if TYPE_CHECKING:
    from tests.integration.conftest import GatewayFactory, RunningGateway

SSN = "078-05-1120"
PROMPT_WITH_SSN = f"my SSN is {SSN}, please remember it"


def _events(
    gateway: RunningGateway, action: str | None = None, *, admitted: bool = False
) -> list[dict[str, Any]]:
    """The request records, without the pre-work "admitted" ones unless asked for."""
    found = [r for r in gateway.records() if r.get("type") == "event" and "resource" in r]
    found = [r for r in found if admitted or r.get("phase") != "admitted"]
    return [r for r in found if action is None or r.get("action") == action]


def _error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    return error


@pytest.fixture
def node(gateway_factory: GatewayFactory) -> RunningGateway:
    return gateway_factory()


def test_chat_is_answered_and_audited_without_plaintext(node: RunningGateway) -> None:
    token = node.token()
    prompt = "the quick brown fox"
    status, _, raw = node.call(
        "POST",
        "/v1/chat/completions",
        {"model": "echo-1", "messages": [{"role": "user", "content": prompt}]},
        token=token,
    )
    body = json.loads(raw)

    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == f"echo: {prompt}"
    assert body["model"] == "echo-1"
    admitted, record = _events(node, "chat", admitted=True)
    assert admitted["phase"] == "admitted"
    assert admitted["status"] is None
    assert admitted["decision"]["allow"] is True
    assert admitted["seq"] < record["seq"]
    assert record["status"] == 200
    assert record["actor"]["sub"] == "alice"
    assert record["actor"]["roles"] == ["user"]
    assert record["decision"]["allow"] is True
    assert record["response_digest"] == hashlib.sha256(raw).hexdigest()
    text = "".join(p.read_text() for p in node.audit_dir.glob("audit-*.jsonl"))
    assert prompt not in text
    assert token not in text


def test_an_alias_reaches_the_canonical_model(node: RunningGateway) -> None:
    status, body = node.chat("hi", node.token(), model="gpt-4o-mini")

    assert status == 200
    assert body["model"] == "echo-1"


def test_models_lists_only_what_the_caller_may_use(node: RunningGateway) -> None:
    user = json.loads(node.call("GET", "/v1/models", token=node.token())[2])
    admin = json.loads(node.call("GET", "/v1/models", token=node.token("root", ("admin",)))[2])

    assert [m["id"] for m in user["data"]] == ["echo-1"]
    assert sorted(m["id"] for m in admin["data"]) == ["echo-1", "restricted-1"]


def test_a_model_outside_the_callers_roles_is_refused_403(node: RunningGateway) -> None:
    status, body = node.chat("hi", node.token(), model="restricted-1")

    assert status == 403
    error = _error(body)
    assert error["code"] == "policy_denied"
    assert "restricted-1" in error["message"]
    assert _events(node, "chat")[-1]["status"] == 403


def test_a_role_without_the_permission_is_refused_403(node: RunningGateway) -> None:
    status, body = node.chat("hi", node.token("vera", ("viewer",)))

    assert status == 403
    assert _error(body)["code"] == "policy_denied"


@pytest.mark.parametrize(
    ("raw", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_request", None),
        (b'{"model": "echo-1", "messages": "hello"}', 400, "invalid_type", "messages"),
        (
            b'{"model": "echo-1", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": "hot"}',
            400,
            "invalid_type",
            "temperature",
        ),
        (b'{"model": "echo-1", "messages": []}', 400, "invalid_type", "messages"),
        (
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
            "model",
        ),
    ],
    ids=["malformed", "not-an-object", "wrong-type", "bad-number", "empty", "unknown-model"],
)
def test_bad_requests_get_the_openai_error_shape(
    node: RunningGateway, raw: bytes, status: int, code: str, param: str | None
) -> None:
    answer, _, body = node.call("POST", "/v1/chat/completions", raw=raw, token=node.token())

    assert answer == status
    error = _error(json.loads(body))
    assert error["code"] == code
    assert error["param"] == param
    assert _events(node, "chat")[-1]["status"] == status


def test_a_body_over_the_limit_is_refused_413(node: RunningGateway) -> None:
    big = json.dumps(
        {"model": "echo-1", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    ).encode()
    # The gateway answers from Content-Length and closes without reading the body, so the
    # client may see a broken pipe mid-send; the answer is read after it all the same.
    connection = http.client.HTTPConnection(node.url.removeprefix("http://"), timeout=30)
    headers = {"authorization": f"Bearer {node.token()}", "content-type": "application/json"}
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request("POST", "/v1/chat/completions", body=big, headers=headers)
        response = connection.getresponse()
        status, body = response.status, response.read()
    finally:
        connection.close()

    assert status == 413
    assert _error(json.loads(body))["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, "invalid_request"),
        ("Basic YWxpY2U6c2VjcmV0", "invalid_request"),
        ("Bearer not.a.jwt", "invalid_token"),
    ],
)
def test_a_missing_or_invalid_token_is_401_with_a_bearer_challenge(
    node: RunningGateway, header: str | None, error: str
) -> None:
    headers = {} if header is None else {"authorization": header}
    status, response_headers, body = node.call(
        "POST",
        "/v1/chat/completions",
        {"model": "echo-1", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )

    assert status == 401
    challenge = response_headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'error="{error}"' in challenge
    assert _error(json.loads(body))["type"] == "authentication_error"
    assert _events(node, "chat")[-1]["actor"] is None


def test_embed_accepts_only_service_clients(node: RunningGateway) -> None:
    user = node.token("root", ("admin",))
    service = node.token(
        "service-account-sovereign-memory", ("service",), client_id="sovereign-memory"
    )

    refused, _, body = node.call("POST", "/embed", {"input": "x"}, token=user)
    accepted, _, _ = node.call("POST", "/embed", {"input": "x"}, token=service)

    assert refused == 403, body
    assert "/embed accepts only service clients" in _error(json.loads(body))["message"]
    assert accepted == 200
    assert [r["status"] for r in _events(node, "embed")] == [403, 200]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/embeddings", {"model": "echo-1", "input": "x"}, 404, "model_not_found"),
        ("/ingest", {"content": "x"}, 400, "invalid_base64"),
    ],
)
def test_memory_endpoints_decide_and_audit_before_touching_memory(
    node: RunningGateway, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    got, _, answer = node.call("POST", path, body, token=node.token())

    assert got == status
    assert _error(json.loads(answer))["code"] == code
    admitted, complete = _events(node, admitted=True)[-2:]
    assert admitted["phase"] == "admitted"
    assert admitted["decision"]["allow"] is True
    assert (complete["phase"], complete["status"]) == ("complete", status)


@pytest.mark.parametrize("engine", ["embedded", "remote"])
def test_dlp_block_refuses_and_never_reaches_the_model(
    gateway_factory: GatewayFactory, engine: str
) -> None:
    node = gateway_factory(engine=engine, dlp="block")
    status, body = node.chat(PROMPT_WITH_SSN, node.token())

    assert status == 403
    assert "us_ssn" in _error(body)["message"]
    assert _events(node, "chat")[-1]["decision"]["dlp_findings"] == [{"type": "us_ssn", "count": 1}]


@pytest.mark.parametrize("engine", ["embedded", "remote"])
def test_dlp_redact_masks_what_reaches_the_model(
    gateway_factory: GatewayFactory, engine: str
) -> None:
    node = gateway_factory(engine=engine, dlp="redact")
    status, body = node.chat(PROMPT_WITH_SSN, node.token())

    assert status == 200
    answer = body["choices"][0]["message"]["content"]
    assert SSN not in answer
    assert "[REDACTED:us_ssn]" in answer


@pytest.mark.parametrize("engine", ["embedded", "remote"])
def test_dlp_log_passes_the_text_and_records_the_finding(
    gateway_factory: GatewayFactory, engine: str
) -> None:
    node = gateway_factory(engine=engine, dlp="log")
    status, body = node.chat(PROMPT_WITH_SSN, node.token())

    assert status == 200
    assert SSN in body["choices"][0]["message"]["content"]
    record = _events(node, "chat")[-1]
    assert record["decision"]["dlp_findings"] == [{"type": "us_ssn", "count": 1}]
    assert SSN not in json.dumps(record)


def test_with_the_policy_engine_down_requests_get_503_and_are_audited(
    gateway_factory: GatewayFactory,
) -> None:
    node = gateway_factory(engine="remote", with_opa=False)
    status, body = node.chat("hi", node.token())
    health_status, _, health = node.call("GET", "/health")

    assert status == 503
    assert _error(body)["code"] == "policy_unavailable"
    record = _events(node, "chat")[-1]
    assert record["status"] == 503
    assert record["refusal"] == "policy_unavailable"
    assert health_status == 503
    assert json.loads(health)["components"]["policy_engine"]["ready"] is False


def test_health_reports_each_component(node: RunningGateway) -> None:
    status, _, body = node.call("GET", "/health")
    health = json.loads(body)

    assert status == 200, health
    assert health["ready"] is True
    assert set(health["components"]) == {
        "policy_engine",
        "identity",
        "audit_log",
        "compliance_lock",
        "runtime",
        "memory",
    }
    assert health["components"]["compliance_lock"]["detail"] == "absent"
    assert health["components"]["memory"]["detail"] == (
        "0 document(s), 0 chunk(s); embedded store; file key v1; embeddings all-minilm-l6-v2"
    )
    assert health["models"]["echo-1"]["ready"] is True
    assert health["models"]["echo-1"]["engine"] == "upstream"


def test_metrics_count_requests_and_decisions(node: RunningGateway) -> None:
    node.chat("hi", node.token())
    node.chat("hi", node.token(), model="restricted-1")
    status, headers, body = node.call("GET", "/metrics")
    text = body.decode()

    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert (
        'sovereign_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    )
    assert 'sovereign_gateway_policy_decisions_total{engine="embedded",result="deny"} 1.0' in text
    assert "sovereign_gateway_request_duration_seconds_bucket" in text


def test_streaming_chat_keeps_sse_framing_and_audits_start_and_end(node: RunningGateway) -> None:
    status, headers, body = node.call(
        "POST",
        "/v1/chat/completions",
        {"model": "echo-1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]},
        token=node.token(),
    )
    events = [line for line in body.decode().split("\n\n") if line]

    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    words = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(words) == "echo: a b c"
    phases = [r["phase"] for r in _events(node, "chat", admitted=True)]
    assert phases == ["admitted", "stream_start", "stream_end"]


def test_the_official_openai_client_works_unmodified(node: RunningGateway) -> None:
    client = OpenAI(base_url=f"{node.url}/v1", api_key=node.token(), max_retries=0)

    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
    )
    streamed = client.chat.completions.create(
        model="echo-1", messages=[{"role": "user", "content": "one two"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices]
    models = [model.id for model in client.models.list()]

    assert completion.choices[0].message.content == "echo: hello there"
    assert "".join(pieces) == "echo: one two"
    assert models == ["echo-1"]


def test_audit_log_of_a_real_session_verifies(node: RunningGateway) -> None:
    for _ in range(5):
        node.chat("hi", node.token())
    node.chat("hi", node.token(), model="restricted-1")
    node.stop()

    report = verify(node.audit_dir)

    assert report.ok, report.problems
    assert report.records >= 6
    assert report.checkpoints >= 1


def test_content_capture_stores_prompts_only_when_enabled(gateway_factory: GatewayFactory) -> None:
    node = gateway_factory(capture_content=True)
    node.chat("remember the lighthouse", node.token())

    assert _events(node, "chat")[-1]["content"]["request"] == ["remember the lighthouse"]


def test_the_audit_dir_is_private(node: RunningGateway) -> None:
    node.chat("hi", node.token())

    assert os.stat(node.audit_dir).st_mode & 0o077 == 0


def test_an_unreachable_engine_is_502_and_reported_in_health(
    gateway_factory: GatewayFactory,
) -> None:
    node = gateway_factory(upstream="http://127.0.0.1:9/v1")
    status, body = node.chat("hi", node.token())
    health = json.loads(node.call("GET", "/health")[2])

    assert status == 502
    assert _error(body)["code"] == "upstream_unreachable"
    assert "127.0.0.1:9" in _error(body)["message"]
    assert _events(node, "chat")[-1]["status"] == 502
    assert health["models"]["echo-1"]["ready"] is False
    assert health["models"]["echo-1"]["replicas"][0]["state"] == "down"
    assert health["ready"] is True
