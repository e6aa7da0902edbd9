"""Envelope encryption for the memory layer: chunks under data keys, data keys under a KEK.

Takes plaintexts and a 32-byte data key (`seal`, `unseal`), data keys and a document id
(`Kek.wrap`, `Kek.unwrap`), and `KekSettings` naming where the key-encryption key comes from:
a key file, a passphrase (Argon2id), or a TPM that seals it to PCR values. Gives AES-256-GCM
ciphertexts that fail as `errors.Tampered` when modified or moved, and a `KeyRing` that loads
every KEK version listed in keyring.json, tells a wrong key apart at open
(`errors.KeyUnavailable`, saying which), and rotates to a new version such that no wrapped
key is ever left without its KEK, whatever step a crash interrupts.

keyring.json holds, per version, a check value (an AEAD tag under the KEK), the Argon2id salt
and parameters, or the TPM's sealed blob and PCR values; never a KEK in the clear. While a
rotation is unfinished the new version is "pending" and carries an escrow: its KEK wrapped
under the active one, so the old material alone still opens everything.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import struct
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sovereign_gateway.contract import KeySource, fsync_dir, temp_beside, write_atomic, write_new
from sovereign_gateway.memory import tpm
from sovereign_gateway.memory.errors import KeyUnavailable, Tampered

DATA_KEY_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAP_FORMAT = 1
KEYRING_FORMAT = 1
SALT_BYTES = 16
PASSPHRASE_VARIABLE = "SOVEREIGN_MEMORY_PASSPHRASE"  # noqa: S105 (a name, not a secret)
PASSPHRASE_CREDENTIAL = "memory-passphrase"  # noqa: S105 (a name, not a secret)

SOURCES: tuple[KeySource, ...] = get_args(KeySource)
_NO_PASSPHRASE = (
    f"no memory passphrase was given ({PASSPHRASE_VARIABLE} or the systemd credential "
    f"{PASSPHRASE_CREDENTIAL})"
)


# A chunk AAD's index field: its 4-byte length, then the 8-byte index.
_INDEX_FIELD = struct.Struct(">IQ")


def _frame(label: str, *fields: bytes) -> bytes:
    """`label`, then each field behind its 4-byte length, so no two inputs encode alike."""
    return label.encode() + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise ValueError(f"key: must be {KEY_BYTES} bytes (AES-256), not {len(key)}")
    return AESGCM(key)


def _seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise Tampered("ciphertext is truncated")
    try:
        return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise Tampered(
            "ciphertext failed authentication: modified, moved, or sealed under another key"
        ) from None


def new_data_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def chunk_aad(doc_id: str, index: int, key_version: int) -> bytes:
    """Binds a chunk ciphertext to its document, position and data-key format."""
    if not doc_id:
        raise ValueError("doc_id: must not be empty")
    if not 0 <= index < 2**63:
        raise ValueError(f"index: must be 0 or more, not {index}")
    if not 0 < key_version < 2**32:
        raise ValueError(f"key_version: must be 1 or more, not {key_version}")
    return _frame(
        "sovereign-memory/chunk",
        doc_id.encode(),
        index.to_bytes(8, "big"),
        key_version.to_bytes(4, "big"),
    )


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """12-byte random nonce || AES-256-GCM ciphertext and tag."""
    return _seal(_aead(key), plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return _open(_aead(key), sealed, aad)


def seal_chunks(key: bytes, doc_id: str, key_version: int, chunks: Sequence[bytes]) -> list[bytes]:
    """Chunk i sealed under `chunk_aad(doc_id, i, key_version)`.

    The same as sealing each in turn, built for the ingest path's ~1,000-2,000 chunks per
    MB: one cipher object, the nonces from one read of the OS's CSPRNG and the AAD's fixed
    part encoded once, since per-chunk overhead, not AES, bounds the throughput
    (docs/benchmarks.md). Threads do not help: the per-chunk Python work holds the GIL.
    """
    aead = _aead(key)
    head = chunk_aad(doc_id, 0, key_version)[: -(8 + 4 + 4 + 4)]
    tail = (4).to_bytes(4, "big") + key_version.to_bytes(4, "big")
    nonces = os.urandom(NONCE_BYTES * len(chunks))
    sealed = []
    for index, chunk in enumerate(chunks):
        nonce = nonces[index * NONCE_BYTES : (index + 1) * NONCE_BYTES]
        aad = head + _INDEX_FIELD.pack(8, index) + tail
        sealed.append(nonce + aead.encrypt(nonce, chunk, aad))
    return sealed


@dataclass(frozen=True)
class KekSettings:
    source: KeySource
    keyring: Path
    key_file: Path | None = None
    passphrase: str | None = field(default=None, repr=False)
    tpm_tcti: str = "device:/dev/tpmrm0"
    tpm_pcrs: tuple[int, ...] = (7,)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.source == "file" and self.key_file is None:
            raise ValueError("key_file: required when source is 'file'")
        pcrs = self.tpm_pcrs
        if self.source == "tpm" and (
            not pcrs or len(set(pcrs)) != len(pcrs) or not all(0 <= i <= 23 for i in pcrs)
        ):
            raise ValueError(f"tpm_pcrs: must name distinct PCRs 0 to 23, not {pcrs}")


def passphrase_from_environment() -> str | None:
    """$SOVEREIGN_MEMORY_PASSPHRASE, else the systemd credential memory-passphrase."""
    if value := os.environ.get(PASSPHRASE_VARIABLE):
        return value
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / PASSPHRASE_CREDENTIAL
    try:
        # A credential written with echo ends in a newline that is not part of the passphrase.
        return path.read_text(encoding="utf-8").removesuffix("\n") or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyUnavailable(f"cannot read the memory passphrase from {path}: {exc}") from None


class Kek:
    """One unwrapped KEK version, in RAM only."""

    __slots__ = ("_aead", "version")

    def __init__(self, version: int, key: bytes) -> None:
        self.version = version
        self._aead = _aead(key)

    def __repr__(self) -> str:
        return f"Kek(version={self.version})"

    def wrap(self, data_key: bytes, doc_id: str) -> bytes:
        """Format byte || nonce || AES-256-GCM of the data key; AAD binds doc_id and version."""
        if len(data_key) != KEY_BYTES:
            raise ValueError(f"data_key: must be {KEY_BYTES} bytes, not {len(data_key)}")
        return bytes([WRAP_FORMAT]) + _seal(self._aead, data_key, self._wrap_aad(doc_id))

    def unwrap(self, wrapped: bytes, doc_id: str) -> bytes:
        if wrapped[:1] != bytes([WRAP_FORMAT]):
            raise Tampered(f"wrapped key of document {doc_id} has an unknown format")
        data_key = _open(self._aead, wrapped[1:], self._wrap_aad(doc_id))
        if len(data_key) != KEY_BYTES:
            raise Tampered(f"wrapped key of document {doc_id} is not a {KEY_BYTES}-byte key")
        return data_key

    def _wrap_aad(self, doc_id: str) -> bytes:
        version = self.version.to_bytes(4, "big")
        return _frame("sovereign-memory/wrap", bytes([WRAP_FORMAT]), doc_id.encode(), version)

    def _check_aad(self) -> bytes:
        return _frame("sovereign-memory/kek-check", self.version.to_bytes(4, "big"))

    def _check(self) -> bytes:
        return _seal(self._aead, b"", self._check_aad())

    def _matches(self, check: bytes) -> bool:
        try:
            _open(self._aead, check, self._check_aad())
        except Tampered:
            return False
        return True

    def _escrow_aad(self, version: int) -> bytes:
        versions = version.to_bytes(4, "big") + self.version.to_bytes(4, "big")
        return _frame("sovereign-memory/kek-escrow", versions)

    def _escrow(self, version: int, key: bytes) -> bytes:
        return _seal(self._aead, key, self._escrow_aad(version))

    def _unescrow(self, version: int, escrowed: bytes) -> bytes:
        return _open(self._aead, escrowed, self._escrow_aad(version))


@dataclass(frozen=True)
class _KeyFile:
    path: Path
    staged: Path | None = None  # while pending: the new key, renamed over `path` at the end


@dataclass(frozen=True)
class _Argon2id:
    """Defaults: RFC 9106 section 4, second recommended option (memory-constrained hosts)."""

    salt: bytes
    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 4


@dataclass
class _Version:
    """One entry of keyring.json; the escrow exists only while the version is pending."""

    version: int
    state: Literal["active", "pending"]
    provider: _KeyFile | _Argon2id | tpm.Sealed
    check: bytes
    escrow: tuple[int, bytes] | None = None  # (version it is wrapped under, wrapped KEK)

    @property
    def source(self) -> KeySource:
        if isinstance(self.provider, _KeyFile):
            return "file"
        return "passphrase" if isinstance(self.provider, _Argon2id) else "tpm"

    def describe(self) -> str:
        if isinstance(self.provider, _KeyFile):
            return f"the key file {self.provider.path}"
        if isinstance(self.provider, tpm.Sealed):
            return f"the TPM with PCRs {','.join(map(str, sorted(self.provider.pcrs)))}"
        return "the passphrase"

    def serves(self, settings: KekSettings) -> bool:
        """Whether `settings` name this version's provider, so opening with them is no mistake."""
        if self.source != settings.source:
            return False
        if isinstance(self.provider, _KeyFile):
            return _absolute(self.provider.path) == _absolute(settings.key_file)
        if isinstance(self.provider, tpm.Sealed):
            return sorted(self.provider.pcrs) == sorted(settings.tpm_pcrs)
        return True


class KeyRing:
    """Every loaded KEK version of one keyring.json; `current` wraps new data keys."""

    def __init__(
        self,
        settings: KekSettings,
        versions: dict[int, _Version],
        keks: dict[int, Kek],
        unavailable: dict[int, str],
    ) -> None:
        self._settings = settings
        self._versions = versions
        self._keks = keks
        self._unavailable = unavailable
        active = next(v.version for v in versions.values() if v.state == "active")
        # After an interrupted rotation the active version may not load (its key file was
        # already replaced, or the caller gave the new passphrase); a pending one stands in.
        self._current = active if active in keks else max(keks)

    @classmethod
    def open(cls, settings: KekSettings, *, create: bool = True) -> KeyRing:
        path = settings.keyring
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise KeyUnavailable(f"keyring {path} does not exist") from None
            return cls._create(settings)
        except OSError as exc:
            raise KeyUnavailable(f"cannot read keyring {path}: {exc.strerror or exc}") from None
        versions = _parse(raw, path)
        if not any(v.serves(settings) for v in versions.values()):
            active = next(v for v in versions.values() if v.state == "active")
            raise KeyUnavailable(
                f"keyring {path} keeps version {active.version} with {active.describe()}, "
                "which the settings do not name; change it with `sovereign keys rotate`"
            )
        keks: dict[int, Kek] = {}
        unavailable: dict[int, str] = {}
        # The active version first: a pending one may be escrowed under it.
        for entry in sorted(versions.values(), key=lambda v: (v.state != "active", v.version)):
            try:
                keks[entry.version] = _unlock(settings, entry, keks)
            except KeyUnavailable as exc:
                unavailable[entry.version] = str(exc)
        if not keks:
            raise KeyUnavailable("; ".join(unavailable[v] for v in sorted(unavailable)))
        return cls(settings, versions, keks, unavailable)

    @classmethod
    def _create(cls, settings: KekSettings) -> KeyRing:
        key, provider = _new_provider(settings, 1, staged=False)
        entry = _Version(1, "active", provider, Kek(1, key)._check())
        _make_private_dir(settings.keyring.parent)
        try:
            _write(settings.keyring, {1: entry}, exclusive=True)
        except FileExistsError:  # another process created it first; use theirs
            return cls.open(settings, create=False)
        return cls(settings, {1: entry}, {1: Kek(1, key)}, {})

    @property
    def current(self) -> Kek:
        return self._keks[self._current]

    def kek(self, version: int) -> Kek:
        if version in self._keks:
            return self._keks[version]
        if version in self._unavailable:
            raise KeyUnavailable(
                f"KEK version {version} is not loaded: {self._unavailable[version]}"
            )
        raise KeyUnavailable(f"KEK version {version} is not in keyring {self._settings.keyring}")

    def rotate(self, new: KekSettings, rewrap: Callable[[KeyRing, Kek], int]) -> int:
        """Make version N+1 from `new`, let `rewrap` move every data key to it, retire the rest.

        Until `rewrap` returns, keyring.json keeps the old versions and lists N+1 as pending,
        escrowed under the current KEK, so a crash or an exception leaves every data key
        unwrappable with the old material. Returns what `rewrap` returns.
        """
        if _absolute(new.keyring) != _absolute(self._settings.keyring):
            raise ValueError(f"keyring: rotation stays in {self._settings.keyring}")
        if new.source == "file" and new.key_file is not None and new.key_file.exists():
            ours = [
                v.provider.path for v in self._versions.values() if isinstance(v.provider, _KeyFile)
            ]
            if _absolute(new.key_file) not in map(_absolute, ours):
                raise ValueError(f"key_file: {new.key_file} exists and is not this keyring's")
        version = max(self._versions) + 1
        key, provider = _new_provider(new, version, staged=True)
        kek = Kek(version, key)
        escrow = (self.current.version, self.current._escrow(version, key))
        entry = _Version(version, "pending", provider, kek._check(), escrow)
        _write(self._settings.keyring, {**self._versions, version: entry})
        self._versions[version] = entry
        self._keks[version] = kek

        count = rewrap(self, kek)

        # Every data key is now wrapped under `version`; the old material may go.
        if isinstance(provider, _KeyFile) and provider.staged is not None:
            os.replace(provider.staged, provider.path)
            fsync_dir(provider.path.parent)
            provider = _KeyFile(provider.path)
        retired = [v.provider for v in self._versions.values() if v.version != version]
        self._versions = {version: _Version(version, "active", provider, entry.check)}
        _write(self._settings.keyring, self._versions)
        kept = _absolute(provider.path) if isinstance(provider, _KeyFile) else None
        for old in retired:
            if isinstance(old, _KeyFile):
                for path in (old.staged, old.path):
                    if path is not None and _absolute(path) != kept:
                        path.unlink(missing_ok=True)
        self._settings, self._keks, self._unavailable = new, {version: kek}, {}
        self._current = version
        return count


def recorded_settings(keyring: Path, *, passphrase: str | None, tpm_tcti: str) -> KekSettings:
    """Settings that name the provider keyring.json records as active: what a rotation
    opens the old keys with when the profile already names the new provider."""
    try:
        raw = keyring.read_bytes()
    except OSError as exc:
        raise KeyUnavailable(f"cannot read keyring {keyring}: {exc.strerror or exc}") from None
    active = next(v for v in _parse(raw, keyring).values() if v.state == "active")
    provider = active.provider
    return KekSettings(
        source=active.source,
        keyring=keyring,
        key_file=provider.path if isinstance(provider, _KeyFile) else None,
        passphrase=passphrase if active.source == "passphrase" else None,
        tpm_tcti=tpm_tcti,
        tpm_pcrs=tuple(sorted(provider.pcrs)) if isinstance(provider, tpm.Sealed) else (7,),
    )


def describe(settings: KekSettings) -> str:
    if settings.source == "file":
        return f"key file {settings.key_file}"
    if settings.source == "tpm":
        return f"TPM, PCRs {','.join(map(str, settings.tpm_pcrs))}"
    return "passphrase (argon2id)"


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.absolute()


def _make_private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


def _new_provider(
    settings: KekSettings, version: int, *, staged: bool
) -> tuple[bytes, _KeyFile | _Argon2id | tpm.Sealed]:
    """A fresh KEK for `version` and what keyring.json needs to get it back."""
    if settings.source == "file":
        path = settings.key_file
        if path is None:
            raise ValueError("key_file: required when source is 'file'")
        if not staged:
            return _load_or_create_key_file(path), _KeyFile(path)
        # Beside key_file, and renamed over it only once the rewrap has committed.
        key, staged_path = secrets.token_bytes(KEY_BYTES), path.with_name(f"{path.name}.v{version}")
        _make_private_dir(path.parent)
        write_atomic(staged_path, key, 0o600)
        return key, _KeyFile(path, staged_path)
    if settings.source == "passphrase":
        if not settings.passphrase:
            raise KeyUnavailable(_NO_PASSPHRASE)
        params = _Argon2id(secrets.token_bytes(SALT_BYTES))
        return _argon2id(settings.passphrase, params), params
    key = secrets.token_bytes(KEY_BYTES)
    return key, tpm.seal(settings.tpm_tcti, settings.tpm_pcrs, key)


def _unlock(settings: KekSettings, entry: _Version, loaded: dict[int, Kek]) -> Kek:
    if entry.escrow is not None and entry.escrow[0] in loaded:
        under, escrowed = entry.escrow
        with suppress(Tampered):
            kek = Kek(entry.version, loaded[under]._unescrow(entry.version, escrowed))
            if kek._matches(entry.check):
                return kek
    provider = entry.provider
    if isinstance(provider, _KeyFile):
        staged = provider.staged
        path = staged if staged is not None and staged.exists() else provider.path
        key, mismatch = _read_key_file(path), f"key file {path} does not match keyring"
    elif isinstance(provider, _Argon2id):
        if not settings.passphrase:
            raise KeyUnavailable(_NO_PASSPHRASE)
        key = _argon2id(settings.passphrase, provider)
        mismatch = "the memory passphrase is wrong for keyring"
    else:
        key = tpm.unseal(settings.tpm_tcti, provider)
        mismatch = "the key the TPM unsealed does not match keyring"
    kek = Kek(entry.version, key)
    if not kek._matches(entry.check):
        raise KeyUnavailable(f"{mismatch} {settings.keyring} (version {entry.version})")
    return kek


def _argon2id(passphrase: str, params: _Argon2id) -> bytes:
    # NFC: the same passphrase typed on another keyboard or OS must give the same key.
    secret = unicodedata.normalize("NFC", passphrase).encode()
    try:
        return hash_secret_raw(
            secret,
            params.salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=KEY_BYTES,
            type=Type.ID,
        )
    except HashingError as exc:
        raise KeyUnavailable(f"argon2id failed: {exc}") from None


def _read_key_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyUnavailable(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise KeyUnavailable(f"key file {path} is open to group or others; chmod 600 it")
    if len(data) != KEY_BYTES:
        raise KeyUnavailable(f"key file {path} holds {len(data)} bytes, not {KEY_BYTES}")
    return data


def _load_or_create_key_file(path: Path) -> bytes:
    if not path.exists():
        _make_private_dir(path.parent)
        temp = temp_beside(path)
        try:
            write_new(temp, secrets.token_bytes(KEY_BYTES), 0o600)
            # link, unlike rename, fails if another process created the key meanwhile;
            # then that key wins and both read it below.
            with suppress(FileExistsError):
                os.link(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(path.parent)
    return _read_key_file(path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _to_json(entry: _Version) -> dict[str, Any]:
    out: dict[str, Any] = {"version": entry.version, "state": entry.state, "source": entry.source}
    provider = entry.provider
    if isinstance(provider, _KeyFile):
        out["key_file"] = str(provider.path)
        if provider.staged is not None:
            out["staged_key_file"] = str(provider.staged)
    elif isinstance(provider, _Argon2id):
        out["argon2id"] = {
            "time_cost": provider.time_cost,
            "memory_kib": provider.memory_kib,
            "parallelism": provider.parallelism,
            "salt": _b64(provider.salt),
        }
    else:
        out["tpm"] = {
            "bank": tpm.BANK,
            "pcrs": {str(i): value.hex() for i, value in sorted(provider.pcrs.items())},
            "public": _b64(provider.public),
            "private": _b64(provider.private),
        }
    out["check"] = _b64(entry.check)
    if entry.escrow is not None:
        out["escrow"] = {"under": entry.escrow[0], "wrapped": _b64(entry.escrow[1])}
    return out


def _write(path: Path, versions: dict[int, _Version], *, exclusive: bool = False) -> None:
    document = {
        "format": KEYRING_FORMAT,
        "versions": [_to_json(v) for _, v in sorted(versions.items())],
    }
    data = json.dumps(document, indent=2).encode() + b"\n"
    if not exclusive:
        write_atomic(path, data, 0o600)
        return
    temp = temp_beside(path)
    try:
        write_new(temp, data, 0o600)
        os.link(temp, path)  # FileExistsError if another process won the race
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class _Corrupt(ValueError):
    pass


def _parse(raw: bytes, path: Path) -> dict[int, _Version]:
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or document.get("format") != KEYRING_FORMAT:
            raise _Corrupt(f"format is not {KEYRING_FORMAT}")
        versions: dict[int, _Version] = {}
        for item in document["versions"]:
            entry = _parse_version(item)
            if entry.version in versions:
                raise _Corrupt(f"version {entry.version} is listed twice")
            versions[entry.version] = entry
        if [v.state for v in versions.values()].count("active") != 1:
            raise _Corrupt("it must have exactly one active version")
        for entry in versions.values():
            if entry.escrow is not None and entry.escrow[0] not in versions:
                raise _Corrupt(f"version {entry.version} is escrowed under a missing version")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise KeyUnavailable(f"keyring {path} is corrupt: {exc}") from None
    return versions


def _parse_version(item: dict[str, Any]) -> _Version:
    version = _int(item["version"], 1, 2**32 - 1, "version")
    state, source = item["state"], item["source"]
    if state not in ("active", "pending") or source not in SOURCES:
        raise _Corrupt(f"version {version} has state {state!r} and source {source!r}")
    provider: _KeyFile | _Argon2id | tpm.Sealed
    if source == "file":
        staged = item.get("staged_key_file")
        provider = _KeyFile(
            Path(_str(item["key_file"])), None if staged is None else Path(_str(staged))
        )
    elif source == "passphrase":
        params = item["argon2id"]
        provider = _Argon2id(
            salt=_bytes(params["salt"]),
            time_cost=_int(params["time_cost"], 1, 100, "time_cost"),
            memory_kib=_int(params["memory_kib"], 8, 4 * 1024 * 1024, "memory_kib"),
            parallelism=_int(params["parallelism"], 1, 64, "parallelism"),
        )
        if len(provider.salt) < SALT_BYTES:
            raise _Corrupt(f"version {version} has a salt shorter than {SALT_BYTES} bytes")
    else:
        sealed = item["tpm"]
        if sealed["bank"] != tpm.BANK or not sealed["pcrs"]:
            raise _Corrupt(f"version {version} is sealed to no {tpm.BANK} PCRs")
        provider = tpm.Sealed(
            public=_bytes(sealed["public"]),
            private=_bytes(sealed["private"]),
            pcrs={
                _int(int(i), 0, 23, "pcr"): bytes.fromhex(_str(v))
                for i, v in sealed["pcrs"].items()
            },
        )
    check = _bytes(item["check"])
    if len(check) != NONCE_BYTES + TAG_BYTES:
        raise _Corrupt(f"version {version} has a malformed check value")
    escrow = None
    if "escrow" in item:
        under = _int(item["escrow"]["under"], 1, 2**32 - 1, "under")
        escrow = (under, _bytes(item["escrow"]["wrapped"]))
    return _Version(version, state, provider, check, escrow)


def _int(value: object, low: int, high: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _Corrupt(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Corrupt(f"expected a string, not {value!r}")
    return value


def _bytes(value: object) -> bytes:
    return base64.b64decode(_str(value), validate=True)
