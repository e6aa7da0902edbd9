"""A bundle split into volumes no larger than a given size, for media smaller than it.

The volumes are one tar stream of the bundle (its files in a fixed order), cut into
`bundle.vol001.tar`, `bundle.vol002.tar`, ...; `volumes.json` lists each volume's size and
sha256 and names the bundle.json it carries, and is signed like bundle.json. `join` checks
the signature and every volume before it unpacks anything, then unpacks only regular files
under the bundle's own names, and the result is verified as any bundle is.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sovereign.bundle.layout import (
    BLOBS,
    CHUNK,
    INDEX_FILE,
    LAYOUT_FILE,
    MANIFEST_FILE,
    SBOM_FILE,
    SIGNATURE_FILE,
    BundleError,
    dumps,
    move_into_place,
    new_staging,
    remove_staging,
)
from sovereign.bundle.manifest import (
    manifest_digest,
    read_signed,
    sign_bytes,
    verify,
    verify_bytes,
)
from sovereign.tools import sha256_file

VOLUMES_FILE = "volumes.json"
VOLUMES_SIGNATURE = "volumes.json.sig"
VOLUMES_FORMAT = "sovereign-bundle-volumes/1"
VOLUME_NAME = re.compile(r"bundle\.vol(\d{3})\.tar")
MIN_VOLUME = 1 << 20
MAX_VOLUMES = 999  # the three digits of the volume names
TOP_FILES = (MANIFEST_FILE, SIGNATURE_FILE, LAYOUT_FILE, INDEX_FILE, SBOM_FILE)


@dataclass(frozen=True)
class Volume:
    name: str
    size: int
    sha256: str


def parse_size(text: str) -> int:
    """`4G`, `700M`, `512K` or a byte count."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    if not match:
        raise BundleError(f"--volume-size {text!r}: expected a size such as 4G, 700M or 512K")
    size = int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]
    if size < MIN_VOLUME:
        raise BundleError(f"--volume-size {text!r}: volumes must be at least 1M")
    return size


class _VolumeWriter(io.RawIOBase):
    """A write-only stream that starts a new volume file every `limit` bytes."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self.volumes: list[Volume] = []
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            file = self._file
            if file is None or self._written == self.limit:
                file = self._next()
            piece = view[: self.limit - self._written]
            file.write(piece)
            self._hash.update(piece)
            self._written += len(piece)
            view = view[len(piece) :]
        return total

    def _next(self) -> IO[bytes]:
        self._seal()
        name = f"bundle.vol{len(self.volumes) + 1:03d}.tar"
        self._file = (self.folder / name).open("wb")
        self._hash = hashlib.sha256()
        self._written = 0
        self.volumes.append(Volume(name, 0, ""))
        return self._file

    def _seal(self) -> None:
        if self._file is None:
            return
        self._file.close()
        last = self.volumes[-1]
        self.volumes[-1] = Volume(last.name, self._written, self._hash.hexdigest())
        self._file = None

    def close(self) -> None:
        self._seal()
        super().close()


def _bundle_files(bundle: Path) -> Iterator[str]:
    yield from TOP_FILES
    for blob in sorted((bundle / BLOBS).iterdir()):
        yield (BLOBS / blob.name).as_posix()


def split(bundle: Path, out: Path, limit: int, key: Ed25519PrivateKey) -> tuple[list[Volume], str]:
    """Cut the (verified) bundle into volumes in `out`; gives them and the bundle's digest."""
    checked = verify(bundle, key.public_key())
    if not checked.ok or checked.manifest is None:
        problems = "; ".join(map(str, checked.findings[:5]))
        raise BundleError(f"{bundle} does not verify, so it is not split: {problems}")
    manifest, data, _ = read_signed(bundle, key.public_key())
    total = sum((bundle / name).stat().st_size for name in _bundle_files(bundle))
    # Each file's tar header and padding: at most 1.5 KiB in PAX format.
    if (total + 1536 * len(list(_bundle_files(bundle))) + 10240) // limit >= MAX_VOLUMES:
        raise BundleError(
            f"--volume-size {limit}: the bundle would need more than {MAX_VOLUMES} volumes; "
            "give a larger size"
        )
    if manifest.get("base"):
        raise BundleError(f"{bundle} is differential; split the full bundle it updates instead")
    staging = new_staging(out)
    try:
        writer = _VolumeWriter(staging, limit)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for name in _bundle_files(bundle):
                info = archive.gettarinfo(str(bundle / name), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                with (bundle / name).open("rb") as stream:
                    archive.addfile(info, stream)
        writer.close()
        listing = {
            "format": VOLUMES_FORMAT,
            "bundle": manifest_digest(data),
            "profile": manifest["profile"]["name"],
            "volumes": [v.__dict__ for v in writer.volumes],
        }
        body = dumps(listing)
        (staging / VOLUMES_FILE).write_bytes(body)
        (staging / VOLUMES_SIGNATURE).write_bytes(sign_bytes(body, key))
        move_into_place(staging, out)
    finally:
        remove_staging(staging)
    return writer.volumes, manifest_digest(data)


def join(folder: Path, out: Path, trusted: Ed25519PublicKey) -> str:
    """Check every volume against the signed listing, then unpack the bundle into `out`.
    Gives the digest of the bundle.json it carried."""
    listing = _signed_listing(folder, trusted)
    volumes = [Volume(**v) for v in listing["volumes"]]
    present = sorted(p.name for p in folder.iterdir() if VOLUME_NAME.fullmatch(p.name))
    expected = [v.name for v in volumes]
    if present != expected:
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        raise BundleError(
            f"{folder}: volumes missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for volume in volumes:
        path = folder / volume.name
        digest, size = _hash(path)
        if (digest, size) != (volume.sha256, volume.size):
            raise BundleError(
                f"{volume.name}: sha256 {digest} ({size} bytes) is not the listed one"
            )
    staging = new_staging(out)
    try:
        with io.BufferedReader(_Concatenated([folder / v.name for v in volumes]), CHUNK) as stream:
            _unpack(stream, staging)
        checked = verify(staging, trusted)
        if not checked.ok or checked.digest is None:
            problems = "; ".join(map(str, checked.findings[:5]))
            raise BundleError(f"the bundle in the volumes does not verify: {problems}")
        if checked.digest != listing["bundle"]:
            raise BundleError(
                f"{VOLUMES_FILE}: names bundle {listing['bundle']}, the volumes hold another"
            )
        move_into_place(staging, out)
    finally:
        remove_staging(staging)
    return str(listing["bundle"])


def _signed_listing(folder: Path, trusted: Ed25519PublicKey) -> dict[str, Any]:
    try:
        body = (folder / VOLUMES_FILE).read_bytes()
        signature = (folder / VOLUMES_SIGNATURE).read_bytes()
    except FileNotFoundError as error:
        raise BundleError(
            f"{Path(error.filename).name}: missing; not a set of bundle volumes"
        ) from None
    verify_bytes(body, signature, trusted, VOLUMES_FILE)
    listing = json.loads(body)
    if not isinstance(listing, dict) or listing.get("format") != VOLUMES_FORMAT:
        raise BundleError(f"{VOLUMES_FILE}: not a {VOLUMES_FORMAT} listing")
    return listing


def _unpack(stream: IO[bytes], staging: Path) -> None:
    allowed_top = set(TOP_FILES)
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            name = member.name
            in_blobs = re.fullmatch(r"blobs/sha256/[0-9a-f]{64}", name) is not None
            if not member.isfile() or not (name in allowed_top or in_blobs):
                raise BundleError(f"volumes: unexpected member {name!r}; refusing to unpack it")
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            if source is None:  # not reached: only regular files get here
                raise BundleError(f"volumes: {name!r} has no content")
            with target.open("wb") as sink:
                while chunk := source.read(CHUNK):
                    sink.write(chunk)


class _Concatenated(io.RawIOBase):
    """The volumes read back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._file is None:
                if not self._paths:
                    return 0
                self._file = self._paths.pop(0).open("rb")
            count: int = self._file.readinto(buffer)
            if count:
                return count
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def _hash(path: Path) -> tuple[str, int]:
    return sha256_file(path), path.stat().st_size
