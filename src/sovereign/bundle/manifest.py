"""bundle.json, its Ed25519 signature, and `verify`, which trusts nothing it did not check.

The signature covers the exact bytes of bundle.json, which lists every blob with its size
and the digests of the layout files and the SBOM; so one good signature and every digest
matching vouch for every byte. `verify` also refuses a file the manifest does not list,
and, for a differential bundle, checks that the blobs it leaves out are its base's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sovereign.bundle.layout import (
    BLOBS,
    CHUNK,
    FORMAT,
    INDEX_FILE,
    LAYOUT_FILE,
    MANIFEST_FILE,
    SBOM_FILE,
    SIGNATURE_FILE,
    BundleError,
    blob_path,
    dumps,
)
from sovereign.evidence import key_id

ALGORITHM = "Ed25519"
LISTED_FILES = (LAYOUT_FILE, INDEX_FILE, SBOM_FILE)


def sign_bytes(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """A detached signature file's content for `data`."""
    signature = {
        "alg": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "value": base64.b64encode(private_key.sign(data)).decode(),
    }
    return dumps(signature)


def verify_bytes(data: bytes, signature_file: bytes, trusted: Ed25519PublicKey, name: str) -> None:
    """BundleError naming `name` unless `signature_file` is `trusted`'s signature of `data`."""
    try:
        signature = json.loads(signature_file)
    except ValueError as error:
        raise BundleError(f"{name}.sig: unreadable: {error}") from None
    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        raise BundleError(f"{name}.sig: not an {ALGORITHM} signature")
    trusted_id = key_id(trusted)
    if signature.get("key_id") != trusted_id:
        raise BundleError(
            f"{name}.sig: signed by key {signature.get('key_id')}, "
            f"but the trusted key is {trusted_id}"
        )
    try:
        trusted.verify(base64.b64decode(str(signature.get("value")), validate=True), data)
    except (InvalidSignature, binascii.Error, ValueError):
        raise BundleError(
            f"{name}: the signature does not match its content; it was changed after signing"
        ) from None


def sign(root: Path, manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    """Write bundle.json and its signature; gives the bytes written."""
    data = dumps(manifest)
    (root / MANIFEST_FILE).write_bytes(data)
    (root / SIGNATURE_FILE).write_bytes(sign_bytes(data, private_key))
    return data


def manifest_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass
class Finding:
    file: str  # relative to the bundle
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


@dataclass
class Verification:
    root: Path
    manifest: dict[str, Any] | None = None
    digest: str | None = None  # of bundle.json, which a differential bundle names as base
    signer: str | None = None
    findings: list[Finding] = field(default_factory=list)
    blobs_checked: int = 0
    bytes_checked: int = 0
    from_base: int = 0

    @property
    def ok(self) -> bool:
        return self.manifest is not None and not self.findings


def read_signed(root: Path, trusted: Ed25519PublicKey) -> tuple[dict[str, Any], bytes, str]:
    """bundle.json, parsed only once its signature verifies against `trusted`."""
    try:
        data = (root / MANIFEST_FILE).read_bytes()
        signature = (root / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError as error:
        raise BundleError(f"{Path(error.filename).name}: missing; not a signed bundle") from None
    except OSError as error:
        raise BundleError(f"{root}: unreadable: {error.strerror}") from None
    verify_bytes(data, signature, trusted, MANIFEST_FILE)
    manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST_FILE}: not a {FORMAT} manifest")
    for field_name, kind in (("blobs", dict), ("files", dict), ("artifacts", list)):
        if not isinstance(manifest.get(field_name), kind):
            raise BundleError(f"{MANIFEST_FILE}: {field_name} is missing or malformed")
    return manifest, data, key_id(trusted)


def verify(root: Path, trusted: Ed25519PublicKey, base: Path | None = None) -> Verification:
    result = Verification(root)
    try:
        manifest, data, result.signer = read_signed(root, trusted)
    except BundleError as error:
        result.findings.append(_finding(str(error)))
        return result
    result.manifest = manifest
    result.digest = manifest_digest(data)
    blobs: dict[str, int] = manifest["blobs"]
    left_to_base = set((manifest.get("base") or {}).get("blobs", []))
    if left_to_base:
        _check_base(result, manifest["base"], base, trusted, left_to_base)
    present = {f"sha256:{name}" for name in _blob_files(root)}
    for digest in sorted(present - set(blobs)):
        result.findings.append(Finding(f"{BLOBS}/{digest[7:]}", "not listed in bundle.json"))
    carried = {digest: size for digest, size in blobs.items() if digest not in left_to_base}
    for digest in sorted(set(carried) - present):
        result.findings.append(Finding(f"{BLOBS}/{digest[7:]}", "missing"))
    for digest in sorted(left_to_base & present):
        result.findings.append(Finding(f"{BLOBS}/{digest[7:]}", "should be in the base only"))
    _check_listed_files(result, manifest)
    _check_unlisted(result)
    _check_special(result, root, "")
    _hash_blobs(result, root, {d: s for d, s in carried.items() if d in present}, "")
    result.from_base = len(left_to_base)
    return result


def _hash_blobs(result: Verification, root: Path, blobs: dict[str, int], where: str) -> None:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for digest, actual, size in pool.map(lambda d: (d, *_hash(blob_path(root, d))), blobs):
            result.blobs_checked += 1
            result.bytes_checked += size
            name = f"{where}{BLOBS}/{digest[7:]}"
            if actual != digest:
                result.findings.append(Finding(name, f"content is {actual}"))
            elif size != blobs[digest]:
                result.findings.append(Finding(name, f"{size} bytes, listed {blobs[digest]}"))


def _check_special(result: Verification, root: Path, where: str) -> None:
    """Only plain files and directories: a symlink could point outside the bundle, and a
    FIFO or a device would stand in for a blob without being hashed."""
    for folder, directories, files in os.walk(root):
        for name in directories + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                relative = path.relative_to(root).as_posix()
                result.findings.append(Finding(f"{where}{relative}", f"{kind}; refused"))


def _check_base(
    result: Verification,
    listed: dict[str, Any],
    base: Path | None,
    trusted: Ed25519PublicKey,
    left_to_base: set[str],
) -> None:
    if base is None:
        result.findings.append(
            Finding(
                MANIFEST_FILE,
                f"a differential bundle over {listed['bundle']}; give that bundle (--base) to "
                f"check the {len(left_to_base)} blob(s) it supplies",
            )
        )
        return
    try:
        base_manifest, base_data, _ = read_signed(base, trusted)
    except BundleError as error:
        result.findings.append(Finding(f"base {base}", str(error)))
        return
    if manifest_digest(base_data) != listed["bundle"]:
        result.findings.append(
            Finding(
                f"base {base}",
                f"is {manifest_digest(base_data)}, but this bundle was made against "
                f"{listed['bundle']}",
            )
        )
        return
    missing = left_to_base - set(base_manifest["blobs"])
    for digest in sorted(missing):
        result.findings.append(Finding(f"{BLOBS}/{digest[7:]}", "in neither bundle nor base"))
    # The base's signed list vouches for what it should hold; its files must still match.
    where = f"base {base}: "
    _check_special(result, base, where)
    present = {f"sha256:{name}" for name in _blob_files(base)}
    for digest in sorted((left_to_base - missing) - present):
        result.findings.append(Finding(f"{where}{BLOBS}/{digest[7:]}", "missing"))
    supplied = {d: base_manifest["blobs"][d] for d in left_to_base - missing if d in present}
    _hash_blobs(result, base, supplied, where)


def _blob_files(root: Path) -> set[str]:
    """The plain files in blobs/sha256; anything else there is reported by _check_special."""
    folder = root / BLOBS
    if folder.is_symlink() or not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if stat.S_ISREG(p.lstat().st_mode)}


def _check_listed_files(result: Verification, manifest: dict[str, Any]) -> None:
    for name in LISTED_FILES:
        expected = manifest["files"].get(name)
        path = result.root / name
        if path.is_symlink():
            continue  # reported by _check_special
        if not path.is_file():
            result.findings.append(Finding(name, "missing"))
        elif (actual := _hash(path)[0]) != expected:
            result.findings.append(Finding(name, f"content is {actual}, listed {expected}"))


def _check_unlisted(result: Verification) -> None:
    allowed = {MANIFEST_FILE, SIGNATURE_FILE, *LISTED_FILES}
    for path in sorted(result.root.rglob("*")):
        relative = path.relative_to(result.root)
        if path.is_dir():
            # An ext4 bundle partition may get its lost+found back from e2fsck; empty, it
            # holds nothing to trust or distrust.
            if relative.as_posix() == "lost+found" and not any(path.iterdir()):
                continue
            if relative.as_posix() not in {"blobs", BLOBS.as_posix()}:
                result.findings.append(Finding(relative.as_posix(), "unexpected directory"))
            continue
        if relative.parent == BLOBS:
            continue  # checked against the blob list
        if relative.as_posix() not in allowed:
            result.findings.append(Finding(relative.as_posix(), "not listed in bundle.json"))


def _hash(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size


def _finding(message: str) -> Finding:
    file, _, problem = message.partition(": ")
    return Finding(file, problem)


def file_digest(path: Path) -> str:
    return _hash(path)[0]
