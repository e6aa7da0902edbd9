"""`sovereign up [PROFILE]`: render a single-node profile and run what it describes.

Takes a profile (the embedded personal default when none is given); renders it into
the state directory, starts OPA and the gateway on loopback, and waits for `/health`.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from rich.table import Table
from sovereign_gateway.contract import LOCAL_CA_CERTIFICATE

from sovereign import tools
from sovereign.cli import app
from sovereign.cli.delegate import AdminFailed, admin_output, render_config
from sovereign.cli.output import EXIT_BAD_INPUT, EXIT_FAILED, console, errors
from sovereign.cli.profile import load_or_exit
from sovereign.cli.tools import install_components
from sovereign.profile.model import Profile
from sovereign.profile.types import split_host_port
from sovereign.render import RenderError, render_to
from sovereign.render.gateway import replicas

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
EXAMPLE_USER = "ada"
EXAMPLE_ROLE = "user"
EXAMPLE_TOKEN_TTL_S = 12 * 3600
# SmolLM2-135M answers this one correctly with greedy decoding.
CHECK_QUESTION = "Which city is the capital of France?"
CHECK_CHAT_TIMEOUT_S = 120.0
# Stored in the node's encrypted memory by --check, then retrieved to ground an answer.
CHECK_NOTE = (
    "Ward 7 keeps its spare oxygen cylinders in the storeroom next to the nurses' station. "
    "The cylinders are checked every Monday morning."
)
CHECK_NOTE_QUESTION = "Where does ward 7 keep its spare oxygen cylinders?"


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("SOVEREIGN_STATE_DIR", Path(base) / "sovereign"))


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class Address:
    """Where the node's gateway answers, and over TLS the certificate to trust there: the
    local CA's (which the gateway writes as it starts), or the one it serves."""

    base: str
    trusted: Path | None

    @classmethod
    def of(cls, profile: Profile) -> Address:
        host, port = split_host_port(profile.gateway.listen)
        host = "127.0.0.1" if host == "0.0.0.0" else host  # noqa: S104 (reached from here)
        tls = profile.gateway.tls
        if tls is None:
            return cls(f"http://{host}:{port}", None)
        trusted = (
            Path(tls.ca_dir) / LOCAL_CA_CERTIFICATE if tls.local_ca else Path(tls.certificate or "")
        )
        return cls(f"https://{host}:{port}", trusted)

    def open(self, request: str | urllib.request.Request, timeout: float) -> Any:
        context = None
        if self.trusted is not None:
            context = ssl.create_default_context(cafile=str(self.trusted))
            # An operator's certificate may chain to a CA this machine does not hold.
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return urllib.request.urlopen(request, timeout=timeout, context=context)  # noqa: S310

    def health(self) -> tuple[int, dict[str, Any]] | None:
        try:
            with self.open(f"{self.base}/health", 5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
        except (OSError, ValueError):
            return None

    def post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the node; raises OSError on failure."""
        request = urllib.request.Request(  # noqa: S310 (the node's own listen address)
            f"{self.base}{path}",
            data=json.dumps(body).encode(),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )
        try:
            with self.open(request, CHECK_CHAT_TIMEOUT_S) as response:
                answer: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:
            raise OSError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        return answer


def _wait_for_health(
    address: Address, processes: dict[str, subprocess.Popen[bytes]]
) -> tuple[int, dict[str, Any]] | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    answer = None
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                errors.print(f"error: {name} exited with code {process.returncode}", markup=False)
                return answer
        answer = address.health()
        if answer is not None and answer[0] == 200:
            return answer
        time.sleep(0.5)
    return answer


def _local_token(profile: Profile, render_dir: Path) -> str | None:
    """A token for the examples, from the personal node's own issuer; None for Keycloak."""
    if profile.identity.provider != "local":
        return None
    return admin_output(
        "token",
        "--config",
        render_config(render_dir),
        "--user",
        EXAMPLE_USER,
        "--role",
        EXAMPLE_ROLE,
        "--ttl",
        f"{EXAMPLE_TOKEN_TTL_S}s",
    ).strip()


def _first_answer(address: Address, model: str, token: str) -> str:
    """Ask the node one question through the full chat flow; raises OSError on failure."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": CHECK_QUESTION}],
        "max_tokens": 32,
        "temperature": 0,
    }
    answer = address.post("/v1/chat/completions", token, body)
    return str(answer["choices"][0]["message"]["content"]).strip()


def _grounded_answer(
    address: Address, model: str, token: str
) -> tuple[dict[str, Any], str, list[str]]:
    """Store a note in the node's memory, then ask about it with retrieval on."""
    note = {"text": CHECK_NOTE, "title": "sovereign up --check"}
    stored = address.post("/ingest", token, note)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": CHECK_NOTE_QUESTION}],
        "max_tokens": 48,
        "temperature": 0,
        "retrieval": True,
    }
    answer = address.post("/v1/chat/completions", token, body)
    cited = [str(citation["document"]) for citation in answer.get("citations") or []]
    return stored, str(answer["choices"][0]["message"]["content"]).strip(), cited


def _prepare_local_dirs(profile: Profile) -> None:
    for directory in (profile.audit.path, profile.memory.data_dir):
        try:
            Path(directory).mkdir(parents=True, exist_ok=True, mode=0o700)
        except PermissionError:
            errors.print(
                f"warning: cannot create {directory}; the gateway will report it not ready",
                markup=False,
            )


def _runs_opa(profile: Profile) -> bool:
    """Whether `up` starts OPA: a remote engine on this machine's loopback."""
    url = urlsplit(str(profile.policy.opa_url))
    return profile.policy.engine == "remote" and url.hostname in ("127.0.0.1", "localhost")


def needed_tools(profile: Profile) -> list[tools.Component]:
    """The pinned components the node runs from the tools cache: the `pkg:` weights of every
    model the gateway runs itself and of its embedded embedding model, and OPA if `up`
    starts it."""
    sources = [model.source for model in profile.models if not replicas(profile, model)]
    embeddings = profile.memory.embeddings
    if embeddings.engine == "embedded":
        sources += [embeddings.source, embeddings.tokenizer]
    names = [source[4:].partition("/")[0] for source in sources if source.startswith("pkg:")]
    if _runs_opa(profile):
        names.append("opa")
    # An unknown pkg: name is left to the render, which names the field.
    return [tools.REGISTRY[name] for name in dict.fromkeys(names) if name in tools.REGISTRY]


def _opa_command(profile: Profile, render_dir: Path) -> list[str] | None:
    if not _runs_opa(profile):
        return None
    url = urlsplit(str(profile.policy.opa_url))
    command = [
        str(tools.opa_binary()),
        "run",
        "--server",
        "--addr",
        f"{url.hostname}:{url.port or 8181}",
        "--log-level",
        "error",
    ]
    # The rendered policy dir holds exactly the Rego files and data the lock pins.
    command.append(str(render_dir / "policy"))
    return command


@app.command()
def up(
    file: Annotated[
        Path | None, typer.Argument(help="profile file; the embedded personal default if left out")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="where renders and logs go [default: ~/.local/state/sovereign]"),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="stop once everything is ready; exit 0 if it was")
    ] = False,
) -> None:
    """Render the profile and run its node: OPA and the gateway, on this machine."""
    profile = load_or_exit(file)
    if profile.kind == "datacenter":
        errors.print(
            "error: kind datacenter runs on Kubernetes; deploy it with `pulumi up`", markup=False
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    # Before the render, which points pkg: sources into the tools cache.
    if not install_components(needed_tools(profile)):
        errors.print("error: the node's pinned components could not be installed", markup=False)
        raise typer.Exit(EXIT_FAILED)
    root = (state_dir or default_state_dir()) / profile.name
    render_dir = root / "render"
    try:
        render_to(profile, render_dir)
    except RenderError as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    console.print(f"rendered {profile.kind} profile [bold]{profile.name}[/bold] into {render_dir}")
    _prepare_local_dirs(profile)
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    try:
        opa_command = _opa_command(profile, render_dir)
    except tools.ToolMissing as missing:
        errors.print(f"error: {missing}", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    gateway_command = [
        sys.executable,
        "-m",
        "sovereign_gateway",
        "--config",
        str(render_config(render_dir)),
    ]
    address = Address.of(profile)

    with ExitStack() as stack:
        processes: dict[str, subprocess.Popen[bytes]] = {}
        if opa_command is not None:
            processes["opa"] = _start(opa_command, log_dir / "opa.log")
            stack.callback(_stop, processes["opa"])
        processes["gateway"] = _start(gateway_command, log_dir / "gateway.log")
        stack.callback(_stop, processes["gateway"])

        answer = _wait_for_health(address, processes)
        _print_health(f"{address.base}/health", answer, log_dir)
        ready = answer is not None and answer[0] == 200
        try:
            token = _local_token(profile, render_dir) if ready else None
        except AdminFailed as failure:
            errors.print(f"error: the local issuer: {failure}", markup=False)
            raise typer.Exit(EXIT_FAILED) from None
        if ready:
            _print_examples(profile, file, address, token)
        if ready and check and token is not None:
            try:
                reply = _first_answer(address, _example_model(profile), token)
            except (OSError, ValueError, KeyError) as exc:
                errors.print(f"error: the first chat request failed: {exc}", markup=False)
                raise typer.Exit(EXIT_FAILED) from None
            console.print(f"\nasked {CHECK_QUESTION!r}; the node answered: {reply}", markup=False)
            try:
                stored, grounded, cited = _grounded_answer(address, _example_model(profile), token)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                errors.print(f"error: the memory check failed: {exc}", markup=False)
                raise typer.Exit(EXIT_FAILED) from None
            if stored["id"] not in cited:
                errors.print(
                    f"error: the grounded answer did not cite the stored note {stored['id']}",
                    markup=False,
                )
                raise typer.Exit(EXIT_FAILED)
            console.print(
                f"stored a note in encrypted memory (document {stored['id'][:12]}…, "
                f"{stored['chunks']} chunk(s)); asked {CHECK_NOTE_QUESTION!r} with retrieval; "
                f"the answer cites it: {grounded}",
                markup=False,
            )
        if check or not ready:
            raise typer.Exit(0 if ready else EXIT_FAILED)
        stop = threading.Event()
        # Before the line that says so: a signal sent on reading it must stop the node.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        console.print("node is up; press Ctrl-C to stop it")
        while not stop.wait(1):
            exited = [name for name, p in processes.items() if p.poll() is not None]
            if exited:
                errors.print(f"error: {', '.join(exited)} exited; stopping", markup=False)
                raise typer.Exit(EXIT_FAILED)
        console.print("stopping")


def _print_health(url: str, answer: tuple[int, dict[str, Any]] | None, log_dir: Path) -> None:
    if answer is None:
        errors.print(f"error: no answer from {url}; logs are in {log_dir}", markup=False)
        return
    status, body = answer
    table = Table(title=f"{url} → HTTP {status}")
    table.add_column("component")
    table.add_column("ready")
    table.add_column("detail")
    for name, component in body.get("components", {}).items():
        mark = "[green]yes[/green]" if component.get("ready") else "[red]no[/red]"
        table.add_row(name, mark, str(component.get("detail", "")))
    console.print(table)
    if status != 200:
        errors.print(f"error: the node is not ready; logs are in {log_dir}", markup=False)


def _example_model(profile: Profile) -> str:
    model = profile.models[0]
    return model.aliases[0] if model.aliases else model.name


def _print_examples(
    profile: Profile, file: Path | None, address: Address, token: str | None
) -> None:
    if token is not None:
        where = "" if file is None else f" {file}"
        export = (
            f"export TOKEN={token}\n"
            f"  # user {EXAMPLE_USER}, role {EXAMPLE_ROLE}, valid {EXAMPLE_TOKEN_TTL_S // 3600} h; "
            f"mint others with `uv run sovereign token{where} --user NAME --role ROLE`"
        )
    else:
        export = f"export TOKEN=...  # an access token from {profile.identity.issuer}"
    model = _example_model(profile)
    base = address.base
    curl = "curl -s" if address.trusted is None else f"curl -s --cacert {address.trusted}"
    client = (
        ""
        if address.trusted is None
        else ", http_client=httpx.Client(verify=ssl.create_default_context("
        f'cafile="{address.trusted}"))'
    )
    modules = "os, openai" if address.trusted is None else "httpx, os, openai, ssl"
    console.print(
        "\nTry it (the gateway speaks the OpenAI API):\n"
        f"  {export}\n"
        f'  {curl} {base}/v1/models -H "Authorization: Bearer $TOKEN"\n'
        f'  {curl} {base}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \\\n'
        "    -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": '
        f'[{{"role": "user", "content": "{CHECK_QUESTION}"}}]}}\'\n'
        f"  uv run python -c 'import {modules}; c = openai.OpenAI("
        f'base_url="{base}/v1", api_key=os.environ["TOKEN"]{client}); '
        f'r = c.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "{CHECK_QUESTION}"}}]); '
        "print(r.choices[0].message.content)'\n"
        "  # store a document in the node's encrypted memory, then chat grounded on it\n"
        f'  {curl} {base}/ingest -H "Authorization: Bearer $TOKEN" -F file=@notes.pdf '
        "-F classification=internal\n"
        f'  {curl} {base}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \\\n'
        "    -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "retrieval": true, "messages": '
        '[{"role": "user", "content": "What do my notes say?"}]}\'',
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
