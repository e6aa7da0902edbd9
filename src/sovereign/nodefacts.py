"""Readers for what the node suites see on a node: sockets, interfaces, sshd, sysctl, LUKS2.

Each takes one tool's text or JSON output (ss, /proc/net/dev, sshd -T, sshd_config,
sysctl -a, cryptsetup luksDump --dump-json-metadata, /etc/crypttab, nc) and gives plain
values to compare.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# systemd-cryptenroll's recovery key: 8 groups of 8 ModHex characters (grep -E syntax).
RECOVERY_KEY_PATTERN = "[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}"
_PROCESS = re.compile(r'\("([^"]+)"')
_DIRECTIVE = re.compile(r"(\S+?)(?:\s*=\s*|\s+|$)(.*)")


@dataclass(frozen=True)
class Listener:
    protocol: str  # tcp | udp
    address: str  # "*" for every address
    port: int
    processes: tuple[str, ...]

    @property
    def loopback(self) -> bool:
        return self.address in ("127.0.0.1", "::1") or self.address.startswith("127.")

    def __str__(self) -> str:
        owner = ",".join(self.processes) or "no process"
        return f"{self.protocol} {self.address}:{self.port} ({owner})"


def listeners(ss_output: str) -> list[Listener]:
    """`ss -Hlntup`: one socket a line; netid, state, queues, local, peer, process."""
    found = []
    for line in ss_output.splitlines():
        columns = line.split()
        if len(columns) < 5:
            continue
        address, _, port = columns[4].rpartition(":")
        address = address.strip("[]").split("%")[0]
        if address in ("0.0.0.0", "::", ""):  # noqa: S104 (reading ss, not binding)
            address = "*"
        process = " ".join(columns[6:])
        found.append(
            Listener(
                columns[0], address, int(port), tuple(dict.fromkeys(_PROCESS.findall(process)))
            )
        )
    return found


def interfaces(proc_net_dev: str) -> list[str]:
    """The interface names in /proc/net/dev (after its two header lines)."""
    names = []
    for line in proc_net_dev.splitlines():
        name, colon, _ = line.partition(":")
        if colon and "|" not in name and name.strip():
            names.append(name.strip())
    return names


def sshd_settings(sshd_t: str) -> dict[str, list[str]]:
    """`sshd -T`: lower-case keyword, value; a keyword given several times keeps every value."""
    settings: dict[str, list[str]] = {}
    for line in sshd_t.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            settings.setdefault(key.lower(), []).append(value.strip())
    return settings


def sysctl_values(sysctl_a: str) -> dict[str, str]:
    values = {}
    for line in sysctl_a.splitlines():
        key, equals, value = line.partition(" = ")
        if equals:
            values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class CrypttabEntry:
    name: str
    device: str
    key: str
    options: tuple[str, ...]

    @property
    def keyfile(self) -> str | None:
        """The key file named in the third field; None for "none", "-" or nothing."""
        return None if self.key in ("", "none", "-") else self.key


def crypttab(text: str) -> list[CrypttabEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        key = fields[2] if len(fields) > 2 else ""
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ()
        entries.append(CrypttabEntry(fields[0], fields[1], key, options))
    return entries


@dataclass(frozen=True)
class LuksBinding:
    tpm2_pcrs: tuple[tuple[int, ...], ...]  # one PCR list per systemd-tpm2 token
    token_types: tuple[str, ...]
    keyslots: tuple[str, ...]
    # Keyslots no systemd-tpm2 or systemd-recovery token accounts for: a leftover
    # bootstrap passphrase or key file that would open the volume without the TPM.
    unaccounted: tuple[str, ...]


def luks_binding(metadata: Mapping[str, Any]) -> LuksBinding:
    """From `cryptsetup luksDump --dump-json-metadata`."""
    tokens = list((metadata.get("tokens") or {}).values())
    keyslots = tuple(sorted((metadata.get("keyslots") or {}).keys(), key=int))
    accounted = {
        str(slot)
        for token in tokens
        if token.get("type") in ("systemd-tpm2", "systemd-recovery")
        for slot in token.get("keyslots", [])
    }
    return LuksBinding(
        tpm2_pcrs=tuple(
            tuple(sorted(int(pcr) for pcr in token.get("tpm2-pcrs", [])))
            for token in tokens
            if token.get("type") == "systemd-tpm2"
        ),
        token_types=tuple(str(token.get("type")) for token in tokens),
        keyslots=keyslots,
        unaccounted=tuple(slot for slot in keyslots if slot not in accounted),
    )


def last_setting(config: str, section: str, key: str) -> str | None:
    """The value that wins in `systemd-analyze cat-config` output: the last one in `section`."""
    value = None
    current = None
    for raw in config.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section:
            name, equals, setting = line.partition("=")
            if equals and name.strip() == key:
                value = setting.strip()
    return value


def sshd_config_lines(text: str) -> list[tuple[str, str]]:
    """An sshd_config file's directives: (lower-case keyword, its arguments), comments aside.

    sshd takes "Keyword value" and "Keyword=value" alike.
    """
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        directive = _DIRECTIVE.match(line)
        if directive:
            lines.append((directive[1].lower(), directive[2].strip()))
    return lines


@dataclass(frozen=True)
class Probe:
    connected: bool
    said: str  # the command, its exit code and what it printed


def nc_connected(host: str, port: int, exit_code: int, stderr: str) -> bool | None:
    """`nc -v -z` (netcat-openbsd): True if it connected, False if it tried and could not
    (exit 1, "connect to HOST port PORT (tcp) failed" or "timed out"), None if it did not run
    as it should (missing, a usage error, ssh trouble), which proves nothing either way."""
    if exit_code == 0:
        return True
    tried = re.compile(rf"connect to {re.escape(host)} port {port} \(tcp\) (failed|timed out)")
    if exit_code == 1 and tried.search(stderr):
        return False
    return None


def busybox_nc_connected(host: str, exit_code: int, output: str) -> bool | None:
    """BusyBox `nc -w N HOST PORT`: True if it connected, False if it tried and could not
    (exit 1, "can't connect to remote host (HOST)"), None if it did not run as it should."""
    if exit_code == 0:
        return True
    if exit_code == 1 and f"can't connect to remote host ({host})" in output:
        return False
    return None
