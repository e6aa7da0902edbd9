"""Real servers for the integration tests: the gateway, OPA, Keycloak and a loopback upstream.

Each fixture starts a real process on 127.0.0.1 and stops it afterwards. The upstream is
`bench/fixed_upstream.py`, standing in for vLLM, which needs a GPU this machine lacks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sovereign_gateway import issuer

from sovereign import tools
from sovereign.profile.loader import parse_profile
from sovereign.render import render_to
from sovereign.render.keycloak import CLI_CLIENT, realm
from tests.cli import sovereign as run_sovereign

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60
KEYCLOAK_START_TIMEOUT_S = 240
PASSWORD = "correct horse battery staple"
SERVICE_SECRET = "service-client-secret-for-tests"
MEMORY_CLIENT = "sovereign-memory"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (loopback)
    if data is not None:
        request.add_header("content-type", "application/json")
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def start(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def wait_listening(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url}: process exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            http("GET", url, timeout=5)
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)


@contextmanager
def fixed_upstream(log: Path, latency_ms: float = 0) -> Iterator[str]:
    """Run `bench/fixed_upstream.py`; gives its base URL ending in /v1."""
    port = free_port()
    process = start(
        [
            sys.executable,
            str(ROOT / "bench" / "fixed_upstream.py"),
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
        ],
        log,
    )
    try:
        wait_listening(f"http://127.0.0.1:{port}/v1/models", process, log, START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A zero-latency OpenAI-compatible server shared by the session."""
    with fixed_upstream(tmp_path_factory.mktemp("upstream") / "upstream.log") as url:
        yield url


def profile_text(
    home: Path,
    *,
    port: int,
    upstream: str,
    identity: str | None = None,
    engine: str = "embedded",
    opa_port: int = 8181,
    dlp: str = "redact",
    lock_required: bool = False,
    capture_content: bool = False,
    models: str | None = None,
    roles: str = "",
    memory: str = "",
    gateway: str = "",
) -> str:
    """A personal node profile with every path under `home` and models served by `upstream`.

    `models` replaces the two upstream models with a YAML list (the `models:` key's value);
    `roles` adds lines under identity.roles, `memory` lines under memory and `gateway` lines
    under gateway (YAML, indented as their siblings are).
    """
    identity = identity or (
        f"  provider: local\n  issuer: http://127.0.0.1:{port}/local\n"
        f"  local_key_dir: {home}/issuer\n"
    )
    models = (
        models
        or f"""
  - name: echo-1
    aliases: [gpt-4o-mini, default]
    engine: upstream
    source: {upstream}
    sha256: {"a" * 64}
    context_length: 4096
    allowed_roles: [admin, user]
  - name: restricted-1
    engine: upstream
    source: {upstream}
    sha256: {"b" * 64}
    context_length: 4096
    allowed_roles: [admin]
"""
    )
    return f"""\
kind: personal
name: gw-test
identity:
{identity}  roles:
    admin: [admin, chat, embeddings, ingest, query, "models:read", "audit:read"]
    user: [chat, embeddings, ingest, "models:read"]
    viewer: ["models:read"]
    service: [embed, query]
{roles}models:{models.rstrip()}
memory:
  data_dir: {home}/memory
  key_file: {home}/keys/memory.kek
{memory}policy:
  engine: {engine}
  opa_url: http://127.0.0.1:{opa_port}
  dlp: {dlp}
  lock:
    required: {str(lock_required).lower()}
    manifest: {home}/lock/lock.json
    public_key: {home}/lock/lock.pub
audit:
  path: {home}/audit
  signing_key: {home}/keys/audit.key
  checkpoint_interval: 5s
  checkpoint_records: 50
  capture_content: {str(capture_content).lower()}
gateway:
  listen: 127.0.0.1:{port}
{gateway}"""


@dataclass
class RunningGateway:
    home: Path
    url: str
    config_path: Path
    render_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    local_issuer: issuer.LocalIssuer | None = None
    issuer_url: str = ""
    opa: subprocess.Popen[bytes] | None = None

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    def token(self, user: str = "alice", roles: tuple[str, ...] = ("user",), **claims: Any) -> str:
        assert self.local_issuer is not None, "this gateway trusts Keycloak, not a local issuer"
        return issuer.mint(
            self.local_issuer,
            issuer_url=self.issuer_url,
            audience="sovereign-gateway",
            subject=user,
            roles=list(roles),
            **claims,
        )

    def call(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, dict[str, str], bytes]:
        return http(method, f"{self.url}{path}", body, **kwargs)

    def chat(self, text: str, token: str, model: str = "echo-1", **extra: Any) -> tuple[int, Any]:
        status, _, body = self.call(
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": text}], **extra},
            token=token,
        )
        return status, json.loads(body)

    def records(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for segment in sorted(self.audit_dir.glob("audit-*.jsonl")):
            for line in segment.read_text().splitlines():
                lines.append(json.loads(line))
        return lines

    def records_tolerant(self) -> list[dict[str, Any]]:
        """The records, skipping a torn last line left by a crash."""
        lines: list[dict[str, Any]] = []
        for segment in sorted(self.audit_dir.glob("audit-*.jsonl")):
            for line in segment.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.process, sig)
        if self.opa is not None:
            stop(self.opa)


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def gateway_factory(tmp_path: Path, upstream: str) -> Iterator[GatewayFactory]:
    """Render a profile into tmp_path and run `sovereign-gateway` on it; gives a starter."""
    started: list[RunningGateway] = []

    def launch(
        *,
        config_patch: Callable[[dict[str, Any]], None] | None = None,
        wait: bool = True,
        with_opa: bool = True,
        name: str = "node",
        **profile_options: Any,
    ) -> RunningGateway:
        home = tmp_path / name
        home.mkdir(exist_ok=True)
        port = profile_options.pop("port", None) or free_port()
        if profile_options.get("engine") == "remote":
            profile_options.setdefault("opa_port", free_port())
        upstream_url = profile_options.pop("upstream", upstream)
        text = profile_text(home, port=port, upstream=upstream_url, **profile_options)
        profile = parse_profile(text, str(home / "profile.yaml"))
        local = None
        if profile.identity.provider == "local":
            local = issuer.ensure_keys(Path(profile.identity.local_key_dir))
        render_dir = home / "render"
        render_to(profile, render_dir)
        config_path = render_dir / "gateway" / "config.json"
        if config_patch is not None:
            config = json.loads(config_path.read_text())
            config_patch(config)
            config_path.write_text(json.dumps(config))
        opa = None
        if with_opa and profile.policy.engine == "remote":
            opa_port = int(str(profile.policy.opa_url).rsplit(":", 1)[1].rstrip("/"))
            opa = start_opa(render_dir / "policy", opa_port, home / "opa.log")
        log = home / "gateway.log"
        process = start(
            [sys.executable, "-m", "sovereign_gateway", "--config", str(config_path)], log
        )
        running = RunningGateway(
            home=home,
            url=f"http://127.0.0.1:{port}",
            config_path=config_path,
            render_dir=render_dir,
            process=process,
            log=log,
            local_issuer=local,
            issuer_url=str(profile.identity.issuer).rstrip("/"),
            opa=opa,
        )
        started.append(running)
        if wait:
            wait_listening(f"{running.url}/health", process, log, START_TIMEOUT_S)
        return running

    yield launch
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def opa_binary() -> Path:
    return tools.opa_binary()


def start_opa(policy_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    process = start(
        [
            str(tools.opa_binary()),
            "run",
            "--server",
            "--addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "error",
            str(policy_dir),
        ],
        log,
    )
    wait_listening(f"http://127.0.0.1:{port}/health", process, log, START_TIMEOUT_S)
    return process


@dataclass
class Keycloak:
    base: str
    realm: str
    process: subprocess.Popen[bytes]
    admin_password: str
    _admin_token: str | None = field(default=None, repr=False)

    @property
    def issuer(self) -> str:
        return f"{self.base}/realms/{self.realm}"

    def token_response(self, realm: str | None = None, **form: str) -> dict[str, Any]:
        url = f"{self.base}/realms/{realm or self.realm}/protocol/openid-connect/token"
        status, _, body = http(
            "POST",
            url,
            raw=urllib.parse.urlencode(form).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    def password_token(self, user: str, realm: str | None = None) -> str:
        answer = self.token_response(
            realm,
            grant_type="password",
            client_id=CLI_CLIENT,
            username=user,
            password=PASSWORD,
            scope="openid",
        )
        return str(answer["access_token"])

    def service_token(self) -> str:
        answer = self.token_response(
            grant_type="client_credentials", client_id=MEMORY_CLIENT, client_secret=SERVICE_SECRET
        )
        return str(answer["access_token"])

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        token = self.token_response(
            "master",
            grant_type="password",
            client_id="admin-cli",
            username="admin",
            password=self.admin_password,
        )["access_token"]
        status, _, raw = http(method, f"{self.base}/admin/realms{path}", body, token=token)
        return status, json.loads(raw) if raw else None


def keycloak_identity(base: str, realm_name: str = "sovereign") -> str:
    return (
        f"  provider: keycloak\n  issuer: {base}/realms/{realm_name}\n  realm: {realm_name}\n"
        "  users:\n"
        "    - name: alice\n      email: alice@example.org\n      roles: [user]\n"
        "    - name: root\n      email: root@example.org\n      roles: [admin]\n"
        "    - name: vera\n      email: vera@example.org\n      roles: [viewer]\n"
        f"  service_clients:\n    - name: {MEMORY_CLIENT}\n      roles: [service]\n"
    )


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory, upstream: str) -> Iterator[Keycloak]:
    """A real Keycloak with realms `sovereign` and `other`, rendered by `sovereign render`."""
    work = tmp_path_factory.mktemp("keycloak")
    home = work / "keycloak"
    # start-dev writes its build and H2 database into its home; the cache stays as installed.
    shutil.copytree(tools.keycloak_home(), home, symlinks=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    imports = home / "data" / "import"
    imports.mkdir(parents=True, exist_ok=True)
    for realm_name in ("sovereign", "other"):
        text = profile_text(
            work, port=1, upstream=upstream, identity=keycloak_identity(base, realm_name)
        )
        document = realm(parse_profile(text, str(work / f"{realm_name}.yaml")))
        for user in document["users"]:
            if "serviceAccountClientId" not in user:
                user["credentials"] = [{"type": "password", "value": PASSWORD, "temporary": False}]
        for client in document["clients"]:
            if client["clientId"] == MEMORY_CLIENT:
                client["secret"] = SERVICE_SECRET
        (imports / f"{realm_name}-realm.json").write_text(json.dumps(document))
    admin_password = "admin-password-for-tests"
    log = work / "keycloak.log"
    process = start(
        [
            str(home / "bin" / "kc.sh"),
            "start-dev",
            "--http-port",
            str(port),
            "--http-host",
            "127.0.0.1",
            "--import-realm",
        ],
        log,
        env={
            "KC_BOOTSTRAP_ADMIN_USERNAME": "admin",
            "KC_BOOTSTRAP_ADMIN_PASSWORD": admin_password,
            "JAVA_OPTS_KC_HEAP": "-Xms256m -Xmx768m",
        },
    )
    try:
        url = f"{base}/realms/sovereign/.well-known/openid-configuration"
        deadline = time.monotonic() + KEYCLOAK_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"kc.sh exited {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if http("GET", url, timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Keycloak not up in {KEYCLOAK_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(1)
        yield Keycloak(base=base, realm="sovereign", process=process, admin_password=admin_password)
    finally:
        stop(process)


@contextmanager
def pypiserver(packages: Path, log: Path) -> Iterator[str]:
    """pypiserver over `packages`; gives its PEP 503 (HTML only) index URL.

    `--disable-fallback`, or it redirects what it lacks to pypi.org.
    """
    port = free_port()
    process = start(
        [
            sys.executable,
            "-m",
            "pypiserver",
            "run",
            "-i",
            "127.0.0.1",
            "-p",
            str(port),
            "--disable-fallback",
            "-a",
            ".",
            "-P",
            ".",
            str(packages),
        ],
        log,
    )
    try:
        wait_listening(f"http://127.0.0.1:{port}/simple/", process, log, START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/simple/"
    finally:
        stop(process)


# The gateway's wheelhouse, made once per session: its index is pypiserver over the locked
# packages `sovereign tools install gateway-packages` fetched; llama-cpp-python is there
# only as its sdist, so the first run on a machine builds it (minutes, then cached).
@pytest.fixture(scope="session")
def gateway_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gateway-index") / "pypiserver.log"
    with pypiserver(tools.gateway_packages(), log) as index:
        yield index


@pytest.fixture(scope="session")
def wheelhouse(gateway_index: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse") / "personal"
    made = run_sovereign(
        "gateway", "wheels", ROOT / "profiles" / "personal.yaml", "--out", out,
        "--index", gateway_index, timeout=2400,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert f"✓ wheelhouse {out}:" in made.stdout
    return out
