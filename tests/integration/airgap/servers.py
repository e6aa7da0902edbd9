"""Loopback servers for the air-gap tests, each a real process the test can stop mid-transfer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sovereign.mirror.fetch import Fetcher
from tests.integration.conftest import free_port, start, stop, wait_listening

# The loopback PyPI index lives in conftest, where the gateway wheelhouse fixture uses it.
from tests.integration.conftest import pypiserver as pypiserver

FILE_SERVER = Path(__file__).with_name("fileserver.py")
START_TIMEOUT_S = 30


@dataclass
class FileServer:
    """`fileserver.py` over `root`; `restart` brings it back on the same port."""

    root: Path
    log: Path
    hub: bool = False
    rate: int = 0
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, str(FILE_SERVER), "--root", str(self.root)]
        command += ["--port", str(self.port), "--rate", str(self.rate)]
        if self.hub:
            command.append("--hub")
        self.process = start(command, self.log)
        wait_listening(f"{self.url}/", self.process, self.log, START_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def restart(self, rate: int | None = None) -> None:
        self.stop()
        if rate is not None:
            self.rate = rate
        self.start()


@contextmanager
def file_server(root: Path, log: Path, hub: bool = False, rate: int = 0) -> Iterator[FileServer]:
    server = FileServer(root, log, hub, rate)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def need(*tools: str) -> None:
    """Fail, not skip: `.ci/run` installs every one of these (sovereign tools install)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `sovereign tools install`")


@contextmanager
def proxpi(upstream: str, cache: Path, log: Path) -> Iterator[str]:
    """proxpi in front of `upstream`: the same projects through the PEP 691 JSON API."""
    port = free_port()
    env = {"PROXPI_INDEX_URL": upstream, "PROXPI_CACHE_DIR": str(cache)}
    command = [sys.executable, "-m", "flask", "--app", "proxpi.server", "run"]
    process = start([*command, "--host", "127.0.0.1", "--port", str(port)], log, env)
    try:
        wait_listening(f"http://127.0.0.1:{port}/index/", process, log, START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/index/"
    finally:
        stop(process)


OPEN_FETCHERS: list[Fetcher] = []


def new_fetcher(**options: Any) -> Fetcher:
    """A fetcher with short backoffs and a recording console, closed after the test (by
    conftest), so its pooled connections are not left for the collector in a later test."""
    defaults: dict[str, Any] = {
        "backoff": 0.2,
        "console": Console(record=True, width=200, force_terminal=False),
    }
    fetcher = Fetcher(**{**defaults, **options})
    OPEN_FETCHERS.append(fetcher)
    return fetcher
