"""The embedded (regorus) and remote (real OPA) engines decide one table of requests alike.

Takes the personal profile rendered per DLP mode, an OPA server per render; gives pass/fail per
case, and for the fail-closed paths (OPA down, no policy, silent listener, broken bundle).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from sovereign_gateway.policy import (
    Decision,
    EmbeddedEngine,
    PolicyUnavailable,
    Redaction,
    RemoteEngine,
    create_engine,
    parse_decision,
)

from sovereign import tools
from sovereign.profile.loader import load_profile
from sovereign.render import render_to

ROOT = Path(__file__).resolve().parents[2]
DECISION = "gateway/decision"
MODEL = "smollm2-135m-instruct"
MODES = ("block", "redact", "log")
TIMEOUT_S = 2.0

# Secret-looking samples are assembled at run time so that secret scanners reading this
# repository do not flag the test data itself.
PEM = (
    "-----BEGIN RSA " + "PRIVATE KEY-----\n"
    "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
    "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\n"
    "-----END RSA " + "PRIVATE KEY-----"
)
OPENAI_KEY = "sk-" + "proj-" + "Q2x5dGhlcm9ub3RhcmVhbGtleTEyMzQ1Njc4OTA"
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp" + "_" + "abcdefghijklmnopqrstuvwxyz0123456789"
SLACK_TOKEN = "xox" + "b-" + "1234567890-abcdefghijkl"
JWT = (
    "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0"
    ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)

# Positive samples: (case name, type, text sent, substring the policy must report).
DETECTED = [
    ("email", "email", "write to ada.lovelace@example.org today", "ada.lovelace@example.org"),
    ("us-ssn", "us_ssn", "my SSN is 123-45-6789.", "123-45-6789"),
    ("card", "payment_card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("iban", "iban", "IBAN DE89 3704 0044 0532 0130 00, thanks", "DE89 3704 0044 0532 0130 00"),
    ("phone-nanp", "phone", "call (555) 123-4567 after six", "(555) 123-4567"),
    ("phone-e164", "phone", "or +44 20 7946 0958 in London", "+44 20 7946 0958"),
    ("private-key", "private_key", f"here:\n{PEM}\nbye", PEM),
    ("openai-key", "api_key", f"OPENAI_API_KEY={OPENAI_KEY}", OPENAI_KEY),
    ("aws-key", "api_key", f"aws {AWS_KEY} key", AWS_KEY),
    ("github-token", "api_key", f"token {GITHUB_TOKEN}", GITHUB_TOKEN),
    ("slack-token", "api_key", f"slack {SLACK_TOKEN}", SLACK_TOKEN),
    ("jwt", "jwt", f"Authorization: Bearer {JWT}", JWT),
]

# Near misses each detector must leave alone.
NOT_DETECTED = [
    "card 4111 1111 1111 1112 fails the Luhn check",
    "SSN 000-12-3456, 666-12-3456, 912-34-5678 and 123-00-4567 are never issued",
    "IBAN DE89 3704 0044 0532 0130 01 has a wrong check digit",
    "mail ada@localhost or @ada",
    "order 2024-01-15 shipped, version 1.2.3, 12.5% more",
    "-----BEGIN PUBLIC KEY----- is fine to share",
    "disk-abcdefghijklmnopqrstuvwxyz0123 and sk-short are not keys",
    "eyJhbGciOiJIUzI1NiJ9 alone is only a header",
]


def _request(
    texts: list[str] | None = None,
    *,
    action: str = "chat",
    roles: tuple[str, ...] = ("user",),
    service: bool = False,
    model: str | None = None,
    resource: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "action": action,
        "path": "/v1/chat/completions",
        "subject": {"sub": "u-1", "client": "cli", "roles": list(roles), "service": service},
        "model": model,
        "texts": texts or [],
        "resource": resource,
    }


@dataclass(frozen=True)
class Case:
    name: str
    input: dict[str, Any]
    allow: bool = True
    reasons: tuple[str, ...] = ()
    mode: str = "redact"
    findings: dict[str, int] = field(default_factory=dict)
    redactions: tuple[tuple[str, str], ...] = ()
    clearance: str = "internal"

    def expected(self) -> Decision:
        return Decision(
            allow=self.allow,
            reasons=self.reasons,
            redactions=tuple(Redaction(type=t, text=s) for t, s in sorted(self.redactions)),
            obligations=MappingProxyType(
                {
                    "dlp_findings": [
                        {"type": kind, "count": n} for kind, n in sorted(self.findings.items())
                    ],
                    "max_classification": self.clearance,
                    "memory_access": self.memory_access(),
                }
            ),
        )

    def memory_access(self) -> dict[str, Any]:
        if "request input is missing or malformed" in self.reasons:
            return {"classifications": (), "subject": "", "denied_tags": ()}
        levels = ("public", "internal", "confidential", "secret")
        return {
            "classifications": levels[: levels.index(self.clearance) + 1],
            "subject": self.input["subject"]["sub"],
            "denied_tags": (),
        }


def _dlp_cases() -> list[Case]:
    cases = []
    for name, kind, text, match in DETECTED:
        request = _request([text])
        block = f"dlp: {kind} found in the request (mode block)"
        cases += [
            Case(f"{name}-block", request, False, (block,), "block", {kind: 1}),
            Case(
                f"{name}-redact",
                request,
                mode="redact",
                findings={kind: 1},
                redactions=((kind, match),),
            ),
            Case(f"{name}-log", request, mode="log", findings={kind: 1}),
        ]
    cases += [Case(f"near-miss-{i}", _request([text])) for i, text in enumerate(NOT_DETECTED)]
    return cases


MALFORMED = ("request input is missing or malformed",)

CASES = [
    Case("user-chats-without-model", _request(["hello"])),
    Case(
        "admin-chats-with-model",
        _request(["hi"], roles=("admin",), model=MODEL),
        clearance="secret",
    ),
    Case(
        "user-lacks-permission",
        _request(action="audit:read"),
        False,
        ("role(s) user lack permission audit:read",),
    ),
    Case(
        "no-roles",
        _request(roles=()),
        False,
        ("role(s) (none) lack permission chat",),
        clearance="public",
    ),
    Case(
        "model-not-allowed-for-role",
        _request(["hi"], model=MODEL),
        False,
        (f"model {MODEL} is not allowed for role(s) user",),
    ),
    Case(
        "unknown-model",
        _request(["hi"], model="gpt-9"),
        False,
        ("model gpt-9 is not available on this node",),
    ),
    Case(
        "embed-needs-a-service-client",
        _request(action="embed", roles=("admin", "service")),
        False,
        ("/embed accepts only service clients",),
        clearance="secret",
    ),
    Case(
        "an-admin-session-queries", _request(action="query", roles=("admin",)), clearance="secret"
    ),
    Case(
        "delete-takes-the-ingest-permission",
        _request(action="delete", resource={"classification": "internal", "owner": "u-1"}),
    ),
    Case(
        "ingest-for-another-owner-needs-admin",
        _request(action="ingest", resource={"classification": "internal", "owner": "bob"}),
        False,
        (
            "the document's owner bob is not the caller; only an admin may ingest a document "
            "for another owner",
        ),
    ),
    Case(
        "service-embeds",
        _request(["x"], action="embed", roles=("service",), service=True),
        clearance="secret",
    ),
    Case(
        "service-queries",
        _request(action="query", roles=("service",), service=True),
        clearance="secret",
    ),
    Case(
        "service-cannot-chat",
        _request(["hi"], roles=("service",), service=True),
        False,
        ("role(s) service lack permission chat",),
        clearance="secret",
    ),
    Case("resource-within-clearance", _request(resource={"classification": "internal"})),
    Case(
        "resource-above-clearance",
        _request(resource={"classification": "confidential"}),
        False,
        ("resource classification confidential is above the caller's clearance internal",),
    ),
    Case(
        "admin-sees-secret",
        _request(roles=("admin",), resource={"classification": "secret"}),
        clearance="secret",
    ),
    Case(
        "unknown-classification",
        _request(resource={"classification": "top-secret"}),
        False,
        ("resource classification is missing or unknown",),
    ),
    Case(
        "unknown-role-only",
        _request(roles=("ghost",)),
        False,
        ("role(s) ghost lack permission chat",),
        clearance="public",
    ),
    Case("unknown-role-beside-a-known-one", _request(["hi"], roles=("ghost", "user"))),
    Case(
        "resource-without-classification",
        _request(resource={"owner": "ada"}),
        False,
        ("resource classification is missing or unknown",),
    ),
    Case("empty-input", {}, False, MALFORMED, clearance="public"),
    Case(
        "subject-not-an-object",
        {**_request(), "subject": "ada"},
        False,
        MALFORMED,
        clearance="public",
    ),
    Case("model-not-a-string", {**_request(), "model": 3}, False, MALFORMED),
    Case("non-string-text", {**_request(), "texts": ["ok", 7]}, False, MALFORMED),
    Case(
        "two-findings-in-two-texts",
        _request(["mail ada@example.org", "card 4111-1111-1111-1111 or ada@example.org"]),
        findings={"email": 2, "payment_card": 1},
        redactions=(("email", "ada@example.org"), ("payment_card", "4111-1111-1111-1111")),
    ),
    Case(
        "two-phones-joined-by-a-space",
        _request(["555-123-4567 555-987-6543"]),
        findings={"phone": 2},
        redactions=(("phone", "555-123-4567"), ("phone", "555-987-6543")),
    ),
    # Hundreds of findings outrun regorus's compiled program; the interpreter takes over.
    Case(
        "many-findings",
        _request(["card 4111 1111 1111 1111; " * 300]),
        findings={"payment_card": 300},
        redactions=(("payment_card", "4111 1111 1111 1111"),),
    ),
    *_dlp_cases(),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_opa(directory: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            *(str(tools.opa_binary()), "run", "--server", "--log-level", "error"),
            *("--addr", f"127.0.0.1:{port}", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.fail(f"OPA did not start on {port}: {err.decode()[-2000:]}")
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _render(out: Path, mode: str) -> Path:
    """The personal profile with `mode`; its one model is kept for admins so that the
    table also covers a model a permitted role may not use."""
    profile = load_profile(ROOT / "profiles" / "personal.yaml")
    models = [m.model_copy(update={"allowed_roles": ["admin"]}) for m in profile.models]
    profile = profile.model_copy(
        update={"policy": profile.policy.model_copy(update={"dlp": mode}), "models": models}
    )
    render_to(profile, out, ["policy"])
    return out / "policy"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy")
    return {mode: _render(root / mode, mode) for mode in MODES}


@pytest.fixture(scope="module")
def servers(bundles: dict[str, Path]) -> Iterator[dict[str, str]]:
    ports = {mode: _free_port() for mode in MODES}
    processes = {mode: _start_opa(bundles[mode], ports[mode]) for mode in MODES}
    try:
        yield {mode: f"http://127.0.0.1:{port}" for mode, port in ports.items()}
    finally:
        for process in processes.values():
            _stop(process)


@pytest.fixture(scope="module")
def embedded(bundles: dict[str, Path]) -> dict[str, EmbeddedEngine]:
    return {mode: EmbeddedEngine(bundles[mode], DECISION) for mode in MODES}


@pytest.fixture(scope="module")
def interpreted(bundles: dict[str, Path]) -> dict[str, EmbeddedEngine]:
    return {mode: EmbeddedEngine(bundles[mode], DECISION, compiled=False) for mode in MODES}


def _remote(url: str, timeout: float = TIMEOUT_S, **query: Any) -> Any:
    async def ask() -> Any:
        engine = RemoteEngine(url, DECISION, timeout)
        try:
            if "input" in query:
                return await engine.decide(query["input"])
            return await engine.ready()
        finally:
            await engine.aclose()

    return asyncio.run(ask())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_both_engines_return_the_expected_decision(
    case: Case,
    embedded: dict[str, EmbeddedEngine],
    interpreted: dict[str, EmbeddedEngine],
    servers: dict[str, str],
) -> None:
    local = asyncio.run(embedded[case.mode].decide(case.input))
    remote = _remote(servers[case.mode], input=case.input)
    assert local == case.expected()
    assert remote == local
    # The embedded engine falls back to regorus's interpreter; it must agree as well.
    assert interpreted[case.mode].evaluate(case.input) == local


@pytest.mark.slow
def test_both_engines_report_ready_with_the_policy_loaded(
    embedded: dict[str, EmbeddedEngine], servers: dict[str, str]
) -> None:
    assert asyncio.run(embedded["block"].ready())[0] is True
    assert _remote(servers["block"])[0] is True


@pytest.mark.slow
def test_create_engine_builds_the_named_engine(bundles: dict[str, Path]) -> None:
    options = {
        "bundle_dir": bundles["log"],
        "opa_url": "http://127.0.0.1:9",
        "decision_path": DECISION,
        "timeout_seconds": TIMEOUT_S,
    }
    assert create_engine("embedded", **options).name == "embedded"
    assert create_engine("remote", **options).name == "remote"


@pytest.mark.slow
def test_remote_fails_closed_once_opa_is_stopped(bundles: dict[str, Path]) -> None:
    port = _free_port()
    opa = _start_opa(bundles["log"], port)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _remote(url, input=_request()).allow is True
    finally:
        _stop(opa)
    with pytest.raises(PolicyUnavailable, match=r"^connection refused$"):
        _remote(url, input=_request())
    assert _remote(url) == (False, "OPA cannot decide: connection refused")


@pytest.mark.slow
def test_remote_fails_closed_when_opa_has_no_policy(tmp_path: Path) -> None:
    port = _free_port()
    opa = _start_opa(tmp_path, port)
    try:
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(PolicyUnavailable, match=r"^decision undefined$"):
            _remote(url, input=_request())
        assert _remote(url) == (False, "OPA cannot decide: decision undefined")
    finally:
        _stop(opa)


def test_remote_fails_closed_on_a_listener_that_never_answers() -> None:
    # The kernel completes the handshake for the backlog; nothing ever reads or replies.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(PolicyUnavailable, match=r"^policy engine timed out after 0\.5 s$"):
            _remote(url, timeout=0.5, input=_request())
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5


def test_embedded_refuses_a_bundle_with_a_syntax_error(tmp_path: Path) -> None:
    bundle = _render(tmp_path / "out", "block")
    broken = bundle / "gateway" / "rbac.rego"
    broken.write_text(broken.read_text() + "\nallow if {\n")
    with pytest.raises(PolicyUnavailable, match=r"cannot load the policy bundle .*rbac\.rego"):
        EmbeddedEngine(bundle, DECISION)


def test_embedded_refuses_a_bundle_without_data(tmp_path: Path) -> None:
    bundle = _render(tmp_path / "out", "block")
    (bundle / "data.json").unlink()
    with pytest.raises(PolicyUnavailable, match=r"cannot read .*data\.json"):
        EmbeddedEngine(bundle, DECISION)


def test_embedded_refuses_a_decision_path_the_bundle_lacks(tmp_path: Path) -> None:
    bundle = _render(tmp_path / "out", "block")
    with pytest.raises(PolicyUnavailable, match="cannot load the policy bundle"):
        EmbeddedEngine(bundle, "gateway/nothing_here")


def test_embedded_fails_closed_when_the_decision_is_undefined(bundles: dict[str, Path]) -> None:
    # dlp_blocks has no default and no value in mode log.
    for compiled in (True, False):
        engine = EmbeddedEngine(bundles["log"], "gateway/dlp_blocks", compiled=compiled)
        with pytest.raises(PolicyUnavailable, match=r"^decision undefined$"):
            engine.evaluate(_request(["ada@example.org"]))


def test_embedded_ignores_rego_tests_in_the_bundle(tmp_path: Path) -> None:
    bundle = _render(tmp_path / "out", "block")
    shutil.copy(ROOT / "policies" / "gateway" / "dlp_test.rego", bundle / "gateway")
    (bundle / "gateway" / "broken_test.rego").write_text("package gateway_test\nnot rego {")
    decision = asyncio.run(EmbeddedEngine(bundle, DECISION).decide(_request(["hi"])))
    assert decision.allow is True


VALID = {
    "allow": True,
    "reasons": [],
    "redactions": [{"type": "email", "text": "a@b.org"}],
    "obligations": {
        "dlp_findings": [{"type": "email", "count": 1}],
        "max_classification": "public",
        "memory_access": {"classifications": ["public"], "subject": "u-1", "denied_tags": []},
    },
}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "decision undefined"),
        ([], "malformed decision: the decision is not an object"),
        ({**VALID, "allow": "yes"}, "malformed decision: allow is not a boolean"),
        ({**VALID, "allow": 1}, "malformed decision: allow is not a boolean"),
        ({**VALID, "reasons": "denied"}, "malformed decision: reasons is not a list of strings"),
        ({**VALID, "extra": 1}, "malformed decision: the decision has keys"),
        (
            {k: v for k, v in VALID.items() if k != "obligations"},
            "malformed decision: the decision",
        ),
        ({**VALID, "redactions": [{"type": "email"}]}, "malformed decision: a redaction has keys"),
        (
            {**VALID, "obligations": {**VALID["obligations"], "notify": "dpo"}},
            "malformed decision: obligations has keys",
        ),
        (
            {
                **VALID,
                "obligations": {
                    **VALID["obligations"],
                    "dlp_findings": [{"type": "email", "count": True}],
                },
            },
            "malformed decision: a dlp finding needs",
        ),
        (
            {
                **VALID,
                "obligations": {
                    **VALID["obligations"],
                    "memory_access": {"classifications": "secret", "subject": "u-1"},
                },
            },
            "malformed decision: obligations.memory_access has keys",
        ),
        (
            {
                **VALID,
                "obligations": {
                    **VALID["obligations"],
                    "memory_access": {
                        "classifications": "secret",
                        "subject": "u-1",
                        "denied_tags": [],
                    },
                },
            },
            "malformed decision: obligations.memory_access.classifications is not a list",
        ),
    ],
    ids=lambda value: str(value)[:40],
)
def test_malformed_decisions_are_refused(raw: object, reason: str) -> None:
    with pytest.raises(PolicyUnavailable) as refused:
        parse_decision(raw)
    assert str(refused.value).startswith(reason)


def test_a_well_formed_decision_parses() -> None:
    decision = parse_decision(VALID)
    assert decision.allow is True
    assert decision.redactions == (Redaction(type="email", text="a@b.org"),)
    assert decision.obligations["dlp_findings"] == [{"type": "email", "count": 1}]
