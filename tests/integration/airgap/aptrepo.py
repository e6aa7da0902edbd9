"""A real signed Debian repository for the mirror tests.

Small .debs are built with `dpkg-deb --build`; `reprepro` lays them out as a pool and
dists/ with Packages indexes (plain, .gz, .xz), Release, InRelease and Release.gpg, signed
with a throwaway ed25519 key made by `gpg --quick-gen-key` in a temporary GNUPGHOME.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

COMMAND_TIMEOUT_S = 60


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    arch: str = "amd64"
    fields: Mapping[str, str] = field(default_factory=dict)  # Depends, Provides, Priority...
    payload: int = 0  # bytes of random data, to make a package big enough to interrupt


@dataclass(frozen=True)
class Key:
    home: Path  # GNUPGHOME holding the secret key
    fingerprint: str
    keyring: Path  # the public key alone, a binary keyring as gpgv reads it

    def gpg(self, *args: str, stdin: bytes | None = None) -> bytes:
        return _run(["gpg", "--batch", "--quiet", "--homedir", str(self.home), *args], stdin)

    def clearsign(self, text: bytes) -> bytes:
        """An InRelease: `text` in an inline signature by this key."""
        return self.gpg("--local-user", self.fingerprint, "--clearsign", stdin=text)


@contextmanager
def signing_key(home: Path, uid: str) -> Iterator[Key]:
    """A new key without passphrase; its gpg-agent is stopped on the way out."""
    home.mkdir(mode=0o700, parents=True)
    base = ["gpg", "--batch", "--quiet", "--homedir", str(home)]
    try:
        _run(
            [
                *base,
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                "ed25519",
                "sign",
                "never",
            ]
        )
        listing = _run([*base, "--with-colons", "--list-secret-keys", uid]).decode()
        fingerprint = next(
            line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
        )
        keyring = home.parent / f"{home.name}.keyring.gpg"
        keyring.write_bytes(_run([*base, "--export", fingerprint]))
        yield Key(home, fingerprint, keyring)
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )


def build_deb(work: Path, deb: Deb) -> Path:
    """A .deb with a control file, a copyright file and `payload` random bytes."""
    tree = work / f"{deb.name}_{deb.version}_{deb.arch}".replace(":", "%3a")
    control = {
        "Package": deb.name,
        "Version": deb.version,
        "Architecture": deb.arch,
        "Maintainer": "Sovereign Tests <tests@sovereign.invalid>",
        "Section": "misc",
        "Priority": "optional",
        **deb.fields,
        "Description": f"test package {deb.name}",
    }
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "".join(f"{name}: {value}\n" for name, value in control.items())
    )
    doc = tree / "usr" / "share" / "doc" / deb.name
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(f"{deb.name}: test data, CC0-1.0\n")
    if deb.payload:
        (doc / "blob").write_bytes(os.urandom(deb.payload))
    out = tree.with_name(f"{tree.name}.deb")
    # No compression: random payloads do not shrink, and building stays fast.
    _run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(out)])
    return out


def make_repository(
    root: Path,
    key: Key,
    dists: Mapping[str, Sequence[Path]],
    valid_for: Mapping[str, str] | None = None,
) -> None:
    """A reprepro repository at `root` with one distribution (main, amd64) per entry."""
    (root / "conf").mkdir(parents=True)
    stanzas = []
    for codename in dists:
        stanza = [
            f"Codename: {codename}",
            "Architectures: amd64",
            "Components: main",
            "DebIndices: Packages Release . .gz .xz",
            f"SignWith: {key.fingerprint}",
        ]
        if valid_for and codename in valid_for:
            stanza.append(f"ValidFor: {valid_for[codename]}")
        stanzas.append("\n".join(stanza) + "\n")
    (root / "conf" / "distributions").write_text("\n".join(stanzas))
    for codename, debs in dists.items():
        _run(
            ["reprepro", "--basedir", str(root), "includedeb", codename, *map(str, debs)],
            env={"GNUPGHOME": str(key.home)},
        )


def _run(argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None) -> bytes:
    result = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr.decode()}")
    return result.stdout
