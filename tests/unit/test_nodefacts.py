"""Readers of node tool output, fed by the same tools run on this machine where it has them."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from sovereign import nodefacts

MODHEX = "cbdefghijklnrtuv"


def _run(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_listeners_reads_ss_output() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = nodefacts.listeners(_run("ss", "-Hlntup"))
    ours = [listener for listener in found if listener.port == port]
    assert len(ours) == 1
    assert (ours[0].protocol, ours[0].address) == ("tcp", "127.0.0.1")
    assert ours[0].loopback
    assert ours[0].processes == (Path("/proc/self/comm").read_text().strip(),)


def test_listeners_reads_wildcard_and_scoped_addresses() -> None:
    # Lines as ss prints sshd on every address and networkd's DHCP client on one link.
    text = (
        'tcp   LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=510,fd=3))\n'
        'tcp   LISTEN 0 128 [::]:22 [::]:* users:(("sshd",pid=510,fd=4))\n'
        "udp   UNCONN 0 0 10.0.2.15%enp0s2:68 0.0.0.0:* "
        'users:(("systemd-network",pid=301,fd=19))\n'
        "udp   UNCONN 0 0 0.0.0.0:51820 0.0.0.0:*\n"
    )
    assert [str(listener) for listener in nodefacts.listeners(text)] == [
        "tcp *:22 (sshd)",
        "tcp *:22 (sshd)",
        "udp 10.0.2.15:68 (systemd-network)",
        "udp *:51820 (no process)",
    ]


def test_interfaces_reads_proc_net_dev() -> None:
    names = nodefacts.interfaces(Path("/proc/net/dev").read_text())
    assert "lo" in names
    assert all(name and " " not in name for name in names)


def test_sysctl_values_reads_sysctl_a() -> None:
    if shutil.which("sysctl") is None:
        pytest.skip("sysctl (procps) is not installed")
    done = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, check=False)
    values = nodefacts.sysctl_values(done.stdout)
    expected = Path("/proc/sys/kernel/randomize_va_space").read_text().strip()
    assert values["kernel.randomize_va_space"] == expected


def test_sshd_settings_keep_every_value_of_a_repeated_keyword() -> None:
    settings = nodefacts.sshd_settings(
        "port 22\npermitrootlogin no\nallowusers sovereign\nallowusers ada\n"
        "ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com\n"
    )
    assert settings["permitrootlogin"] == ["no"]
    assert settings["allowusers"] == ["sovereign", "ada"]
    assert settings["ciphers"] == ["chacha20-poly1305@openssh.com,aes256-gcm@openssh.com"]


def test_crypttab_names_key_files_only_when_there_is_one() -> None:
    entries = nodefacts.crypttab(
        "# <name> <device> <key> <options>\n"
        "sovereign-data PARTLABEL=sovereign-data none tpm2-device=auto,headless=true,luks\n"
        "\n"
        "swap /dev/vdb /etc/keys/swap.key swap  # a key on the root file system\n"
        "other UUID=1234\n"
    )
    assert [(entry.name, entry.keyfile) for entry in entries] == [
        ("sovereign-data", None),
        ("swap", "/etc/keys/swap.key"),
        ("other", None),
    ]
    assert entries[0].options == ("tpm2-device=auto", "headless=true", "luks")


def test_last_setting_is_the_one_systemd_uses() -> None:
    config = (
        "# /etc/systemd/journald.conf\n[Journal]\n#Storage=auto\nStorage=volatile\n"
        "# /etc/systemd/journald.conf.d/50-sovereign.conf\n[Journal]\nStorage=persistent\n"
        "[Other]\nStorage=none\n"
    )
    assert nodefacts.last_setting(config, "Journal", "Storage") == "persistent"
    assert nodefacts.last_setting("[Journal]\n", "Journal", "Storage") is None


def test_the_recovery_key_pattern_finds_a_recovery_key_with_grep(tmp_path: Path) -> None:
    key = "-".join("".join(secrets.choice(MODHEX) for _ in range(8)) for _ in range(8))
    (tmp_path / "notes.txt").write_text(f"backup: {key}\n")
    (tmp_path / "other.txt").write_text("abcdefgh-" * 8 + "\n")  # not ModHex
    found = _run("grep", "-rlE", nodefacts.RECOVERY_KEY_PATTERN, str(tmp_path))
    assert found.split() == [str(tmp_path / "notes.txt")]


@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup is not installed")
def test_luks_binding_reads_cryptsetup_metadata(tmp_path: Path) -> None:
    volume = tmp_path / "volume.img"
    with volume.open("wb") as sink:
        sink.truncate(32 * 1024 * 1024)
    fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode"]
    _run("cryptsetup", "luksFormat", "--type", "luks2", *fast, str(volume), "-", stdin="first")
    extra = tmp_path / "extra"
    extra.write_text("second")
    _run("cryptsetup", "luksAddKey", *fast, "--key-file", "-", str(volume), str(extra),
         stdin="first")  # fmt: skip
    token = {
        "type": "systemd-tpm2",
        "keyslots": ["0"],
        "tpm2-blob": "AAAA",
        "tpm2-pcrs": [7, 0],
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": "aa",
        "tpm2-pin": False,
    }
    _run("cryptsetup", "token", "import", str(volume), stdin=json.dumps(token))
    metadata = json.loads(_run("cryptsetup", "luksDump", "--dump-json-metadata", str(volume)))
    binding = nodefacts.luks_binding(metadata)
    assert binding.tpm2_pcrs == ((0, 7),)
    assert binding.token_types == ("systemd-tpm2",)
    assert binding.keyslots == ("0", "1")
    assert binding.unaccounted == ("1",)


def test_sshd_config_lines_read_both_spellings_and_skip_comments() -> None:
    text = (
        "# Include /etc/ssh/commented.conf\n"
        "Include /etc/ssh/sshd_config.d/*.conf\n"
        "\n"
        "  PermitRootLogin=no\n"
        "PasswordAuthentication = no\n"
        "UsePAM\n"
        "Match User ada Address 10.0.2.0/24\n"
        "\tPasswordAuthentication yes\n"
    )
    assert nodefacts.sshd_config_lines(text) == [
        ("include", "/etc/ssh/sshd_config.d/*.conf"),
        ("permitrootlogin", "no"),
        ("passwordauthentication", "no"),
        ("usepam", ""),
        ("match", "User ada Address 10.0.2.0/24"),
        ("passwordauthentication", "yes"),
    ]


SSHD = Path("/usr/sbin/sshd")


@pytest.mark.skipif(not SSHD.exists(), reason="sshd (openssh-server) is not installed")
def test_sshd_config_lines_find_what_sshd_reads(tmp_path: Path) -> None:
    """sshd itself accepts what the reader reads as a Match block and a setting."""
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "key"))
    config = tmp_path / "sshd_config"
    config.write_text(
        f"HostKey {tmp_path / 'key'}\nPermitRootLogin=no\nMatch User ada\n  X11Forwarding yes\n"
    )
    _run(str(SSHD), "-t", "-f", str(config))
    lines = nodefacts.sshd_config_lines(config.read_text())
    assert ("match", "User ada") in lines
    assert ("permitrootlogin", "no") in lines


def _listening_port() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port: int = server.getsockname()[1]
    return server, port


def _closed_port() -> int:
    server, port = _listening_port()
    server.close()
    return port


def _nc(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


NC_OPENBSD = shutil.which("nc.openbsd")


@pytest.mark.skipif(NC_OPENBSD is None, reason="netcat-openbsd is not installed")
def test_nc_connected_tells_connected_refused_and_did_not_run() -> None:
    assert NC_OPENBSD is not None
    server, port = _listening_port()
    with server:
        done = _nc(NC_OPENBSD, "-v", "-z", "-w", "3", "127.0.0.1", str(port))
        assert nodefacts.nc_connected("127.0.0.1", port, done.returncode, done.stderr) is True
    closed = _closed_port()
    done = _nc(NC_OPENBSD, "-v", "-z", "-w", "3", "127.0.0.1", str(closed))
    assert nodefacts.nc_connected("127.0.0.1", closed, done.returncode, done.stderr) is False
    # A usage error also exits 1, but says nothing about a connection.
    done = _nc(NC_OPENBSD, "-v", "-z", "-w", "nonsense", "127.0.0.1", str(closed))
    assert done.returncode == 1
    assert nodefacts.nc_connected("127.0.0.1", closed, done.returncode, done.stderr) is None
    # What another address's refusal says does not count for this one.
    assert nodefacts.nc_connected("127.0.0.2", closed, 1, done.stderr) is None
    assert nodefacts.nc_connected("127.0.0.1", closed, 127, "nc: not found") is None


BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox is not installed")
def test_busybox_nc_connected_tells_refused_and_did_not_run() -> None:
    assert BUSYBOX is not None
    closed = _closed_port()
    done = _nc(BUSYBOX, "nc", "-w", "3", "127.0.0.1", str(closed))
    said = done.stdout + done.stderr
    assert nodefacts.busybox_nc_connected("127.0.0.1", done.returncode, said) is False
    missing = _nc(BUSYBOX, "no-such-applet")
    assert (
        nodefacts.busybox_nc_connected(
            "127.0.0.1", missing.returncode, missing.stdout + missing.stderr
        )
        is None
    )
    assert nodefacts.busybox_nc_connected("127.0.0.1", 0, "") is True
