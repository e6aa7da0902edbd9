"""Baseline: the dev-sec linux-baseline and ssh-baseline controls that apply to a node.

Checked on the running node, independently of the base_hardening role that set them:
sshd's effective configuration, kernel parameters, account files, journald, setuid files.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import pytest
from testinfra.host import Host

from sovereign.nodefacts import last_setting, sshd_config_lines, sshd_settings, sysctl_values
from sovereign.verify import RoleVariables

# ssh-baseline sshd-06, -13, -17, -19, -22..-28 and the forwarding controls.
SSHD_ACCESS = {
    "permitrootlogin": "no",
    "passwordauthentication": "no",
    "kbdinteractiveauthentication": "no",
    "permitemptypasswords": "no",
    "pubkeyauthentication": "yes",
    "hostbasedauthentication": "no",
    "ignorerhosts": "yes",
    "permituserenvironment": "no",
    "strictmodes": "yes",
    "loglevel": "VERBOSE",
}
SSHD_FORWARDING = {
    "x11forwarding": "no",
    "allowtcpforwarding": "no",
    "allowagentforwarding": "no",
    "permittunnel": "no",
    "gatewayports": "no",
}
MAX_AUTH_TRIES = 3
# Substrings that mark a weak algorithm (ssh-baseline's ssh_crypto lists the strong ones).
WEAK = {
    "ciphers": ("cbc", "arcfour", "3des", "blowfish", "cast128"),
    "macs": ("md5", "sha1", "umac-64", "ripemd"),
    "kexalgorithms": ("sha1", "group1-", "group14-sha1"),
}
# linux-baseline sysctl-01..-20, -30..-34: the network set, then the kernel set.
SYSCTL_NETWORK = {
    "net.ipv4.ip_forward": "0",
    "net.ipv4.conf.all.forwarding": "0",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "1",
    "net.ipv4.icmp_ignore_bogus_error_responses": "1",
    "net.ipv4.icmp_echo_ignore_broadcasts": "1",
    "net.ipv4.tcp_syncookies": "1",
    "net.ipv4.tcp_rfc1337": "1",
    "net.ipv4.conf.all.accept_source_route": "0",
    "net.ipv4.conf.default.accept_source_route": "0",
    "net.ipv6.conf.all.accept_source_route": "0",
    "net.ipv6.conf.default.accept_source_route": "0",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.secure_redirects": "0",
    "net.ipv4.conf.default.secure_redirects": "0",
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
    "net.ipv4.conf.all.log_martians": "1",
    "net.ipv4.conf.default.log_martians": "1",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0",
}
SYSCTL_KERNEL = {
    "kernel.randomize_va_space": "2",
    "kernel.sysrq": "0",
    "fs.suid_dumpable": "0",
    "fs.protected_hardlinks": "1",
    "fs.protected_symlinks": "1",
}
# File -> (owner, groups it may have, the most permissive mode allowed).
ACCOUNT_FILES = {
    "/etc/shadow": ("root", ("root", "shadow"), 0o640),
    "/etc/gshadow": ("root", ("root", "shadow"), 0o640),
    "/etc/passwd": ("root", ("root",), 0o644),
    "/etc/group": ("root", ("root",), 0o644),
}


SSHD_CONFIG = "/etc/ssh/sshd_config"
MAX_CONFIG_FILES = 64
# What an Include pattern may hold to be expanded by the node's shell as sshd's glob(3) would.
_PLAIN_PATTERN = re.compile(r"[A-Za-z0-9_./*?\[\]-]+")


@pytest.fixture(scope="module")
def sshd(output: Callable[[str], str], sudo: str, variables: RoleVariables) -> dict[str, list[str]]:
    """sshd's settings for the operator's own connection: the admin user, from where the
    operator's ssh comes from (10.0.2.2 behind QEMU's user network), to where it arrived."""
    admin = str(variables.get("base_hardening_admin_user") or "sovereign")
    fields = output("echo $SSH_CONNECTION").split()
    if len(fields) != 4:
        pytest.fail(f"SSH_CONNECTION on the node is {fields}, not client and server addresses")
    client, _, local, local_port = fields
    spec = f"user={admin},addr={client},host=operator,laddr={local},lport={local_port}"
    return sshd_settings(output(f"{sudo}sshd -T -C {shlex.quote(spec)}"))


def _includes(output: Callable[[str], str], sudo: str, pattern: str) -> list[str]:
    """The files an Include pattern names, expanded on the node (relative to /etc/ssh)."""
    if not pattern.startswith("/"):
        pattern = f"/etc/ssh/{pattern}"
    assert _PLAIN_PATTERN.fullmatch(pattern), f"sshd Include {pattern!r}: cannot expand it"
    listing = f'for f in {pattern}; do [ -f "$f" ] && printf "%s\\n" "$f"; done; true'
    return output(f"{sudo}sh -c {shlex.quote(listing)}").splitlines()


@pytest.fixture(scope="module")
def sshd_config(output: Callable[[str], str], sudo: str) -> dict[str, str]:
    """sshd_config and every file it Includes, however deep: path -> text."""
    files: dict[str, str] = {}
    pending = [SSHD_CONFIG]
    while pending:
        path = pending.pop(0)
        if path in files:
            continue
        assert len(files) < MAX_CONFIG_FILES, f"sshd reads more than {MAX_CONFIG_FILES} files"
        files[path] = output(f"{sudo}cat {shlex.quote(path)}")
        for keyword, arguments in sshd_config_lines(files[path]):
            if keyword == "include":
                for pattern in arguments.split():
                    pending += _includes(output, sudo, pattern)
    return files


@pytest.fixture(scope="module")
def sysctl(output: Callable[[str], str], sudo: str) -> dict[str, str]:
    return sysctl_values(output(f"{sudo}sysctl -a 2>/dev/null || true"))


def _differences(seen: dict[str, str], wanted: dict[str, str]) -> dict[str, str]:
    return {
        key: f"{seen.get(key, 'unset')} (want {value})"
        for key, value in wanted.items()
        if seen.get(key) != value
    }


def _first(settings: dict[str, list[str]]) -> dict[str, str]:
    return {key: values[0] for key, values in settings.items()}


def test_sshd_refuses_root_and_passwords(
    sshd: dict[str, list[str]], variables: RoleVariables, observe: Callable[..., None]
) -> None:
    """sshd: no root login, keys only, few tries, verbose log, only the admin user"""
    admin = str(variables.get("base_hardening_admin_user") or "sovereign")
    wrong = _differences(_first(sshd), SSHD_ACCESS)
    tries = int(sshd.get("maxauthtries", ["6"])[0])
    users = sorted(" ".join(sshd.get("allowusers", [])).split())
    observe(**{key: sshd.get(key, ["unset"])[0] for key in SSHD_ACCESS}, maxauthtries=tries)
    observe(allowusers=users)
    if tries > MAX_AUTH_TRIES:
        wrong["maxauthtries"] = f"{tries} (want at most {MAX_AUTH_TRIES})"
    if users != [admin]:
        wrong["allowusers"] = f"{users} (want [{admin!r}])"
    assert not wrong, f"sshd settings: {wrong}"


def test_sshd_config_has_no_match_block(
    sshd_config: dict[str, str], observe: Callable[..., None]
) -> None:
    """sshd's configuration files hold no Match block that could loosen any of this"""
    blocks = [
        f"{path}: Match {arguments}"
        for path, text in sshd_config.items()
        for keyword, arguments in sshd_config_lines(text)
        if keyword == "match"
    ]
    observe(files=sorted(sshd_config), match_blocks=blocks)
    assert not blocks, f"Match blocks, whose settings sshd -T does not show: {blocks}"


def test_sshd_forwarding_off(sshd: dict[str, list[str]], observe: Callable[..., None]) -> None:
    """sshd forwards nothing: no X11, TCP, agent, tunnels or gateway ports"""
    observe(**{key: sshd.get(key, ["unset"])[0] for key in SSHD_FORWARDING})
    wrong = _differences(_first(sshd), SSHD_FORWARDING)
    assert not wrong, f"sshd forwarding settings: {wrong}"


def test_sshd_crypto_is_modern(sshd: dict[str, list[str]], observe: Callable[..., None]) -> None:
    """sshd offers no weak cipher, MAC or key exchange"""
    offered = {kind: sshd.get(kind, [""])[0].split(",") for kind in WEAK}
    observe(**offered)
    weak = {
        kind: [name for name in names if any(marker in name for marker in WEAK[kind])]
        for kind, names in offered.items()
    }
    weak = {kind: names for kind, names in weak.items() if names}
    assert not weak, f"weak algorithms offered: {weak}"


def test_network_sysctl(sysctl: dict[str, str], observe: Callable[..., None]) -> None:
    """Kernel network parameters: no forwarding, redirects or source routes; rp_filter on"""
    wrong = _differences(sysctl, SYSCTL_NETWORK)
    observe(checked=len(SYSCTL_NETWORK), differing=wrong)
    assert not wrong, f"sysctl: {wrong}"


def test_kernel_sysctl(sysctl: dict[str, str], observe: Callable[..., None]) -> None:
    """Kernel parameters: full ASLR, no SysRq, no setuid core dumps, protected links"""
    wrong = _differences(sysctl, SYSCTL_KERNEL)
    observe(**{key: sysctl.get(key, "unset") for key in SYSCTL_KERNEL})
    assert not wrong, f"sysctl: {wrong}"


def test_account_files_permissions(node: Host, observe: Callable[..., None]) -> None:
    """/etc/shadow and gshadow are root's, 0640 at most; passwd and group 0644 at most"""
    wrong = {}
    seen = {}
    for path, (owner, groups, widest) in ACCOUNT_FILES.items():
        file = node.file(path)
        seen[path] = f"{file.user}:{file.group} {file.mode:04o}"
        if file.user != owner or file.group not in groups or file.mode & ~widest:
            wrong[path] = seen[path]
    observe(**seen)
    assert not wrong, f"account files too open or wrongly owned: {wrong}"


def test_root_is_locked(
    output: Callable[[str], str], sudo: str, observe: Callable[..., None]
) -> None:
    """root's password is locked: no one logs in as root with a password"""
    status = output(f"{sudo}passwd -S root").split()
    observe(passwd_status=" ".join(status[:2]))
    assert status[1:2] == ["L"], f"root's password status is {status[1:2]}, not L (locked)"


def test_journald_is_persistent(
    node: Host, output: Callable[[str], str], observe: Callable[..., None]
) -> None:
    """journald keeps the journal on disk, across reboots"""
    config = output("systemd-analyze cat-config systemd/journald.conf")
    storage = last_setting(config, "Journal", "Storage") or "auto"
    directory = node.file("/var/log/journal")
    observe(storage=storage, journal_dir=directory.is_directory)
    assert storage == "persistent", f"journald Storage={storage}, want persistent"
    assert directory.is_directory, "/var/log/journal does not exist"


def test_no_unexpected_setuid(
    output: Callable[[str], str], sudo: str, variables: RoleVariables, observe: Callable[..., None]
) -> None:
    """No setuid or setgid file on the root file system beyond base_hardening_suid_allowed"""
    allowed = set(variables["base_hardening_suid_allowed"])
    found = set(output(f"{sudo}find / -xdev -perm /6000 -type f").split())
    observe(found=sorted(found), allowed=sorted(allowed))
    unexpected = sorted(found - allowed)
    assert not unexpected, f"setuid/setgid files not in the allowlist: {unexpected}"
