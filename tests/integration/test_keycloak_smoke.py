"""The installed Keycloak starts in dev mode on 127.0.0.1 and serves OIDC discovery for master.

Takes the cached Keycloak home (copied to tmp_path); gives pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovereign import tools

START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _fetch_json(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (fixed http URL)
            body: dict[str, object] = json.load(response)
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def keycloak(tmp_path: Path) -> Iterator[tuple[str, dict[str, object]]]:
    # start-dev writes its build and H2 database into its home, so each run gets a copy
    # and the cache stays as installed.
    home = tmp_path / "keycloak"
    shutil.copytree(tools.keycloak_home(), home, symlinks=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "KC_BOOTSTRAP_ADMIN_USERNAME": "admin",
        "KC_BOOTSTRAP_ADMIN_PASSWORD": "smoke-admin-password",
        "JAVA_OPTS_KC_HEAP": "-Xms256m -Xmx768m",
    }
    log_path = tmp_path / "keycloak.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(home / "bin" / "kc.sh"),
                "start-dev",
                "--http-port",
                str(port),
                "--http-host",
                "127.0.0.1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"{base}/realms/master/.well-known/openid-configuration"
        deadline = time.monotonic() + START_TIMEOUT_S
        discovery = None
        while discovery is None:
            if proc.poll() is not None:
                pytest.fail(f"kc.sh exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no discovery after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(1)
            discovery = _fetch_json(url)
        yield base, discovery
    finally:
        _stop(proc)


@pytest.mark.slow
def test_discovery_names_the_master_realm(keycloak: tuple[str, dict[str, object]]) -> None:
    base, discovery = keycloak

    assert discovery["issuer"] == f"{base}/realms/master"
    assert str(discovery["jwks_uri"]).startswith(f"{base}/realms/master/")
    assert str(discovery["token_endpoint"]).startswith(f"{base}/realms/master/")
