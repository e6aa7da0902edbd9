"""`sovereign gateway image`: the OCI image, its reproducible digest, and a run under gVisor.

The image is built from the session's wheelhouse (mmdebstrap fetches the Debian base; it
is cached by recipe hash, and the second build here starts without that cache). It is read
back by skopeo and umoci, unpacked into a runtime bundle and run by runsc with no network;
from inside the sandbox, `sovereign-gateway admin health` and a chat on the embedded
model (SmolLM2, bound in read-only) succeed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sovereign import tools
from sovereign.profile.loader import parse_profile
from sovereign.render import render_to
from tests.cli import sovereign

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
DATACENTER = ROOT / "profiles" / "datacenter.yaml"
UID = 65532
STATE = "/var/lib/sovereign"
CONFIG = "/etc/sovereign-gateway/gateway/config.json"
READY_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def image(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image") / "gateway"
    built = sovereign(
        "gateway", "image", DATACENTER, "--wheelhouse", wheelhouse, "--out", out, timeout=2400
    )
    assert built.exit_code == 0, built.output
    return out


def _description(image: Path) -> dict[str, Any]:
    described: dict[str, Any] = json.loads((image / "image.json").read_text())
    return described


def test_the_same_inputs_give_the_same_digest(
    image: Path, wheelhouse: Path, tmp_path: Path
) -> None:
    """The second build makes its Debian base again (an empty image cache) and its venv."""
    again = tmp_path / "again"
    built = sovereign(
        "gateway", "image", DATACENTER, "--wheelhouse", wheelhouse, "--out", again,
        env={"SOVEREIGN_IMAGE_CACHE": str(tmp_path / "cache")}, timeout=2400,
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    assert "is cached" not in built.stderr
    assert _description(again)["digest"] == _description(image)["digest"]
    assert (again / "index.json").read_bytes() == (image / "index.json").read_bytes()


def test_skopeo_and_umoci_read_it_as_a_non_root_image_with_an_sbom(image: Path) -> None:
    described = _description(image)
    inspected = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--config", f"oci:{image}:0.1.0"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    config = inspected["config"]
    assert inspected["architecture"] == "amd64"
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/opt/sovereign/gateway/bin/sovereign-gateway"]
    assert config["Cmd"] == ["--config", "/etc/sovereign-gateway/config.json"]
    assert len(inspected["rootfs"]["diff_ids"]) == 2
    manifest = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{image}:0.1.0"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert f"sha256:{hashlib.sha256(manifest).hexdigest()}" == described["digest"]
    sbom = json.loads((image / "sbom.cdx.json").read_text())
    names = {component["name"]: component for component in sbom["components"]}
    assert {"python3.11", "libgomp1", "starlette", "llama-cpp-python", "sovereign-gateway"} <= set(
        names
    )
    assert names["python3.11"]["purl"].startswith("pkg:deb/debian/python3.11@3.11.2")
    assert names["starlette"]["licenses"]


@pytest.fixture
def sandbox(image: Path, tmp_path: Path) -> Iterator[tuple[list[str], str, Path]]:
    """The image unpacked by umoci and started by runsc with no network; the rendered
    config, the policy and the models bound in read-only, the state directory writable."""
    bundle, state, log = tmp_path / "bundle", tmp_path / "runsc", tmp_path / "sandbox.log"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{image}:0.1.0", str(bundle)],
        capture_output=True, check=True,
    )  # fmt: skip
    render, writable = tmp_path / "render", tmp_path / "state"
    _render(render)
    writable.mkdir()
    os.chown(writable, UID, UID)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["root"]["readonly"] = True
    keep = {"/proc", "/dev", "/dev/pts", "/dev/shm", "/sys"}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] in keep] + [
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=256m"]},
        _bind(render, "/etc/sovereign-gateway", "ro"),
        _bind(tools.smollm2_gguf(), "/models/smollm2.gguf", "ro"),
        _bind(tools.minilm_onnx(), "/models/minilm/model.onnx", "ro"),
        _bind(tools.minilm_tokenizer(), "/models/minilm/tokenizer.json", "ro"),
        _bind(writable, STATE, "rw"),
    ]  # fmt: skip
    spec["process"]["args"] = ["sovereign-gateway", "--config", CONFIG]
    (bundle / "config.json").write_text(json.dumps(spec))
    runsc = ["runsc", "--root", str(state), "--network=none", "--platform=ptrace"]
    name = f"gateway-{os.getpid()}"
    with log.open("ab") as sink:
        started = subprocess.run(
            [*runsc, "run", "-bundle", str(bundle), "-detach", name],
            stdout=sink, stderr=sink, stdin=subprocess.DEVNULL, timeout=120, check=False,
        )  # fmt: skip
    try:
        assert started.returncode == 0, log.read_text()[-3000:]
        yield runsc, name, log
    finally:
        subprocess.run([*runsc, "delete", "-force", name], capture_output=True, check=False)
        shutil.rmtree(state, ignore_errors=True)


def test_it_runs_under_gvisor_and_answers_from_inside(
    sandbox: tuple[list[str], str, Path],
) -> None:
    runsc, name, log = sandbox
    inside = [*runsc, "exec", "--user", f"{UID}:{UID}", name]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        health = subprocess.run(
            [*inside, "sovereign-gateway", "admin", "health", "--config", CONFIG],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if health.returncode == 0:
            break
        assert time.monotonic() < deadline, health.stdout + health.stderr + log.read_text()[-3000:]
        time.sleep(2)
    assert "✓ http://127.0.0.1:8000: ready" in health.stdout
    assert "  ✓ runtime: 1 embedded model(s) loaded" in health.stdout
    token = subprocess.run(
        [*inside, "sovereign-gateway", "admin", "token", "--config", CONFIG, "--user", "ada",
         "--role", "user"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    chat = (
        "import httpx, sys; r = httpx.post('http://127.0.0.1:8000/v1/chat/completions', "
        "headers={'authorization': 'Bearer ' + sys.argv[1]}, timeout=240, json={'model': "
        "'default', 'temperature': 0, 'max_tokens': 24, 'messages': [{'role': 'user', "
        "'content': 'Which city is the capital of France?'}]}); r.raise_for_status(); "
        "print(r.json()['choices'][0]['message']['content'])"
    )
    answer = subprocess.run(
        [*inside, "python", "-c", chat, token],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr + log.read_text()[-3000:]
    assert "Paris" in answer.stdout
    # No network but loopback: an address outside (TEST-NET-1, never routed) is unreachable.
    outside = subprocess.run(
        [*inside, "python", "-c", "import socket; socket.create_connection(('192.0.2.1', 80), 3)"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert outside.returncode != 0
    assert "No route to host" in outside.stderr or "Network is unreachable" in outside.stderr


def _render(out: Path) -> None:
    """A personal node's render with the sandbox's paths: state under /var/lib/sovereign,
    the models where they are bound in."""
    profile = parse_profile(
        "kind: personal\nname: sandboxed\n"
        f"identity:\n  local_key_dir: {STATE}/issuer\n"
        f"audit:\n  path: {STATE}/audit\n  signing_key: {STATE}/keys/audit.key\n"
        f"memory:\n  data_dir: {STATE}/memory\n  key_file: {STATE}/keys/memory.kek\n"
        "  embeddings:\n    source: file:/models/minilm/model.onnx\n"
        "    tokenizer: file:/models/minilm/tokenizer.json\n"
        "models:\n  - name: smollm2-135m-instruct\n    aliases: [default]\n"
        "    engine: llamacpp\n    source: file:/models/smollm2.gguf\n"
        f"    sha256: {tools.SMOLLM2_GGUF_SHA256}\n    quantization: int4\n"
        "    context_length: 8192\n    allowed_roles: [admin, user]\n",
        "sandboxed.yaml",
    )
    render_to(profile, out)


def _bind(source: Path, destination: str, mode: str) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", mode],
    }
