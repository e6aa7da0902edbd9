"""`sovereign render`: the registry, the two renderers, and all-or-nothing writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sovereign_gateway.contract import GatewayConfig
from typer.testing import CliRunner

from sovereign.cli import app
from sovereign.profile.defaults import EMBEDDED_DEFAULT
from sovereign.profile.loader import load_profile, parse_profile
from sovereign.render import MANIFEST, RenderError, registry, render_files, render_to

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "profiles").glob("*.yaml"))


def test_registry_holds_every_renderer() -> None:
    assert set(registry()) == {
        "profile",
        "gateway",
        "policy",
        "keycloak",
        "vllm",
        "ansible",
        "pulumi",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_gateway_config_is_valid_for_the_gateway(path: Path) -> None:
    profile = load_profile(path)
    files = render_files(profile, ["gateway"])
    config = GatewayConfig.model_validate_json(files["gateway/config.json"])
    assert config.kind == profile.kind
    assert config.oidc.issuer == str(profile.identity.issuer).rstrip("/")
    assert set(config.oidc.algorithms) == {"RS256", "ES256", "EdDSA"}
    assert [route.name for route in config.models] == [model.name for model in profile.models]
    # The DLP mode is the policy's to apply: it reaches OPA's data, not the gateway.
    data = json.loads(render_files(profile, ["policy"])["policy/data.json"])
    assert data["sovereign"]["config"]["dlp"]["mode"] == profile.policy.dlp


def test_gateway_config_converts_durations_to_seconds() -> None:
    profile = load_profile(ROOT / "profiles" / "air-gapped.yaml")
    config = GatewayConfig.model_validate_json(render_files(profile)["gateway/config.json"])
    assert config.audit.checkpoint_interval_seconds == 60
    assert config.audit.retention_seconds == 10 * 365 * 86400


def test_render_writes_files_and_a_manifest_of_their_digests(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["render", str(ROOT / "profiles" / "personal.yaml"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert {
        "profile.yaml",
        "gateway/config.json",
        "policy/data.json",
        "keycloak/realm.json",
    } <= set(manifest["files"])
    assert {path for path in manifest["files"] if path.startswith("policy/gateway/")} == {
        f"policy/gateway/{rego.name}"
        for rego in (ROOT / "policies" / "gateway").glob("*.rego")
        if not rego.name.endswith("_test.rego")
    }
    assert load_profile(out / "profile.yaml") == load_profile(ROOT / "profiles" / "personal.yaml")


def test_render_replaces_an_earlier_render_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    profile = load_profile(ROOT / "profiles" / "edge.yaml")
    render_to(profile, out)
    (out / "stale.txt").write_text("left from an older toolkit")
    render_to(profile, out, ["profile"])
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "profile.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no staging or retired dirs remain"


def test_render_refuses_a_directory_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(
        app, ["render", str(ROOT / "profiles" / "personal.yaml"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "is not an earlier `sovereign render` output" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_renderer_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["render", str(ROOT / "profiles" / "personal.yaml"), "--out", str(out), "--only", "nix"],
    )
    assert result.exit_code == 2
    assert "unknown renderer nix; available: profile, gateway" in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_renderer_leaves_the_earlier_render_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    profile = load_profile(ROOT / "profiles" / "personal.yaml")
    render_to(profile, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def explode(_: Path, __: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("sovereign.render._swap_into_place", explode)
    with pytest.raises(OSError, match="disk full"):
        render_to(profile, out)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_renderer_paths_may_not_escape_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from sovereign import render

    profile = load_profile(ROOT / "profiles" / "personal.yaml")
    evil = render.Renderer("evil", "writes outside", lambda _: {"../escape": b"x"})
    monkeypatch.setattr(render, "registry", lambda: {"evil": evil})
    with pytest.raises(RenderError, match=re.escape("bad or duplicate path '../escape'")):
        render_files(profile)


def test_the_keycloak_realm_holds_the_profiles_roles_users_and_clients() -> None:
    profile = load_profile(ROOT / "profiles" / "personal.yaml")
    realm = json.loads(render_files(profile, ["keycloak"])["keycloak/realm.json"])

    assert realm["realm"] == "sovereign"
    assert {role["name"] for role in realm["roles"]["realm"]} == {"admin", "user", "service"}
    clients = {client["clientId"]: client for client in realm["clients"]}
    assert clients["sovereign-gateway"]["bearerOnly"] is True
    assert clients["sovereign-cli"]["publicClient"] is True
    assert clients["sovereign-memory"]["serviceAccountsEnabled"] is True
    assert clients["sovereign-memory"]["directAccessGrantsEnabled"] is False
    for name in ("sovereign-cli", "sovereign-memory"):
        mappers = clients[name]["protocolMappers"]
        assert mappers[0]["config"]["included.client.audience"] == "sovereign-gateway"
    users = {user["username"]: user for user in realm["users"]}
    assert users["ada"]["realmRoles"] == ["admin"]
    assert "credentials" not in users["ada"]
    assert users["service-account-sovereign-memory"]["realmRoles"] == ["service"]
    assert "secret" not in clients["sovereign-memory"]


def test_a_local_issuer_renders_no_realm() -> None:
    profile = load_profile(ROOT / "profiles" / "edge.yaml")
    personal = parse_profile(EMBEDDED_DEFAULT, "embedded")

    assert render_files(personal, ["keycloak"]) == {}
    assert "keycloak/realm.json" in render_files(profile, ["keycloak"])


def _routes(text: str) -> dict[str, Any]:
    config = GatewayConfig.model_validate_json(
        render_files(parse_profile(text, "node.yaml"), ["gateway"])["gateway/config.json"]
    )
    return {route.name: route for route in config.models}


def test_the_embedded_default_runs_smollm2_in_the_gateway_from_the_tools_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SOVEREIGN_TOOLS_DIR", str(tmp_path))
    route = _routes(EMBEDDED_DEFAULT)["smollm2-135m-instruct"]

    assert route.replicas == []
    assert route.weights == str(tmp_path / "smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (route.concurrency, route.workers, route.threads) == (1, 1, None)
    assert (route.queue, route.queue_timeout_seconds, route.timeout_seconds) == (32, 30.0, 120.0)


def test_the_embedded_default_embeds_with_minilm_from_the_tools_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SOVEREIGN_TOOLS_DIR", str(tmp_path))
    files = render_files(parse_profile(EMBEDDED_DEFAULT, "node.yaml"), ["gateway"])
    memory = GatewayConfig.model_validate_json(files["gateway/config.json"]).memory
    assert memory.embeddings.engine == "embedded"
    assert memory.embeddings.weights == str(tmp_path / "minilm-1.0.0" / "model.onnx")
    assert memory.embeddings.tokenizer == str(tmp_path / "minilm-1.0.0" / "tokenizer.json")
    assert memory.embeddings.sha256 == (
        "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
    )
    assert memory.embeddings.dimensions == 384
    assert (memory.chunk_tokens, memory.chunk_overlap) == (200, 32)
    assert (memory.rag_chat, memory.rag_top_k) == (False, 4)
    assert memory.key_source == "file"
    assert memory.key_file == "/var/lib/sovereign/keys/memory.kek"
    assert memory.default_retention_seconds is None
    assert memory.retention_interval_seconds == 3600


def test_upstream_embeddings_clearances_and_restricted_tags_render() -> None:
    profile = parse_profile(
        "kind: personal\nname: t\n"
        "identity:\n  clearances:\n    user: confidential\n"
        "memory:\n  retention: 30d\n  restricted_tags:\n    hr: [admin]\n"
        "  embeddings:\n    engine: upstream\n    model: nomic-embed\n"
        "    url: http://127.0.0.1:8081/v1/\n    dimensions: 768\n",
        "t.yaml",
    )
    files = render_files(profile, ["gateway", "policy"])
    memory = GatewayConfig.model_validate_json(files["gateway/config.json"]).memory
    assert memory.embeddings.url == "http://127.0.0.1:8081/v1"
    assert (memory.embeddings.model, memory.embeddings.dimensions) == ("nomic-embed", 768)
    assert memory.embeddings.weights is None
    assert memory.default_retention_seconds == 30 * 86400
    data = json.loads(files["policy/data.json"])["sovereign"]["config"]
    assert data["clearances"] == {"admin": "secret", "service": "secret", "user": "confidential"}
    assert data["restricted_tags"] == {"hr": ["admin"]}


def test_datacenter_vllm_models_are_reached_through_their_in_cluster_service() -> None:
    profile = load_profile(ROOT / "profiles" / "datacenter.yaml")
    config = GatewayConfig.model_validate_json(render_files(profile)["gateway/config.json"])
    for route in config.models:
        assert route.weights is None
        assert route.concurrency == 64
        [url] = route.replicas
        assert re.fullmatch(
            r"http://vllm-[a-z0-9-]+\.sovereign-runtime\.svc\.cluster\.local:8000/v1", url
        ), url


def test_replicas_serving_and_the_gateway_upstream_reach_the_route() -> None:
    routes = _routes(
        "kind: personal\nname: t\n"
        "gateway:\n  listen: 127.0.0.1:8000\n  upstream: http://127.0.0.1:7000/v1\n"
        "models:\n"
        "  - name: local\n    engine: llamacpp\n    source: file:/models/a.gguf\n"
        "    context_length: 4096\n    allowed_roles: [user]\n"
        "    replicas: [http://127.0.0.1:8081/v1/, http://127.0.0.1:8082/v1]\n"
        "    serving: {concurrency: 4, queue: 0, queue_timeout: 2s, timeout: 10m}\n"
        "  - name: remote\n    engine: upstream\n    source: http://10.0.0.5:8000/v1\n"
        "    context_length: 4096\n    allowed_roles: [user]\n"
        "    replicas: [http://10.0.0.6:8000/v1]\n"
        "  - name: fallback\n    engine: llamacpp\n    source: file:/models/b.gguf\n"
        "    context_length: 4096\n    allowed_roles: [user]\n"
    )

    local = routes["local"]
    assert local.replicas == ["http://127.0.0.1:8081/v1", "http://127.0.0.1:8082/v1"]
    assert (local.concurrency, local.queue, local.queue_timeout_seconds) == (4, 0, 2.0)
    assert local.timeout_seconds == 600.0
    assert local.weights is None
    assert routes["remote"].replicas == ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    assert routes["remote"].concurrency == 16
    # gateway.upstream answers for a model that names no server of its own.
    assert routes["fallback"].replicas == ["http://127.0.0.1:7000/v1"]
