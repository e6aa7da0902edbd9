"""A real TPM 2.0 for tests: `swtpm` on 127.0.0.1 with its state in a test's directory.

Takes a state directory and a log path; gives a `Swtpm` with the TCTI string tpm2-tools and
the memory layer use, and a way to extend its PCRs; `wiretap` records what crosses the wire.
Plain `swtpm socket` creates its state on first start, so swtpm_setup, and the CA it would
write under /var/lib, is not needed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 10
MISSING = [tool for tool in ("swtpm", "tpm2_createprimary") if shutil.which(tool) is None]


def free_port_pair() -> int:
    """A free port P with P+1 free too: tpm2-tss's swtpm TCTI finds the control port at P+1."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


@dataclass(frozen=True)
class Swtpm:
    port: int  # the control channel listens on port + 1
    state: Path

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def tpm2(self, *argv: str) -> str:
        """Run a tpm2-tools command against this TPM; gives its stdout."""
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "TPM2TOOLS_TCTI": self.tcti},
            check=False,
        )
        assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def extend(self, pcr: int, digest: str = "5" * 64) -> None:
        self.tpm2("tpm2_pcrextend", f"{pcr}:sha256={digest}")


@contextmanager
def swtpm(state: Path, log: Path) -> Iterator[Swtpm]:
    """Start swtpm on free ports, wait until it accepts connections, stop it afterwards."""
    state.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    argv = ["swtpm", "socket", "--tpm2", "--flags", "not-need-init,startup-clear"]
    argv += ["--server", f"type=tcp,port={port},bindaddr=127.0.0.1"]
    argv += ["--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1"]
    argv += ["--tpmstate", f"dir={state}"]
    with log.open("ab") as sink:
        process = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"swtpm exited {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"swtpm did not listen in {START_TIMEOUT_S} s")
                time.sleep(0.05)
        yield Swtpm(port=port, state=state)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def wiretap(target: Swtpm) -> Iterator[tuple[str, bytearray]]:
    """A loopback proxy in front of `target`; gives its TCTI string and every byte it relayed."""
    recorded = bytearray()
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    port = free_port_pair()
    servers = [socket.create_server(("127.0.0.1", port + n)) for n in (0, 1)]

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                with lock:
                    recorded.extend(data)
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def connection(client: socket.socket, upstream_port: int) -> None:
        with client, socket.create_connection(("127.0.0.1", upstream_port)) as upstream:
            back = threading.Thread(target=pump, args=(upstream, client))
            back.start()
            pump(client, upstream)
            back.join()

    def relay(server: socket.socket, upstream_port: int) -> None:
        with suppress(OSError):  # the server socket closed: the tap is over
            while True:
                client, _ = server.accept()
                thread = threading.Thread(target=connection, args=(client, upstream_port))
                threads.append(thread)
                thread.start()

    relays = [
        threading.Thread(target=relay, args=(server, target.port + n))
        for n, server in enumerate(servers)
    ]
    for thread in relays:
        thread.start()
    try:
        yield f"swtpm:host=127.0.0.1,port={port}", recorded
    finally:
        for server in servers:
            with suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            server.close()
        for thread in relays + threads:
            thread.join(timeout=10)
