"""`sovereign gateway wheels`, and the offline install a node does from its output.

The index is pypiserver on loopback over the gateway's locked packages, which `sovereign
tools install gateway-packages` fetched with pip; llama-cpp-python is there only as its
sdist, so the wheelhouse builds it (once, then from the cache). The install runs in a
network namespace of its own with no interface but a downed loopback: no index can be
reached, and the gateway it gives runs without the toolkit, on the embedded model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sovereign.distribution.builds import cache_root
from sovereign.distribution.wheelhouse import GATEWAY_LOCK
from sovereign.mirror.pypi import read_requirements
from sovereign.profile.loader import parse_profile
from sovereign.render import render_to
from sovereign.tools import sha256_file
from tests.cli import sovereign
from tests.integration.conftest import (
    START_TIMEOUT_S,
    free_port,
    http,
    start,
    stop,
    wait_listening,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]


def _pins(requirements: Path) -> dict[str, tuple[str, set[str]]]:
    text = requirements.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        spec, *hashes = line.split()
        name, _, version = spec.partition("==")
        pins[re.sub(r"\[.*\]", "", name)] = (version, {h.split(":", 1)[1] for h in hashes})
    return pins


def test_every_wheel_is_pinned_by_its_sha256_and_llama_cpp_is_built_portably(
    wheelhouse: Path, gateway_index: str
) -> None:
    pins = _pins(wheelhouse / "requirements.txt")
    files = sorted(wheelhouse.glob("*.whl"))
    assert len(files) == len(pins) > 50
    for wheel in files:
        name = wheel.name.split("-")[0].lower().replace("_", "-")
        version, hashes = pins[name]
        assert wheel.name.split("-")[1] == version
        assert sha256_file(wheel) in hashes, wheel.name
    assert "sovereign-gateway[llamacpp]==0.1.0 \\" in (wheelhouse / "requirements.txt").read_text()
    listed = {
        entry["name"]: entry for entry in json.loads((wheelhouse / "wheels.json").read_text())
    }
    # Built from the sdist the lock pins, by its hash, with the portable CPU flags.
    [sdist_hash] = {
        pin.hashes for pin in read_requirements(GATEWAY_LOCK) if pin.name == "llama-cpp-python"
    }.pop()
    llama = listed["llama-cpp-python"]
    assert llama["source"].startswith(f"built from {gateway_index.removesuffix('simple/')}")
    assert llama["source"].endswith(f"llama_cpp_python-0.3.36.tar.gz (sha256 {sdist_hash})")
    assert listed["sovereign-gateway"]["source"] == "built from services/gateway"
    assert listed["sovereign-gateway"]["licence"] == "Apache-2.0"
    [build] = cache_root().glob("llama-cpp-python-0.3.36-*/build.json")
    assert json.loads(build.read_text())["flags"] == {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    assert [p.name for p in (wheelhouse / "installer").glob("*.whl")] == [
        "pip-26.3-py3-none-any.whl"
    ]


def test_the_offline_install_gives_a_gateway_that_answers_without_the_toolkit(
    wheelhouse: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    install = subprocess.run(
        ["unshare", "--net", str(venv / "bin" / "pip"), "install", "--no-index",
         "--require-hashes", "--disable-pip-version-check", "--find-links", str(wheelhouse),
         "-r", str(wheelhouse / "requirements.txt")],
        capture_output=True, text=True, env=environment, timeout=900, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    python = str(venv / "bin" / "python")
    toolkit = subprocess.run([python, "-c", "import sovereign"], capture_output=True, text=True)
    assert "No module named 'sovereign'" in toolkit.stderr
    admin = subprocess.run(
        [str(venv / "bin" / "sovereign-gateway"), "admin", "--help"], capture_output=True, text=True
    )
    assert admin.returncode == 0, admin.stderr
    assert "token" in admin.stdout

    port = free_port()
    home = tmp_path / "node"
    profile = parse_profile(
        "kind: personal\nname: offline\n"
        f"identity:\n  issuer: http://127.0.0.1:{port}/local\n  local_key_dir: {home}/issuer\n"
        f"gateway:\n  listen: 127.0.0.1:{port}\n"
        f"audit:\n  path: {home}/audit\n  signing_key: {home}/keys/audit.key\n"
        f"memory:\n  data_dir: {home}/memory\n  key_file: {home}/keys/memory.kek\n",
        str(home / "profile.yaml"),
    )
    render_to(profile, home / "render")
    config = home / "render" / "gateway" / "config.json"
    log = tmp_path / "gateway.log"
    # The toolkit's directory is not on the path: the venv's own console script serves.
    gateway = start(
        [str(venv / "bin" / "sovereign-gateway"), "--config", str(config)],
        log,
        env={"PYTHONPATH": "", "VIRTUAL_ENV": str(venv)},
    )
    try:
        wait_listening(f"http://127.0.0.1:{port}/health", gateway, log, START_TIMEOUT_S)
        deadline = time.monotonic() + 120
        while http("GET", f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        token = subprocess.run(
            [str(venv / "bin" / "sovereign-gateway"), "admin", "token", "--config", str(config),
             "--user", "ada", "--role", "user"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        status, _, body = http(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {"model": "default", "temperature": 0, "max_tokens": 32,
             "messages": [{"role": "user", "content": "Which city is the capital of France?"}]},
            token=token,
            timeout=120,
        )  # fmt: skip
    finally:
        stop(gateway)
    assert status == 200, body
    assert "Paris" in json.loads(body)["choices"][0]["message"]["content"]


def test_an_index_without_the_nodes_platform_fails_and_writes_nothing(
    gateway_index: str, tmp_path: Path
) -> None:
    profile = tmp_path / "edge.yaml"
    profile.write_text(
        (ROOT / "profiles" / "edge.yaml").read_text().replace("os: nixos", "os: debian")
    )
    out = tmp_path / "wheels"
    failed = sovereign("gateway", "wheels", profile, "--out", out, "--index", gateway_index)
    assert failed.exit_code == 1, failed.output
    assert "for cp311-manylinux_2_36_aarch64" in failed.stderr
    assert "Traceback" not in failed.output
    assert not out.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".wheels")]


def test_an_out_directory_with_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("mine")
    refused = sovereign("gateway", "wheels", ROOT / "profiles" / "personal.yaml", "--out", tmp_path)
    assert refused.exit_code == 2
    assert f"--out {tmp_path} exists and is not an empty directory" in refused.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["kept.txt"]
