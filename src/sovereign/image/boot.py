"""`sovereign image boot`: run a built image under QEMU with a fresh TPM and two canaries.

Each boot gets its own state directory: a qcow2 overlay (the built image is never
written), a copy of the OVMF variable store, and a new swtpm whose EK certificate comes
from a CA made for that boot. OVMF measures the boot into the TPM's PCRs.
Networking is QEMU's user mode with `restrict=on`: the guest reaches nothing but the
`guestfwd` addresses, which run `nc` to two canary listeners on 127.0.0.1, one the
profile allows (10.0.2.100:80) and one it must block (10.0.2.101:80). ssh is forwarded
to a loopback port. KVM is used where /dev/kvm opens, TCG otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
ALLOWED_CANARY = ("10.0.2.100", 80)
BLOCKED_CANARY = ("10.0.2.101", 80)
GUEST_ADDRESS = "10.0.2.15"
SSH_READY_TIMEOUT_S = 300
MEMORY_MIB = 2048


class BootError(Exception):
    """The node did not come up; the message says which step and where its log is."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Canary:
    """A TCP listener on loopback that records every connection made to it, one JSON line
    per connection in `log`, and answers `sovereign-canary`."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.connections: list[dict[str, Any]] = []
        lock = threading.Lock()
        canary = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(2)
                received = b""
                with suppress(OSError):
                    received = self.request.recv(1024)
                with suppress(OSError):
                    self.request.sendall(b"sovereign-canary " + canary.name.encode() + b"\n")
                record = {"time": _now(), "canary": canary.name, "received": len(received)}
                with lock:
                    canary.connections.append(record)
                    with canary.log.open("a") as sink:
                        sink.write(json.dumps(record) + "\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        log.touch()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class BootedNode:
    state: Path
    ssh_port: int
    identity: Path
    user: str
    canaries: dict[str, Canary]
    qemu: subprocess.Popen[bytes]
    swtpm: subprocess.Popen[bytes]
    accelerator: str
    boot_seconds: float = 0.0
    provision_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.ssh_port}"

    @property
    def known_hosts(self) -> Path:
        return self.state / "known_hosts"

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.identity), "-p", str(self.ssh_port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *self.ssh_options(), f"{self.user}@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def write_ssh_config(self) -> Path:
        """An ssh_config for tools that take one (testinfra, Ansible, an operator's shell)."""
        path = self.state / "ssh_config"
        path.write_text(
            f"Host node\n  HostName 127.0.0.1\n  Port {self.ssh_port}\n  User {self.user}\n"
            f"  IdentityFile {self.identity}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            f"  StrictHostKeyChecking accept-new\n  UserKnownHostsFile {self.known_hosts}\n"
            "  LogLevel ERROR\n"
        )
        return path

    def canary_context(self) -> dict[str, Any]:
        return {
            name: {"address": f"{address}:{port}", "log": str(canary.log)}
            for (name, canary), (address, port) in zip(
                sorted(self.canaries.items()), (ALLOWED_CANARY, BLOCKED_CANARY), strict=True
            )
        }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def accelerator(choice: str = "auto") -> str:
    """KVM on bare metal; TCG inside a VM, where nested KVM opens /dev/kvm and then fails to
    run the firmware (seen on these CI machines), or when asked."""
    if choice == "kvm":
        return "kvm"
    if choice == "tcg":
        return "tcg,thread=multi"
    try:
        with open("/dev/kvm", "rb"):
            pass
        nested = " hypervisor " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return "tcg,thread=multi"
    return "tcg,thread=multi" if nested else "kvm"


def _run(argv: list[str], what: str, **kwargs: Any) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        raise BootError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")


def _start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A new TPM for this boot, with an EK certificate signed by a CA made for it; the CA and
    swtpm_setup's configuration stay in `state` (nothing lands in /var/lib or ~/.config)."""
    tpm = state / "tpm"
    ca = tpm / "ca"
    ca.mkdir(parents=True)
    (tpm / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n"
    )
    (tpm / "swtpm-localca.options").write_text(
        "--platform-manufacturer SovereignStack\n--platform-version 2.1\n--platform-model QEMU\n"
    )
    (tpm / "swtpm_setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {tpm}/swtpm-localca.conf\n"
        f"create_certs_tool_options = {tpm}/swtpm-localca.options\n"
    )
    (tpm / "state").mkdir()
    _run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(tpm / "state"),
            "--config", str(tpm / "swtpm_setup.conf"),
            "--create-ek-cert", "--create-platform-cert", "--pcr-banks", "sha256",
            "--logfile", str(tpm / "swtpm_setup.log"),
        ],
        "swtpm_setup",
        env={**os.environ, "XDG_CONFIG_HOME": str(tpm)},
    )  # fmt: skip
    sock = tpm / "swtpm.sock"
    process = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm / 'state'}",
            "--ctrl", f"type=unixio,path={sock}", "--log", f"file={tpm / 'swtpm.log'},level=1",
            "--terminate",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise BootError(f"swtpm did not start; see {tpm / 'swtpm.log'}")
        time.sleep(0.05)
    return process, sock


def _qemu_argv(
    image: Path, state: Path, sock: Path, ssh_port: int, canaries: dict[str, Canary], accel: str
) -> list[str]:
    overlay = state / "overlay.qcow2"
    vars_copy = state / "OVMF_VARS.fd"
    guestfwd = [
        f"guestfwd=tcp:{address}:{port}-cmd:nc -q1 127.0.0.1 {canaries[name].port}"
        for name, (address, port) in (("allowed", ALLOWED_CANARY), ("blocked", BLOCKED_CANARY))
    ]
    netdev = ",".join(
        ["user", "id=net0", "restrict=on", f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22", *guestfwd]
    )
    return [
        "qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max",
        "-m", str(MEMORY_MIB), "-smp", str(min(2, os.cpu_count() or 1)),
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
        "-chardev", f"socket,id=chrtpm,path={sock}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0",
        "-display", "none", "-monitor", "none", "-serial", f"file:{state / 'console.log'}",
        "-no-reboot",
    ]  # fmt: skip


@contextmanager
def boot(
    image: Path, state: Path, identity: Path, user: str, accel: str = "auto"
) -> Iterator[BootedNode]:
    """Boot `image` (a raw disk) with its state in `state` (made fresh; must not exist or be
    empty); yields once ssh answers, and stops QEMU and swtpm on the way out."""
    for tool in ("qemu-system-x86_64", "qemu-img", "swtpm", "swtpm_setup", "nc"):
        if shutil.which(tool) is None:
            raise BootError(f"{tool} is not installed; run `sovereign tools install`")
    for firmware in (OVMF_CODE, OVMF_VARS):
        if not firmware.is_file():
            raise BootError(f"{firmware} is missing; install the ovmf package")
    if state.exists() and any(state.iterdir()):
        raise BootError(f"the boot state directory {state} is not empty")
    state.mkdir(parents=True, exist_ok=True)
    _run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()),
         str(state / "overlay.qcow2")],
        "qemu-img create",
    )  # fmt: skip
    shutil.copyfile(OVMF_VARS, state / "OVMF_VARS.fd")
    canaries = {
        name: Canary(name, state / f"canary-{name}.jsonl") for name in ("allowed", "blocked")
    }
    swtpm: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    try:
        swtpm, sock = _start_swtpm(state)
        ssh_port = _free_port()
        accel = accelerator(accel)
        started = time.monotonic()
        with (state / "qemu.log").open("wb") as sink:
            qemu = subprocess.Popen(
                _qemu_argv(image, state, sock, ssh_port, canaries, accel),
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        node = BootedNode(
            state, ssh_port, identity, user, canaries, qemu, swtpm, accel.split(",")[0]
        )
        _wait_for_ssh(node)
        node.boot_seconds = time.monotonic() - started
        yield node
    finally:
        _stop(qemu, swtpm)
        for canary in canaries.values():
            canary.close()


def _wait_for_ssh(node: BootedNode) -> None:
    deadline = time.monotonic() + SSH_READY_TIMEOUT_S
    while True:
        if node.qemu.poll() is not None:
            raise BootError(
                f"QEMU exited ({node.qemu.returncode}) before ssh answered; see "
                f"{node.state / 'qemu.log'} and {node.state / 'console.log'}"
            )
        with suppress(subprocess.TimeoutExpired):
            if node.ssh("true", timeout=20).returncode == 0:
                return
        if time.monotonic() > deadline:
            raise BootError(
                f"ssh did not answer in {SSH_READY_TIMEOUT_S} s; the console is in "
                f"{node.state / 'console.log'}"
            )
        time.sleep(2)


def _stop(qemu: subprocess.Popen[bytes] | None, swtpm: subprocess.Popen[bytes] | None) -> None:
    for process in (qemu, swtpm):
        if process is None or process.poll() is not None:
            continue
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
