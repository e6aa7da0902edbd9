"""Envelope encryption: chunk AEAD, wrapped data keys, the file and passphrase KEK providers,
and key rotation, including rotations that fail or are killed part-way."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from argon2.low_level import Type, hash_secret_raw
from sovereign_gateway.memory.envelope import (
    DATA_KEY_VERSION,
    Kek,
    KekSettings,
    KeyRing,
    chunk_aad,
    new_data_key,
    passphrase_from_environment,
    seal,
    seal_chunks,
    unseal,
)
from sovereign_gateway.memory.errors import KeyUnavailable, Tampered

DOC = "a" * 64
OTHER_DOC = "b" * 64
PASSPHRASE = "correct horse battery staple"
NEW_PASSPHRASE = "tr0ub4dor&3 but longer"


def file_settings(tmp_path: Path, name: str = "memory.key") -> KekSettings:
    return KekSettings(
        source="file", keyring=tmp_path / "data" / "keyring.json", key_file=tmp_path / "keys" / name
    )


def passphrase_settings(tmp_path: Path, passphrase: str | None) -> KekSettings:
    return KekSettings(
        source="passphrase", keyring=tmp_path / "data" / "keyring.json", passphrase=passphrase
    )


class Catalog:
    """Stands in for the lead's SQLite catalog: doc id -> (KEK version, wrapped data key).

    `rewrap` swaps the whole mapping at once, as the catalog's single transaction does."""

    def __init__(self, ring: KeyRing, documents: int = 3) -> None:
        self.rows: dict[str, tuple[int, bytes]] = {}
        self.data_keys: dict[str, bytes] = {}
        for n in range(documents):
            doc_id = f"{n:064x}"
            self.data_keys[doc_id] = new_data_key()
            self.rows[doc_id] = (
                ring.current.version,
                ring.current.wrap(self.data_keys[doc_id], doc_id),
            )

    def rewrap(self, ring: KeyRing, new: Kek) -> int:
        self.rows = {
            doc_id: (new.version, new.wrap(ring.kek(version).unwrap(wrapped, doc_id), doc_id))
            for doc_id, (version, wrapped) in self.rows.items()
        }
        return len(self.rows)

    def assert_readable(self, ring: KeyRing) -> None:
        for doc_id, (version, wrapped) in self.rows.items():
            assert ring.kek(version).unwrap(wrapped, doc_id) == self.data_keys[doc_id]


def failing_rewrap(ring: KeyRing, new: Kek) -> int:
    """Rewraps one key, then fails before anything commits."""
    new.wrap(new_data_key(), DOC)
    raise RuntimeError("disk full")


def assert_not_in(secret: bytes, path: Path) -> None:
    text = path.read_bytes()
    for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
        assert form not in text


def keyring_versions(settings: KekSettings) -> list[tuple[int, str]]:
    document = json.loads(settings.keyring.read_text())
    return [(v["version"], v["state"]) for v in document["versions"]]


# --- chunk AEAD ------------------------------------------------------------------------------


def test_seal_round_trip() -> None:
    key, aad = new_data_key(), chunk_aad(DOC, 0, DATA_KEY_VERSION)
    for plaintext in (b"", b"hello", os.urandom(5000)):
        sealed = seal(key, plaintext, aad)
        assert len(sealed) == 12 + len(plaintext) + 16
        assert plaintext not in sealed or not plaintext
        assert unseal(key, sealed, aad) == plaintext


def test_seal_chunks_binds_each_to_its_index() -> None:
    key = new_data_key()
    sealed = seal_chunks(key, DOC, DATA_KEY_VERSION, [b"zero", b"one", b"two"])
    for index, text in enumerate([b"zero", b"one", b"two"]):
        assert unseal(key, sealed[index], chunk_aad(DOC, index, DATA_KEY_VERSION)) == text
    with pytest.raises(Tampered):
        unseal(key, sealed[1], chunk_aad(DOC, 2, DATA_KEY_VERSION))


def test_seal_chunks_of_a_large_document_keep_order_and_fresh_nonces() -> None:
    key = new_data_key()
    chunks = [f"chunk {index}".encode() for index in range(5000)]
    sealed = seal_chunks(key, DOC, DATA_KEY_VERSION, chunks)
    assert len(sealed) == len(chunks)
    assert len({s[:12] for s in sealed}) == len(chunks)
    for index in (0, 1249, 1250, 2500, 4999):
        aad = chunk_aad(DOC, index, DATA_KEY_VERSION)
        assert unseal(key, sealed[index], aad) == chunks[index]


def test_every_seal_uses_a_fresh_nonce() -> None:
    key, aad = new_data_key(), chunk_aad(DOC, 0, DATA_KEY_VERSION)
    sealed = [seal(key, b"same chunk", aad) for _ in range(1000)]
    assert len(set(sealed)) == 1000
    assert len({s[:12] for s in sealed}) == 1000


@pytest.mark.parametrize(
    ("region", "offset"), [("nonce", 0), ("ciphertext", 12), ("tag", -1), ("tag start", -16)]
)
def test_flipped_byte_is_tampered(region: str, offset: int) -> None:
    key, aad = new_data_key(), chunk_aad(DOC, 3, DATA_KEY_VERSION)
    sealed = bytearray(seal(key, b"chunk text", aad))
    sealed[offset] ^= 0x01
    with pytest.raises(Tampered):
        unseal(key, bytes(sealed), aad)


@pytest.mark.parametrize("length", [0, 11, 27, 37])
def test_truncated_is_tampered(length: int) -> None:
    key, aad = new_data_key(), chunk_aad(DOC, 0, DATA_KEY_VERSION)
    sealed = seal(key, b"chunk text", aad)  # 38 bytes
    with pytest.raises(Tampered):
        unseal(key, sealed[:length], aad)


@pytest.mark.parametrize(
    "moved",
    [(OTHER_DOC, 0, DATA_KEY_VERSION), (DOC, 1, DATA_KEY_VERSION), (DOC, 0, DATA_KEY_VERSION + 1)],
    ids=["other document", "other chunk", "other key version"],
)
def test_ciphertext_moved_elsewhere_is_tampered(moved: tuple[str, int, int]) -> None:
    key = new_data_key()
    sealed = seal(key, b"chunk text", chunk_aad(DOC, 0, DATA_KEY_VERSION))
    with pytest.raises(Tampered):
        unseal(key, sealed, chunk_aad(*moved))


def test_wrong_data_key_is_tampered() -> None:
    aad = chunk_aad(DOC, 0, DATA_KEY_VERSION)
    with pytest.raises(Tampered):
        unseal(new_data_key(), seal(new_data_key(), b"chunk text", aad), aad)


def test_chunk_aad_is_unambiguous_and_checks_its_fields() -> None:
    # Without length prefixes "ab"+1 and "a"+"b..." style splits could collide.
    assert chunk_aad("ab", 1, 1) != chunk_aad("a", 1, 1)
    assert chunk_aad(DOC, 256, 1) != chunk_aad(DOC, 1, 256)
    assert chunk_aad(DOC, 0, 1) == chunk_aad(DOC, 0, 1)
    for args, field in [
        (("", 0, 1), "doc_id"),
        ((DOC, -1, 1), "index"),
        ((DOC, 0, 0), "key_version"),
    ]:
        with pytest.raises(ValueError, match=field):
            chunk_aad(*args)
    with pytest.raises(ValueError, match="key: must be 32 bytes"):
        seal(b"short", b"x", b"")


# --- file provider and wrapped keys ---------------------------------------------------------


def test_file_provider_creates_private_files_and_reopens(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    data_key = new_data_key()
    wrapped = KeyRing.open(settings).current.wrap(data_key, DOC)
    assert settings.key_file is not None
    assert stat.S_IMODE(settings.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.key_file.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(settings.keyring.stat().st_mode) == 0o600
    assert len(settings.key_file.read_bytes()) == 32
    assert_not_in(settings.key_file.read_bytes(), settings.keyring)

    ring = KeyRing.open(settings, create=False)
    assert ring.current.version == 1
    assert ring.current.unwrap(wrapped, DOC) == data_key
    assert len(wrapped) == 1 + 12 + 32 + 16


def test_wrapped_key_is_bound_to_its_document_and_intact(tmp_path: Path) -> None:
    kek = KeyRing.open(file_settings(tmp_path)).current
    wrapped = kek.wrap(new_data_key(), DOC)
    with pytest.raises(Tampered):
        kek.unwrap(wrapped, OTHER_DOC)
    for offset in (1, 13, -1):
        flipped = bytearray(wrapped)
        flipped[offset] ^= 0x80
        with pytest.raises(Tampered):
            kek.unwrap(bytes(flipped), DOC)
    with pytest.raises(Tampered, match="unknown format"):
        kek.unwrap(b"\x02" + wrapped[1:], DOC)
    with pytest.raises(Tampered):
        kek.unwrap(wrapped[:-1], DOC)
    with pytest.raises(ValueError, match="data_key"):
        kek.wrap(b"too short", DOC)


def test_replaced_key_file_is_refused_naming_it(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    KeyRing.open(settings)
    assert settings.key_file is not None
    settings.key_file.write_bytes(os.urandom(32))
    with pytest.raises(KeyUnavailable) as caught:
        KeyRing.open(settings)
    assert f"key file {settings.key_file} does not match keyring {settings.keyring}" in str(
        caught.value
    )


def test_unsafe_key_files_are_refused(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    KeyRing.open(settings)
    assert settings.key_file is not None
    settings.key_file.chmod(0o644)
    with pytest.raises(KeyUnavailable, match="chmod 600"):
        KeyRing.open(settings)
    settings.key_file.chmod(0o600)
    settings.key_file.write_bytes(os.urandom(31))
    with pytest.raises(KeyUnavailable, match="holds 31 bytes"):
        KeyRing.open(settings)
    settings.key_file.unlink()
    with pytest.raises(KeyUnavailable, match="cannot read key file"):
        KeyRing.open(settings)


def test_missing_keyring_without_create_is_refused(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    with pytest.raises(KeyUnavailable, match=f"keyring {settings.keyring} does not exist"):
        KeyRing.open(settings, create=False)
    assert not settings.keyring.exists()
    assert settings.key_file is not None
    assert not settings.key_file.exists()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda doc: b"not json",
        lambda doc: b"",
        lambda doc: json.dumps({**doc, "format": 9}).encode(),
        lambda doc: json.dumps({**doc, "versions": doc["versions"] * 2}).encode(),
        lambda doc: json.dumps(
            {**doc, "versions": [{**doc["versions"][0], "state": "pending"}]}
        ).encode(),
        lambda doc: json.dumps(
            {**doc, "versions": [{**doc["versions"][0], "check": "!"}]}
        ).encode(),
        lambda doc: json.dumps(
            {**doc, "versions": [{**doc["versions"][0], "version": "1"}]}
        ).encode(),
        lambda doc: json.dumps(
            {**doc, "versions": [{**doc["versions"][0], "key_file": 7}]}
        ).encode(),
    ],
    ids=["not json", "empty", "format", "duplicate", "no active", "check", "version", "key_file"],
)
def test_corrupt_keyring_is_refused_naming_it(
    tmp_path: Path, corrupt: Callable[[dict[str, Any]], bytes]
) -> None:
    settings = file_settings(tmp_path)
    KeyRing.open(settings)
    document = json.loads(settings.keyring.read_text())
    settings.keyring.write_bytes(corrupt(document))
    with pytest.raises(KeyUnavailable, match=f"keyring {settings.keyring} is corrupt"):
        KeyRing.open(settings)


def test_settings_naming_another_provider_are_refused(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    KeyRing.open(settings)
    with pytest.raises(KeyUnavailable, match="sovereign keys rotate"):
        KeyRing.open(passphrase_settings(tmp_path, PASSPHRASE))
    with pytest.raises(
        KeyUnavailable, match=r"key file .*memory\.key, which the settings do not name"
    ):
        KeyRing.open(file_settings(tmp_path, "elsewhere.key"))


def test_settings_check_their_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_file"):
        KekSettings(source="file", keyring=tmp_path / "k.json")
    with pytest.raises(ValueError, match="tpm_pcrs"):
        KekSettings(source="tpm", keyring=tmp_path / "k.json", tpm_pcrs=(7, 24))
    with pytest.raises(ValueError, match="source"):
        KekSettings(source="hsm", keyring=tmp_path / "k.json")  # type: ignore[arg-type]
    assert PASSPHRASE not in repr(passphrase_settings(tmp_path, PASSPHRASE))


# --- passphrase provider --------------------------------------------------------------------


def test_passphrase_opens_with_the_right_one_only(tmp_path: Path) -> None:
    settings = passphrase_settings(tmp_path, PASSPHRASE)
    data_key = new_data_key()
    wrapped = KeyRing.open(settings).current.wrap(data_key, DOC)

    entry = json.loads(settings.keyring.read_text())["versions"][0]["argon2id"]
    salt = base64.b64decode(entry["salt"])
    assert (entry["time_cost"], entry["memory_kib"], entry["parallelism"]) == (3, 65536, 4)
    assert len(salt) == 16
    # The KEK is exactly Argon2id(passphrase, salt), derived here independently.
    kek = hash_secret_raw(PASSPHRASE.encode(), salt, 3, 65536, 4, 32, Type.ID)
    assert Kek(1, kek).unwrap(wrapped, DOC) == data_key
    assert_not_in(kek, settings.keyring)

    assert KeyRing.open(settings, create=False).current.unwrap(wrapped, DOC) == data_key
    with pytest.raises(KeyUnavailable, match="the memory passphrase is wrong"):
        KeyRing.open(passphrase_settings(tmp_path, "wrong"))
    with pytest.raises(KeyUnavailable, match="no memory passphrase was given"):
        KeyRing.open(passphrase_settings(tmp_path, None))


def test_passphrase_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOVEREIGN_MEMORY_PASSPHRASE", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert passphrase_from_environment() is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert passphrase_from_environment() is None
    (tmp_path / "memory-passphrase").write_text(PASSPHRASE + "\n")
    assert passphrase_from_environment() == PASSPHRASE
    monkeypatch.setenv("SOVEREIGN_MEMORY_PASSPHRASE", NEW_PASSPHRASE)
    assert passphrase_from_environment() == NEW_PASSPHRASE


# --- rotation -------------------------------------------------------------------------------


def test_rotate_file_to_file(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    ring = KeyRing.open(settings)
    catalog = Catalog(ring)
    old_rows = dict(catalog.rows)
    assert settings.key_file is not None
    old_key = settings.key_file.read_bytes()

    assert ring.rotate(settings, catalog.rewrap) == 3
    assert ring.current.version == 2
    catalog.assert_readable(ring)
    with pytest.raises(KeyUnavailable, match="version 1 is not in keyring"):
        ring.kek(1)
    assert keyring_versions(settings) == [(2, "active")]
    assert settings.key_file.read_bytes() != old_key
    assert sorted(p.name for p in settings.key_file.parent.iterdir()) == ["memory.key"]
    assert_not_in(settings.key_file.read_bytes(), settings.keyring)

    reopened = KeyRing.open(settings, create=False)
    catalog.assert_readable(reopened)
    # A copy of a key wrapped under version 1 is no use to version 2.
    doc_id, (_, wrapped) = next(iter(old_rows.items()))
    with pytest.raises(Tampered):
        reopened.current.unwrap(wrapped, doc_id)


def test_rotate_file_to_passphrase_retires_the_key_file(tmp_path: Path) -> None:
    settings, new = file_settings(tmp_path), passphrase_settings(tmp_path, PASSPHRASE)
    ring = KeyRing.open(settings)
    catalog = Catalog(ring)
    assert ring.rotate(new, catalog.rewrap) == 3
    assert settings.key_file is not None
    assert not settings.key_file.exists()
    catalog.assert_readable(KeyRing.open(new, create=False))
    with pytest.raises(KeyUnavailable, match="version 2 with the passphrase"):
        KeyRing.open(settings)


def test_rotate_refuses_a_foreign_key_file(tmp_path: Path) -> None:
    ring = KeyRing.open(file_settings(tmp_path))
    foreign = file_settings(tmp_path, "someone-elses.key")
    assert foreign.key_file is not None
    foreign.key_file.write_bytes(b"not ours")
    with pytest.raises(ValueError, match="key_file"):
        ring.rotate(foreign, Catalog(ring).rewrap)
    assert foreign.key_file.read_bytes() == b"not ours"


def test_failed_rewrap_keeps_the_old_key_file(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    ring = KeyRing.open(settings)
    catalog = Catalog(ring)
    assert settings.key_file is not None
    old_key = settings.key_file.read_bytes()

    with pytest.raises(RuntimeError, match="disk full"):
        ring.rotate(settings, failing_rewrap)
    assert settings.key_file.read_bytes() == old_key
    assert keyring_versions(settings) == [(1, "active"), (2, "pending")]

    reopened = KeyRing.open(settings, create=False)
    assert reopened.current.version == 1
    catalog.assert_readable(reopened)
    assert reopened.rotate(settings, catalog.rewrap) == 3
    assert keyring_versions(settings) == [(3, "active")]
    assert sorted(p.name for p in settings.key_file.parent.iterdir()) == ["memory.key"]
    catalog.assert_readable(KeyRing.open(settings, create=False))


def test_rotate_passphrase_to_new_passphrase_survives_a_failed_rewrap(tmp_path: Path) -> None:
    old, new = (
        passphrase_settings(tmp_path, PASSPHRASE),
        passphrase_settings(tmp_path, NEW_PASSPHRASE),
    )
    ring = KeyRing.open(old)
    catalog = Catalog(ring)
    with pytest.raises(RuntimeError, match="disk full"):
        ring.rotate(new, failing_rewrap)

    # The old passphrase alone still opens everything, the pending version via its escrow.
    reopened = KeyRing.open(old, create=False)
    assert reopened.current.version == 1
    assert reopened.kek(2).version == 2
    catalog.assert_readable(reopened)

    assert reopened.rotate(new, catalog.rewrap) == 3
    assert keyring_versions(new) == [(3, "active")]
    assert "escrow" not in new.keyring.read_text()
    catalog.assert_readable(KeyRing.open(new, create=False))
    with pytest.raises(KeyUnavailable, match="the memory passphrase is wrong"):
        KeyRing.open(old)


CRASHING_ROTATION = """
import base64, json, os, sys
from pathlib import Path
from sovereign_gateway.memory.envelope import KekSettings, KeyRing

keyring, key_file, catalog = map(Path, sys.argv[1:])
settings = KekSettings(source="file", keyring=keyring, key_file=key_file)
rows = json.loads(catalog.read_text())

def rewrap(ring, new):
    for doc_id, (version, wrapped) in rows.items():
        data_key = ring.kek(version).unwrap(base64.b64decode(wrapped), doc_id)
        rows[doc_id] = [new.version, base64.b64encode(new.wrap(data_key, doc_id)).decode()]
    catalog.write_text(json.dumps(rows))  # the catalog's transaction commits
    os._exit(9)  # killed before the keyring retires version 1

KeyRing.open(settings, create=False).rotate(settings, rewrap)
"""


def test_kill_after_the_rewrap_committed_leaves_everything_openable(tmp_path: Path) -> None:
    settings = file_settings(tmp_path)
    assert settings.key_file is not None
    catalog = Catalog(KeyRing.open(settings))
    stored = tmp_path / "catalog.json"
    stored.write_text(
        json.dumps({d: [v, base64.b64encode(w).decode()] for d, (v, w) in catalog.rows.items()})
    )
    paths = [str(settings.keyring), str(settings.key_file), str(stored)]
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASHING_ROTATION), *paths],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 9, done.stderr.decode()
    catalog.rows = {
        d: (v, base64.b64decode(w)) for d, (v, w) in json.loads(stored.read_text()).items()
    }
    assert {v for v, _ in catalog.rows.values()} == {2}
    assert keyring_versions(settings) == [(1, "active"), (2, "pending")]
    catalog.assert_readable(KeyRing.open(settings, create=False))

    # The next step of that rotation renames the staged key over the key file; a crash right
    # after it leaves version 1 without its key, yet version 2, where every key now is, loads.
    os.replace(settings.key_file.with_name("memory.key.v2"), settings.key_file)
    ring = KeyRing.open(settings, create=False)
    assert ring.current.version == 2
    with pytest.raises(KeyUnavailable, match="version 1 is not loaded: key file"):
        ring.kek(1)
    catalog.assert_readable(ring)

    assert ring.rotate(settings, catalog.rewrap) == 3
    assert keyring_versions(settings) == [(3, "active")]
    catalog.assert_readable(KeyRing.open(settings, create=False))
