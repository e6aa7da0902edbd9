"""`sovereign bundle import`: a verified bundle becomes the mirrors an air-gapped node uses.

Nothing is read before `verify` has checked the signature and every digest, and every
file is hashed again as it is copied out, so a blob changed after verification is refused
too. Layout of the import directory (`--into DIR`):

    pypi/files/<wheel>                 the wheels; pypiserver can serve this directory
    pypi/simple/[<project>/]index.html a static PEP 503 tree, `#sha256=` on every link
    debian/pool/...                    the .debs, at their upstream pool paths
    debian/dists/<suite>/              Packages per component and architecture, Release,
                                       Release.gpg and InRelease, in the suites they came from
    debian/archive-keyring.gpg         the public key InRelease is signed with
    models/<target>/..., SHA256SUMS    each model at its `target` (`models/<name>` or the
                                       `bundle:<path>`), so DIR/models stands for the node's
                                       /var/lib/sovereign/bundle, where `bundle:` paths resolve
    policies/ ansible/ config/ node-image/
    node-config/etc/...                pip.conf, apt sources and keyring, registries.conf.d:
                                       the profile's `mirrors:`, to copy onto the node
    .sovereign/import.json             what earlier imports brought, so the indexes span them

Container images go to a registry over the distribution API. Decisions, and why:

- A differential bundle needs `--base`, the bundle it was made against: `verify` vouches
  for the blobs it leaves out only by that bundle's signed manifest, and they are read
  from there. An earlier import of the base is not enough, since DIR is not signed.
- Mirrors accumulate: wheels, .debs, images and models from earlier imports stay, as a
  node may still pin them, and the indexes list them all. A model's directory, the
  policies, roles, configs and node image are each replaced whole by a bundle that
  carries them, so nothing stale is left in them.
- The node's configs cover the kinds imported so far; a kind the bundle carries without
  a mirror for it in the profile's `mirrors:` is refused before anything is written.
- Importing the same bundle again writes nothing: every file is compared first, and a
  repository is re-signed only when its indexes (or its key) change.
- Files are written beside their target and renamed into place; a tree (a model, the
  roles) is written in `.sovereign/staging` and swapped in. A failure leaves every earlier
  file and the previous import's record intact, and names what failed.
- The apt repository's secret key is never under DIR, which is served: `--apt-key FILE`,
  or a key made on the first import and kept (0600, in a 0700 directory) in `key_home`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urljoin, urlsplit

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from debian import deb822
from packageurl import PackageURL
from packaging.utils import canonicalize_name
from pydantic import TypeAdapter, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign.bundle.layout import BLOBS, CHUNK, MEDIA_MANIFEST, BundleError, blob_path
from sovereign.bundle.manifest import Finding, verify
from sovereign.mirror.fetch import MirrorError, session
from sovereign.mirror.oci import (
    ACCEPT,
    INDEXES,
    OCI_INDEX,
    ImageRef,
    RegistryAuth,
    is_loopback,
    parse_reference,
)
from sovereign.profile.model import Mirror
from sovereign.tools import sha256_file

STATE_DIR = ".sovereign"
STATE_FILE = "import.json"
PROFILE_FILE = "profile.yaml"
KEYRING_FILE = "archive-keyring.gpg"
NODE_KEYRING = "/etc/apt/keyrings/sovereign-archive.gpg"
# Which profile mirror serves each kind the bundle carries.
MIRROR_OF = {"wheel": "pypi", "oci-image": "oci", "deb": "debian", "model": "models"}
# Kinds that are one tree each, replaced whole: their directory under DIR.
TREES = {"policy": "policies", "roles": "ansible", "config": "config", "node-image": "node-image"}
KINDS = frozenset({*MIRROR_OF, *TREES})
COMMAND_TIMEOUT_S = 120
HTTP_TIMEOUT = (10.0, 300.0)
HEADER = "Written by `sovereign bundle import` for profile {profile}"

Log = Callable[[str], None]
T = TypeVar("T")


class ImportRefused(BundleError):
    """The bundle did not verify; nothing was imported."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        super().__init__(f"{len(findings)} problem(s); nothing was imported")
        self.findings = list(findings)


class ImportFailed(BundleError):
    """The import stopped midway; the message names what failed."""


# ---- what the bundle lists ------------------------------------------------------------------


@dataclass(frozen=True)
class BundleFile:
    path: str
    digest: str  # sha256:<hex>
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Listed:
    """One artifact of bundle.json."""

    kind: str
    name: str
    version: str
    manifest: str  # the digest of its manifest blob
    files: tuple[BundleFile, ...]
    purl: str | None = None
    target: str | None = None  # a model's place under the node's bundle root
    ref: str | None = None  # a container image's ref name
    source: str | None = None  # where it came from; for an image, its reference as given

    @classmethod
    def parse(cls, data: Any, index: int) -> Listed:
        try:
            files = tuple(
                BundleFile(str(f["path"]), str(f["digest"]), int(f["size"]))
                for f in data.get("files", [])
            )
            listed = cls(
                str(data["kind"]),
                str(data["name"]),
                str(data["version"]),
                str(data["manifest"]),
                files,
                data.get("purl"),
                data.get("target"),
                data.get("ref"),
                data.get("source"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise BundleError(f"bundle.json: artifacts[{index}] is malformed: {error}") from None
        if listed.kind not in KINDS:
            raise BundleError(
                f"bundle.json: artifacts[{index}] is of kind {listed.kind!r}, which this "
                f"import does not know ({', '.join(sorted(KINDS))}); update sovereign"
            )
        return listed


@dataclass(frozen=True)
class BlobStore:
    """The bundle's blobs, then its base's: a differential bundle leaves some to its base."""

    roots: tuple[Path, ...]
    listed: frozenset[str]  # bundle.json's blobs: the only ones verify vouched for

    def path(self, digest: str) -> Path:
        if digest not in self.listed:
            raise BundleError(f"bundle.json: names blob {digest!r}, which it does not list")
        for root in self.roots:
            candidate = blob_path(root, digest)
            if candidate.is_file():
                return candidate
        raise ImportFailed(f"{BLOBS}/{digest.removeprefix('sha256:')}: in neither bundle nor base")

    def read(self, digest: str) -> bytes:
        """A small blob, checked again: it may have changed since it was verified."""
        path = self.path(digest)
        data = path.read_bytes()
        actual = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if actual != digest:
            raise ImportFailed(f"{path}: content is {actual}; it changed after verification")
        return data


def safe_path(text: str, where: str) -> PurePosixPath:
    """A path from the bundle, as a relative path that stays where it is put."""
    path = PurePosixPath(text)
    if not text or path.is_absolute() or not path.parts or ".." in path.parts or "\\" in text:
        raise BundleError(f"{where}: unsafe path {text!r}; refusing to write outside DIR")
    return path


# ---- the profile the bundle was made for ----------------------------------------------------


@dataclass(frozen=True)
class NodeProfile:
    name: str
    mirrors: Mapping[str, str]  # kind (pypi, oci, debian, models) -> URL
    architectures: tuple[str, ...]  # Debian's names, of the profile's nodes


def read_profile(artifacts: Sequence[Listed], blobs: BlobStore) -> NodeProfile:
    """The resolved profile `sovereign render` wrote into the bundle's config artifact."""
    found = [(a, f) for a in artifacts if a.kind == "config" for f in a.files]
    found = [(a, f) for a, f in found if f.path == PROFILE_FILE]
    if not found:
        raise BundleError(
            f"bundle.json: no config artifact holds {PROFILE_FILE}; the import needs the "
            "profile's mirrors: to write the node's configs"
        )
    artifact, file = found[0]
    where = f"{PROFILE_FILE} (config artifact {artifact.name})"
    try:
        data = YAML(typ="safe", pure=True).load(blobs.read(file.digest).decode())
    except (YAMLError, UnicodeDecodeError) as error:
        raise BundleError(f"{where}: unreadable: {error}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{where}: not a profile")
    try:
        mirrors = TypeAdapter(list[Mirror]).validate_python(data.get("mirrors") or [])
    except ValidationError as error:
        problem = error.errors()[0]
        path = ".".join(str(part) for part in problem["loc"])
        raise BundleError(f"{where}: mirrors.{path}: {problem['msg']}") from None
    by_kind: dict[str, str] = {}
    for mirror in mirrors:
        by_kind.setdefault(mirror.kind, str(mirror.url))
    nodes = data.get("nodes") or []
    arches = sorted({str(n.get("arch")) for n in nodes if isinstance(n, dict) and n.get("arch")})
    return NodeProfile(str(data.get("name")), by_kind, tuple(arches))


def check_mirrors(profile: NodeProfile, artifacts: Sequence[Listed]) -> None:
    """Every kind the bundle carries needs the mirror the node will find it at."""
    counts = Counter(a.kind for a in artifacts)
    missing = [
        f"mirrors: has no `kind: {mirror}` entry, but the bundle carries {counts[kind]} "
        f"{kind} artifact(s)"
        for kind, mirror in MIRROR_OF.items()
        if counts[kind] and mirror not in profile.mirrors
    ]
    if missing:
        raise BundleError(
            f"profile {profile.name}: "
            + "; ".join(missing)
            + "; add it to the profile's mirrors: and make the bundle again"
        )


# ---- the record of earlier imports ----------------------------------------------------------


@dataclass
class State:
    """What DIR holds from every import so far: the indexes are made from all of it."""

    profile: str | None = None
    bundles: list[str] = field(default_factory=list)  # bundle.json digests imported whole
    wheels: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> project, sha256
    debs: dict[str, dict[str, Any]] = field(default_factory=dict)  # pool path -> DebEntry
    apt_signer: str | None = None  # the fingerprint the dists/ are signed with
    images: dict[str, str] = field(default_factory=dict)  # reference -> manifest digest
    trees: dict[str, str] = field(default_factory=dict)  # directory -> listing digest

    @classmethod
    def load(cls, into: Path) -> State:
        path = into / STATE_DIR / STATE_FILE
        if not path.is_file():
            return cls()
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise BundleError(f"{path}: unreadable record of earlier imports: {error}") from None

    def save(self, into: Path) -> None:
        data = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        write_bytes(into / STATE_DIR / STATE_FILE, data.encode())


# ---- writing --------------------------------------------------------------------------------


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """`data` at `path` by a temporary file and a rename; False where it was there already."""
    if _holds_bytes(path, data):
        return False
    with _temporary_beside(path, mode) as stream:
        stream.write(data)
    return True


def _holds_bytes(path: Path, data: bytes) -> bool:
    return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data


def copy_blob(source: Path, dest: Path, digest: str) -> bool:
    """Copy a blob to `dest`, hashed on the way; False where `dest` held it already."""
    if dest.is_file() and f"sha256:{sha256_file(dest)}" == digest:
        return False
    hasher = hashlib.sha256()
    with _temporary_beside(dest) as stream, source.open("rb") as blob:
        while chunk := blob.read(CHUNK):
            hasher.update(chunk)
            stream.write(chunk)
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != digest:
            raise ImportFailed(
                f"{source}: content is {actual}, bundle.json lists {digest}; it changed "
                "after verification"
            )
    return True


@contextlib.contextmanager
def _temporary_beside(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file beside `path`, renamed onto it when the block ends without an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp makes 0600; a mirror's files are read by whatever serves them.
        temporary.chmod(mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256sums(files: Iterable[tuple[str, str]]) -> str:
    """`sha256sum` output for (path, hex digest) pairs, sorted by path."""
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(files))


@dataclass
class TreeWriter:
    """Directories replaced whole: written in staging, then swapped with the old one."""

    into: Path
    state: State
    blobs: BlobStore

    def write(
        self, relative: PurePosixPath, files: Sequence[BundleFile], extra: Mapping[str, bytes]
    ) -> int:
        """The files written: all of them, or none where the tree is as listed already."""
        target = self.into / relative
        wanted = [(f.path, f.hex) for f in files]
        wanted += [(name, hashlib.sha256(data).hexdigest()) for name, data in extra.items()]
        listing = hashlib.sha256(sha256sums(wanted).encode()).hexdigest()
        sizes = {f.path: f.size for f in files} | {n: len(d) for n, d in extra.items()}
        if self.state.trees.get(relative.as_posix()) == listing and _holds(target, sizes):
            return 0
        staging = self.into / STATE_DIR / "staging" / uuid.uuid4().hex
        try:
            for file in files:
                dest = staging / safe_path(file.path, f"{relative}: {file.path}")
                copy_blob(self.blobs.path(file.digest), dest, file.digest)
            for name, data in extra.items():
                write_bytes(staging / name, data)
            _swap(staging, target, self.into / STATE_DIR / "staging")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.state.trees[relative.as_posix()] = listing
        return len(sizes)


def _holds(target: Path, sizes: Mapping[str, int]) -> bool:
    if not target.is_dir():
        return False
    present = {
        p.relative_to(target).as_posix(): p.stat().st_size for p in target.rglob("*") if p.is_file()
    }
    return present == dict(sizes)


def _swap(new: Path, target: Path, scratch: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    old = scratch / f"old-{uuid.uuid4().hex}"
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- summaries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KindSummary:
    kind: str
    count: int  # artifacts of this kind in the bundle
    written: int  # files, blobs or manifests this import wrote; 0: nothing changed
    where: str
    detail: str = ""


@dataclass(frozen=True)
class Imported:
    digest: str  # of bundle.json
    profile: str
    kinds: list[KindSummary]
    seen_before: bool  # this bundle was imported into DIR already

    @property
    def changed(self) -> bool:
        return any(kind.written for kind in self.kinds)


# ---- wheels: a static PEP 503 tree ----------------------------------------------------------


def import_wheels(into: Path, wheels: Sequence[Listed], blobs: BlobStore, state: State) -> int:
    root = into / "pypi"
    written = 0
    for artifact in wheels:
        for file in artifact.files:
            name = file.path
            written += copy_blob(blobs.path(file.digest), root / "files" / name, file.digest)
            state.wheels[name] = {"project": canonicalize_name(artifact.name), "sha256": file.hex}
    present = {n: w for n, w in state.wheels.items() if (root / "files" / n).is_file()}
    for relative, data in simple_index(present).items():
        written += write_bytes(root / relative, data)
    return written


def simple_index(wheels: Mapping[str, Mapping[str, str]]) -> dict[str, bytes]:
    """PEP 503 pages for wheels in `files/` beside `simple/`: file -> project, sha256."""
    projects: dict[str, list[tuple[str, str]]] = {}
    for name, wheel in sorted(wheels.items()):
        projects.setdefault(wheel["project"], []).append((name, wheel["sha256"]))
    pages = {
        "simple/index.html": _page("Simple index", [(f"{quote(p)}/", p) for p in sorted(projects)])
    }
    for project, files in projects.items():
        links = [(f"../../files/{quote(name)}#sha256={digest}", name) for name, digest in files]
        pages[f"simple/{project}/index.html"] = _page(f"Links for {project}", links)
    return pages


def _page(title: str, links: Sequence[tuple[str, str]]) -> bytes:
    body = "".join(
        f'    <a href="{html.escape(href)}">{html.escape(text)}</a><br>\n' for href, text in links
    )
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="1.0">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
        f"    <h1>{html.escape(title)}</h1>\n{body}  </body>\n</html>\n"
    ).encode()


# ---- debs: a signed apt repository ----------------------------------------------------------


@dataclass(frozen=True)
class DebEntry:
    path: str  # under the repository root, its upstream Filename
    suite: str
    component: str
    arch: str
    control: str  # the package's control fields, as dpkg-deb prints them
    sha256: str
    size: int


@dataclass(frozen=True)
class SuiteIndexes:
    name: str
    components: tuple[str, ...]
    architectures: tuple[str, ...]
    files: dict[str, bytes]  # path under dists/<suite>/ -> content


_DIST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]*")


def deb_location(artifact: Listed, profile: str) -> tuple[str, str]:
    """The suite a package came from (its purl's distro) and its component (its pool path's,
    as Debian lays pools out); the profile's name and main where they cannot be read."""
    suite = profile
    if artifact.purl:
        with contextlib.suppress(ValueError):
            distro = PackageURL.from_string(artifact.purl).qualifiers
            if isinstance(distro, dict) and distro.get("distro"):
                suite = str(distro["distro"])
    parts = PurePosixPath(artifact.files[0].path).parts
    component = parts[1] if len(parts) > 2 and parts[0] == "pool" else "main"
    for name in (suite, component):
        # Both name directories under dists/.
        if not _DIST_NAME.fullmatch(name):
            raise BundleError(f"bundle.json: deb {artifact.name}: {name!r} cannot name a suite")
    return suite, component


def packages_index(entries: Iterable[DebEntry]) -> bytes:
    """A Packages index: each control paragraph with its Filename, Size and SHA256."""
    paragraphs = []
    for entry in entries:
        paragraph = deb822.Packages(entry.control)
        for name in ("Filename", "Size", "MD5sum", "SHA1", "SHA256", "SHA512"):
            if name in paragraph:
                del paragraph[name]
        paragraph["Filename"] = entry.path
        paragraph["Size"] = str(entry.size)
        paragraph["SHA256"] = entry.sha256
        paragraphs.append((paragraph["Package"], paragraph["Version"], entry.arch, paragraph))
    paragraphs.sort(key=lambda item: item[:3])
    return "\n".join(str(p.dump()) for *_, p in paragraphs).encode()


def suite_indexes(entries: Iterable[DebEntry], architectures: Sequence[str]) -> list[SuiteIndexes]:
    """Per suite, a Packages index (plain and gzip) for every component and architecture.

    Architecture: all packages are in every binary-<arch> index, as Debian's Release says
    with No-Support-for-Architecture-all, so apt needs no binary-all index.
    """
    by_suite: dict[str, list[DebEntry]] = {}
    for entry in entries:
        by_suite.setdefault(entry.suite, []).append(entry)
    suites = []
    for suite, members in sorted(by_suite.items()):
        arches = sorted({e.arch for e in members if e.arch != "all"} | set(architectures))
        components = sorted({e.component for e in members})
        files: dict[str, bytes] = {}
        for component in components:
            for arch in arches:
                data = packages_index(
                    e for e in members if e.component == component and e.arch in (arch, "all")
                )
                files[f"{component}/binary-{arch}/Packages"] = data
                files[f"{component}/binary-{arch}/Packages.gz"] = gzip.compress(data, mtime=0)
        suites.append(SuiteIndexes(suite, tuple(components), tuple(arches), files))
    return suites


def release_file(suite: SuiteIndexes, label: str, date: datetime) -> bytes:
    """The suite's Release: what it holds, and the SHA256 of each index, which apt checks.

    No Valid-Until: an air-gapped mirror is refreshed when a bundle arrives, not on a clock.
    """
    listing = "".join(
        f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {name}\n"
        for name, data in sorted(suite.files.items())
    )
    text = (
        "Origin: SovereignStack\n"
        f"Label: {label}\n"
        f"Suite: {suite.name}\n"
        f"Codename: {suite.name}\n"
        f"Date: {format_datetime(date.astimezone(UTC), usegmt=True)}\n"
        f"Architectures: {' '.join(suite.architectures)}\n"
        f"Components: {' '.join(suite.components)}\n"
        "No-Support-for-Architecture-all: Packages\n"
        f"Description: {label}, imported from signed bundles by sovereign bundle import\n"
        f"SHA256:\n{listing}"
    )
    return text.encode()


class Gpg:
    """gpg in a home of its own: a temporary one, short enough for the agent's socket."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def __call__(self, *args: str, stdin: bytes | None = None) -> bytes:
        argv = ["gpg", "--batch", "--quiet", "--no-tty", "--homedir", str(self.home)]
        argv += ["--pinentry-mode", "loopback", "--passphrase", "", *args]
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise ImportFailed(f"gpg {args[-1]}: ran past {COMMAND_TIMEOUT_S} s") from None
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().replace("\n", "; ")
            raise ImportFailed(f"gpg {' '.join(args[:2])} failed: {detail}")
        return done.stdout


@dataclass(frozen=True)
class Signer:
    gpg: Gpg
    fingerprint: str
    key_file: Path  # where the secret key is kept

    def public_key(self) -> bytes:
        return self.gpg("--export", self.fingerprint)

    def clearsign(self, text: bytes) -> bytes:
        return self._sign(text, "--clearsign")

    def detach_sign(self, text: bytes) -> bytes:
        return self._sign(text, "--armor", "--detach-sign")

    def _sign(self, text: bytes, *how: str) -> bytes:
        try:
            return self.gpg(
                "--local-user", self.fingerprint, "--digest-algo", "SHA512", *how, stdin=text
            )
        except ImportFailed as error:
            raise ImportFailed(
                f"{error} (the import signs unattended: give a key without a passphrase)"
            ) from None


@contextlib.contextmanager
def archive_signer(key_file: Path, generate_uid: str | None) -> Iterator[Signer]:
    """The key in `key_file` (an exported secret key), loaded into a temporary gpg home;
    with `generate_uid`, made there first if the file does not exist."""
    home = Path(tempfile.mkdtemp(prefix="sovereign-apt-"))
    gpg = Gpg(home)
    try:
        if key_file.is_file():
            try:
                gpg("--import", str(key_file))
            except ImportFailed as error:
                raise BundleError(f"apt key {key_file}: cannot be imported: {error}") from None
        elif generate_uid is not None:
            gpg("--quick-gen-key", generate_uid, "ed25519", "sign", "never")
            secret = gpg("--armor", "--export-secret-keys")
            key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key_file.parent.chmod(0o700)
            write_bytes(key_file, secret, mode=0o600)
        else:
            raise BundleError(f"apt key {key_file}: no such file")
        fingerprints = _secret_fingerprints(gpg("--with-colons", "--list-secret-keys").decode())
        if len(fingerprints) != 1:
            raise BundleError(
                f"apt key {key_file}: holds {len(fingerprints)} secret keys; give exactly one"
            )
        signer = Signer(gpg, fingerprints[0], key_file)
        try:
            # Now, before anything is written: a key that cannot sign unattended is bad input.
            signer.clearsign(b"sovereign\n")
        except ImportFailed as error:
            raise BundleError(f"apt key {key_file}: cannot sign: {error}") from None
        yield signer
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        shutil.rmtree(home, ignore_errors=True)


def _secret_fingerprints(colons: str) -> list[str]:
    """The primary keys' fingerprints in `--with-colons --list-secret-keys` output."""
    found: list[str] = []
    primary = False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "ssb"):
            primary = fields[0] == "sec"
        elif fields[0] == "fpr" and primary and len(fields) > 9:
            found.append(fields[9])
            primary = False
    return found


def deb_control(deb: Path) -> str:
    try:
        done = subprocess.run(
            ["dpkg-deb", "--field", str(deb)],
            capture_output=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ImportFailed(f"{deb}: dpkg-deb could not read it: {error}") from None
    if done.returncode != 0:
        raise ImportFailed(f"{deb}: not a readable .deb: {done.stderr.decode().strip()}")
    return done.stdout.decode()


def import_debs(
    into: Path,
    debs: Sequence[Listed],
    blobs: BlobStore,
    state: State,
    profile: NodeProfile,
    signer: Signer,
) -> tuple[int, list[SuiteIndexes]]:
    root = into / "debian"
    written = 0
    for artifact in debs:
        file = artifact.files[0]  # one, and its path safe: checked by plan_import
        dest = root / file.path
        copied = copy_blob(blobs.path(file.digest), dest, file.digest)
        written += copied
        held = state.debs.get(file.path)
        suite_name, component = deb_location(artifact, profile.name)
        if copied or held is None or held["sha256"] != file.hex:
            control = deb_control(dest)
            arch = deb822.Packages(control).get("Architecture", "all")
            entry = DebEntry(file.path, suite_name, component, arch, control, file.hex, file.size)
            held = asdict(entry)
        state.debs[file.path] = {**held, "suite": suite_name, "component": component}
    written += write_bytes(root / KEYRING_FILE, signer.public_key())
    resign = state.apt_signer != signer.fingerprint
    suites = suite_indexes([DebEntry(**e) for e in state.debs.values()], profile.architectures)
    for suite in suites:
        dists = root / "dists" / suite.name
        stale = [n for n, d in suite.files.items() if not _holds_bytes(dists / n, d)]
        if not (stale or resign or not (dists / "InRelease").is_file()):
            continue
        for name, data in suite.files.items():
            written += write_bytes(dists / name, data)
        release = release_file(suite, profile.name, datetime.now(UTC))
        # InRelease last: apt reads it first, and it names the indexes written before it.
        write_bytes(dists / "Release", release)
        write_bytes(dists / "Release.gpg", signer.detach_sign(release))
        written += write_bytes(dists / "InRelease", signer.clearsign(release))
    state.apt_signer = signer.fingerprint
    return written, suites


# ---- container images: pushed to a registry -------------------------------------------------


@dataclass(frozen=True)
class LocalRegistry:
    """Where images are pushed, and the namespace the profile's oci mirror serves them in."""

    url: str  # http(s)://host[:port]
    prefix: str  # the oci mirror URL's path: repositories are named under it

    def repository(self, ref: ImageRef) -> str:
        """The source's repository path without its registry host."""
        return f"{self.prefix}/{ref.repository}" if self.prefix else ref.repository


def local_registry(host: str | None, oci_mirror: str) -> LocalRegistry:
    """`--registry HOST:PORT`, else the profile's oci mirror. Loopback is spoken to over
    plain HTTP, others over HTTPS; the mirror's own URL says which where it is used."""
    mirror = urlsplit(oci_mirror)
    prefix = mirror.path.strip("/")
    if host is None:
        return LocalRegistry(f"{mirror.scheme}://{mirror.netloc}", prefix)
    scheme = "http" if is_loopback(host) else "https"
    return LocalRegistry(f"{scheme}://{host}", prefix)


@dataclass(frozen=True)
class Push:
    repository: str  # on the local registry
    reference: str  # a tag, or a digest where the ref names none
    images: tuple[Listed, ...]  # one; several when platforms of one ref were bundled apart


def image_reference(image: Listed) -> ImageRef:
    """The image's own reference. Its `source` is, where the ref name may not be: `bundle
    create` names images by manifest digest, so two references to one image (a tag, and a
    digest) are both listed under one of their ref names."""
    return parse_reference(image.source or image.ref or "")


def plan_pushes(images: Sequence[Listed], registry: LocalRegistry) -> list[Push]:
    """One push per repository and reference. Two source registries whose repositories
    meet at one local name and reference with different images are refused: the node
    would get either."""
    grouped: dict[tuple[str, str], list[tuple[ImageRef, Listed]]] = {}
    for image in images:
        ref = image_reference(image)
        reference = ref.tag or str(ref.digest)
        grouped.setdefault((registry.repository(ref), reference), []).append((ref, image))
    pushes = []
    for (repository, reference), members in grouped.items():
        sources = {ref.name for ref, _ in members}
        if len(sources) > 1 and len({image.manifest for _, image in members}) > 1:
            raise BundleError(
                f"{', '.join(sorted(sources))} all become {repository}:{reference} on the "
                "local registry, with different images"
            )
        unique = {image.manifest: image for _, image in members}
        pushes.append(Push(repository, reference, tuple(unique.values())))
    return pushes


def platform_index(manifests: Sequence[tuple[bytes, str, Mapping[str, Any]]]) -> bytes:
    """An OCI index over image manifests (body, media type, config), for a ref whose
    platforms the bundle carries as separate images."""
    entries = []
    for body, media_type, config in manifests:
        platform = {"os": config.get("os"), "architecture": config.get("architecture")}
        if config.get("variant"):
            platform["variant"] = config["variant"]
        entries.append(
            {
                "mediaType": media_type,
                "digest": f"sha256:{hashlib.sha256(body).hexdigest()}",
                "size": len(body),
                "platform": platform,
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(index, separators=(",", ":"), sort_keys=True).encode()


class RegistryPusher:
    """The distribution API's push: HEAD each blob, upload the missing ones monolithically
    (POST, then PUT with ?digest=), then PUT the manifest."""

    def __init__(self, registry: LocalRegistry, http: requests.Session) -> None:
        self.registry = registry
        self.http = http
        self.auth = RegistryAuth(http, timeout=HTTP_TIMEOUT)
        self.uploaded = 0
        self.present = 0

    def _request(self, method: str, url: str, **options: Any) -> requests.Response:
        try:
            return self.http.request(method, url, auth=self.auth, timeout=HTTP_TIMEOUT, **options)
        except requests.RequestException as error:
            raise ImportFailed(f"{method} {url}: {error}") from None

    def check(self) -> None:
        url = f"{self.registry.url}/v2/"
        response = self._request("GET", url)
        if response.status_code not in (200, 401):
            raise ImportFailed(f"{url}: HTTP {response.status_code}; not a registry")

    def blob(self, repository: str, digest: str, path: Path) -> None:
        url = f"{self.registry.url}/v2/{repository}/blobs/{digest}"
        head = self._request("HEAD", url)
        if head.status_code == 200:
            self.present += 1
            return
        if head.status_code != 404:
            raise ImportFailed(f"HEAD {url}: HTTP {head.status_code}")
        start = self._request("POST", f"{self.registry.url}/v2/{repository}/blobs/uploads/")
        location = start.headers.get("Location")
        if start.status_code != 202 or not location:
            raise ImportFailed(f"{repository}: the registry refused an upload: {_why(start)}")
        target = urljoin(f"{self.registry.url}/", location)
        target += ("&" if "?" in target else "?") + f"digest={quote(digest)}"
        with path.open("rb") as body:
            done = self._request(
                "PUT",
                target,
                data=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
            )
        if done.status_code != 201:
            raise ImportFailed(f"{repository}: blob {digest} was refused: {_why(done)}")
        self.uploaded += 1

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        url = f"{self.registry.url}/v2/{repository}/manifests/{reference}"
        response = self._request("HEAD", url, headers={"Accept": ACCEPT})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ImportFailed(f"HEAD {url}: {_why(response)}")
        return response.headers.get("Docker-Content-Digest")

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> bool:
        """False where the reference holds this manifest already."""
        digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
        if self.manifest_digest(repository, reference) == digest:
            return False
        url = f"{self.registry.url}/v2/{repository}/manifests/{reference}"
        response = self._request("PUT", url, data=body, headers={"Content-Type": media_type})
        if response.status_code != 201:
            raise ImportFailed(
                f"{repository}:{reference}: the manifest was refused: {_why(response)}"
            )
        served = response.headers.get("Docker-Content-Digest", digest)
        if served != digest:
            raise ImportFailed(f"{url}: the registry stored {served}, not {digest}")
        return True


def _why(response: requests.Response) -> str:
    try:
        codes = [str(e.get("code")) for e in response.json().get("errors", [])]
    except (ValueError, AttributeError):
        codes = []
    return f"HTTP {response.status_code}" + (f" ({', '.join(codes)})" if codes else "")


def import_images(
    pushes: Sequence[Push], blobs: BlobStore, pusher: RegistryPusher, state: State
) -> tuple[int, list[str]]:
    """Push every image; the manifests written, and notes on what a node cannot pull."""
    written = 0
    notes: list[str] = []
    for push in pushes:
        manifests = []
        for image in push.images:
            body = blobs.read(image.manifest)
            document = json.loads(body)
            media_type = str(document.get("mediaType") or MEDIA_MANIFEST)
            if media_type in INDEXES:
                raise BundleError(f"{image.source}: an image index in the bundle; expected images")
            for item in [document["config"], *document.get("layers", [])]:
                pusher.blob(push.repository, item["digest"], blobs.path(item["digest"]))
            config = json.loads(blobs.read(document["config"]["digest"]))
            manifests.append((body, media_type, config if isinstance(config, dict) else {}))
        by_digest = push.reference.startswith("sha256:")
        if len(manifests) == 1 and not by_digest:
            body, media_type, _ = manifests[0]
            written += pusher.put_manifest(push.repository, push.reference, body, media_type)
        else:
            # By digest as well: an index refers to its images by digest, and a digest-only
            # ref is pulled by digest.
            for body, media_type, _ in manifests:
                digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
                written += pusher.put_manifest(push.repository, digest, body, media_type)
            if len(manifests) > 1 and not by_digest:
                index = platform_index(manifests)
                written += pusher.put_manifest(push.repository, push.reference, index, OCI_INDEX)
        for image in push.images:
            state.images[str(image_reference(image))] = image.manifest
        if by_digest and push.reference not in {i.manifest for i in push.images}:
            notes.append(
                f"{push.repository}@{push.reference} was an index upstream; the bundle holds "
                "its platform images, pushed by their own digests"
            )
    return written, notes


# ---- the node's configs ---------------------------------------------------------------------


def pip_conf(profile: str, index_url: str) -> bytes:
    return (
        f"# {HEADER.format(profile=profile)}: the imported mirror, and no other index.\n"
        f"[global]\nindex-url = {index_url}\n"
    ).encode()


def apt_sources(profile: str, url: str, suites: Sequence[SuiteIndexes]) -> bytes:
    """deb822 sources: one stanza per set of components, the suites that have them."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for suite in suites:
        groups.setdefault(suite.components, []).append(suite.name)
    stanzas = [
        f"Types: deb\nURIs: {url}\nSuites: {' '.join(names)}\n"
        f"Components: {' '.join(components)}\nSigned-By: {NODE_KEYRING}\n"
        for components, names in sorted(groups.items())
    ]
    return (f"# {HEADER.format(profile=profile)}.\n" + "\n".join(stanzas)).encode()


def registries_conf(profile: str, sources: Iterable[str], mirror: str) -> bytes:
    """Each source registry rewritten to the mirror: containers/image pulls from the
    `location` alone, so there is no upstream to fall back to. Neither `blocked` (it
    refuses a prefix before its mirrors are tried) nor a [[registry.mirror]] (a miss
    there falls back to the source) would do that."""
    parts = urlsplit(mirror)
    location = f"{parts.netloc}{parts.path.rstrip('/')}"
    insecure = "true" if parts.scheme == "http" else "false"
    entries = [
        f"[[registry]]\nprefix = {json.dumps(source)}\nlocation = {json.dumps(location)}\n"
        f"insecure = {insecure}\n"
        for source in sorted(set(sources))
    ]
    header = f"# {HEADER.format(profile=profile)}: images come from the imported mirror only.\n"
    return (header + "\n".join(entries)).encode()


def node_configs(
    profile: NodeProfile, state: State, suites: Sequence[SuiteIndexes], keyring: bytes | None
) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if state.wheels:
        files["etc/pip.conf"] = pip_conf(profile.name, profile.mirrors["pypi"])
    if state.debs and keyring is not None:
        sources = apt_sources(profile.name, profile.mirrors["debian"], suites)
        files["etc/apt/sources.list.d/sovereign.sources"] = sources
        files[NODE_KEYRING.lstrip("/")] = keyring
    if state.images:
        registries = {parse_reference(ref).registry for ref in state.images}
        files["etc/containers/registries.conf.d/sovereign.conf"] = registries_conf(
            profile.name, registries, profile.mirrors["oci"]
        )
    return files


# ---- the import -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportOptions:
    bundle: Path
    trusted: Ed25519PublicKey
    into: Path
    key_home: Path  # where a generated apt key is kept, per profile; never under `into`
    base: Path | None = None
    registry: str | None = None  # HOST[:PORT]; default: the profile's oci mirror
    apt_key: Path | None = None


@dataclass(frozen=True)
class Plan:
    """What the bundle holds, checked before anything is written."""

    profile: NodeProfile
    by_kind: dict[str, list[Listed]]
    pushes: list[Push]
    registry: LocalRegistry | None


def import_bundle(options: ImportOptions, log: Log) -> Imported:
    verification = verify(options.bundle, options.trusted, options.base)
    if not verification.ok or verification.manifest is None or verification.digest is None:
        raise ImportRefused(verification.findings)
    log(f"verified {verification.blobs_checked} blobs, signed by key {verification.signer}")
    roots = (options.bundle,) if options.base is None else (options.bundle, options.base)
    blobs = BlobStore(roots, frozenset(verification.manifest["blobs"]))
    plan = plan_import(verification.manifest["artifacts"], blobs, options.registry)
    if options.into.exists() and not options.into.is_dir():
        raise BundleError(f"--into {options.into} is not a directory")
    try:
        options.into.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BundleError(f"--into {options.into}: cannot be made: {error.strerror}") from None
    with _locked(options.into):
        state = State.load(options.into)
        if state.profile not in (None, plan.profile.name):
            raise BundleError(
                f"--into {options.into} holds the mirrors of profile {state.profile}; this "
                f"bundle is for {plan.profile.name}: import it into a directory of its own"
            )
        state.profile = plan.profile.name
        kinds = _Run(options, blobs, state, plan, log).all()
        seen = verification.digest in state.bundles
        if not seen:
            state.bundles.append(verification.digest)
        state.save(options.into)
    return Imported(verification.digest, plan.profile.name, kinds, seen)


def plan_import(listed: Any, blobs: BlobStore, registry: str | None) -> Plan:
    """Every check that needs no writing: the profile's mirrors, every path, every image
    reference, the tools the Debian repository needs."""
    artifacts = [Listed.parse(a, i) for i, a in enumerate(listed)]
    profile = read_profile(artifacts, blobs)
    check_mirrors(profile, artifacts)
    by_kind: dict[str, list[Listed]] = {}
    for artifact in artifacts:
        by_kind.setdefault(artifact.kind, []).append(artifact)
        _check_paths(artifact)
    for kind in TREES:
        paths = Counter(f.path for a in by_kind.get(kind, []) for f in a.files)
        twice = sorted(p for p, n in paths.items() if n > 1)
        if twice:
            raise BundleError(f"bundle.json: {kind} artifacts both hold {', '.join(twice)}")
    if by_kind.get("deb"):
        missing = [t for t in ("gpg", "gpgconf", "dpkg-deb") if shutil.which(t) is None]
        if missing:
            raise BundleError(f"the Debian repository needs {', '.join(missing)}; install them")
    local = None
    pushes: list[Push] = []
    if by_kind.get("oci-image"):
        local = local_registry(registry, profile.mirrors["oci"])
        try:
            pushes = plan_pushes(by_kind["oci-image"], local)
        except MirrorError as error:
            raise BundleError(f"bundle.json: {error}") from None
    return Plan(profile, by_kind, pushes, local)


def _check_paths(artifact: Listed) -> None:
    where = f"bundle.json: {artifact.kind} {artifact.name}"
    for file in artifact.files:
        safe_path(file.path, where)
    if artifact.kind == "model":
        safe_path(artifact.target or f"models/{artifact.name}", f"{where}: target")
    elif artifact.kind == "wheel":
        for file in artifact.files:
            if "/" in file.path or not file.path.endswith(".whl"):
                raise BundleError(f"{where}: {file.path!r} is not a wheel's file name")
    elif artifact.kind == "deb":
        if len(artifact.files) != 1:
            raise BundleError(f"{where}: a deb is one file, not {len(artifact.files)}")
        deb_location(artifact, "main")
        first = PurePosixPath(artifact.files[0].path).parts[0]
        if first == "dists" or artifact.files[0].path == KEYRING_FILE:
            raise BundleError(f"{where}: {artifact.files[0].path!r} would replace the indexes")
    elif artifact.kind == "oci-image" and not (artifact.source or artifact.ref):
        raise BundleError(f"{where}: a container image without its reference")


@contextlib.contextmanager
def _locked(into: Path) -> Iterator[None]:
    """One import into a directory at a time: two would interleave the indexes."""
    (into / STATE_DIR).mkdir(exist_ok=True)
    with (into / STATE_DIR / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BundleError(f"--into {into}: another import is running into it") from None
        yield


@dataclass
class _Run:
    options: ImportOptions
    blobs: BlobStore
    state: State
    plan: Plan
    log: Log
    summaries: list[KindSummary] = field(default_factory=list)

    @property
    def into(self) -> Path:
        return self.options.into

    def kind(self, kind: str) -> list[Listed]:
        return self.plan.by_kind.get(kind, [])

    def all(self) -> list[KindSummary]:
        with contextlib.ExitStack() as stack:
            signer = None
            if self.kind("deb") or self.state.debs:
                # First: a bad --apt-key is bad input, found before anything is written.
                signer = stack.enter_context(self._signer())
            pusher = None
            if self.plan.registry is not None:
                # A local registry: a few quick retries, not a long wait on one that is down.
                http = session(retries=3)
                stack.callback(http.close)
                pusher = RegistryPusher(self.plan.registry, http)
                self._step("oci-image", pusher.check)
            self._step("model", self._models)
            for kind in TREES:
                self._step(kind, functools.partial(self._tree, kind))
            self._step("wheel", self._wheels)
            suites: list[SuiteIndexes] = []
            if signer is not None:
                suites = self._step("deb", functools.partial(self._debs, signer))
            if pusher is not None:
                self._step("oci-image", functools.partial(self._images, pusher))
            keyring = (self.into / "debian" / KEYRING_FILE).read_bytes() if signer else None
            configs = node_configs(self.plan.profile, self.state, suites, keyring)
            self._step("node-config", functools.partial(self._configs, configs))
        return self.summaries

    def _signer(self) -> contextlib.AbstractContextManager[Signer]:
        if self.options.apt_key is not None:
            return archive_signer(self.options.apt_key, None)
        name = self.plan.profile.name
        key_file = self.options.key_home / name / "archive-key.asc"
        return archive_signer(
            key_file, f"SovereignStack archive, {name} <archive@sovereign.invalid>"
        )

    def _step(self, kind: str, step: Callable[[], T]) -> T:
        try:
            result = step()
        except (ImportFailed, OSError) as error:
            done = ", ".join(s.kind for s in self.summaries if s.written) or "nothing"
            raise ImportFailed(
                f"{kind}: {error}. Written before it, and intact: {done}; run the import "
                "again once this is fixed"
            ) from None
        self.state.save(self.into)
        return result

    def _add(self, summary: KindSummary) -> None:
        self.summaries.append(summary)

    def _models(self) -> None:
        models = self.kind("model")
        if not models:
            return
        trees = TreeWriter(self.into, self.state, self.blobs)
        written = 0
        places = []
        for model in models:
            target = PurePosixPath("models", model.target or f"models/{model.name}")
            sums = sha256sums((f.path, f.hex) for f in model.files).encode()
            written += trees.write(target, model.files, {"SHA256SUMS": sums})
            places.append(str(self.into / target))
        self._add(KindSummary("model", len(models), written, ", ".join(places)))

    def _tree(self, kind: str) -> None:
        artifacts = self.kind(kind)
        if not artifacts:
            return
        files = [f for a in artifacts for f in a.files]
        relative = PurePosixPath(TREES[kind])
        written = TreeWriter(self.into, self.state, self.blobs).write(relative, files, {})
        self._add(KindSummary(kind, len(artifacts), written, str(self.into / relative)))

    def _wheels(self) -> None:
        wheels = self.kind("wheel")
        if not wheels:
            return
        written = import_wheels(self.into, wheels, self.blobs, self.state)
        projects = len({w["project"] for w in self.state.wheels.values()})
        detail = f"the index has {projects} project(s), {len(self.state.wheels)} wheel(s)"
        self._add(KindSummary("wheel", len(wheels), written, str(self.into / "pypi"), detail))

    def _debs(self, signer: Signer) -> list[SuiteIndexes]:
        debs = self.kind("deb")
        profile = self.plan.profile
        written, suites = import_debs(self.into, debs, self.blobs, self.state, profile, signer)
        if debs:
            listing = "; ".join(f"{s.name} ({', '.join(s.components)})" for s in suites)
            detail = f"suites {listing}; signed by {signer.fingerprint} ({signer.key_file})"
            self._add(KindSummary("deb", len(debs), written, str(self.into / "debian"), detail))
        return suites

    def _images(self, pusher: RegistryPusher) -> None:
        images = self.kind("oci-image")
        written, notes = import_images(self.plan.pushes, self.blobs, pusher, self.state)
        names = ", ".join(
            f"{p.repository}{'@' if p.reference.startswith('sha256:') else ':'}{p.reference}"
            for p in self.plan.pushes
        )
        detail = f"{names}; {pusher.uploaded} blob(s) uploaded, {pusher.present} present"
        detail += "".join(f"; {note}" for note in notes)
        where = f"registry {pusher.registry.url}"
        self._add(KindSummary("oci-image", len(images), written + pusher.uploaded, where, detail))

    def _configs(self, configs: Mapping[str, bytes]) -> None:
        if not configs:
            return
        root = self.into / "node-config"
        written = sum(write_bytes(root / name, data) for name, data in sorted(configs.items()))
        detail = ", ".join(sorted(configs))
        self._add(KindSummary("node-config", len(configs), written, str(root), detail))


_REGISTRY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:\d{1,5})?")


def valid_registry(text: str) -> bool:
    """HOST[:PORT], as `--registry` takes it."""
    return _REGISTRY.fullmatch(text) is not None
