"""The model mirror: a model's files from a Hugging Face-compatible hub, or from a local
file or directory, every file checked, with the model's licence and card recorded.

A hub model must be pinned to a full commit: a branch moves, so a mirror of `main` could
not say which weights it holds. The files are listed with `?blobs=true`, which gives each
LFS file's sha256 and size and each plain file's git blob id. LFS files are fetched with
their sha256 checked by `Fetcher`; a plain file has no published digest but its blob id,
so it is fetched under a staging name and moved into place only once that id matches.

A git-lfs pointer is never stored as a model file: a clone made without git-lfs holds
pointers where its weights should be. The file a pointer stands for is fetched from the
hub's `resolve/` and checked against the sha256 and size the pointer names, when an
endpoint and the repository are known (given, or read from the clone's `.git`); without
them the pointer is refused, named.

Layout under the mirror's directory; `hf:` paths are those the node resolves
(`render.artifacts.weights_path`) once the bundle is unpacked:

    hf/<org>/<repo>/<commit>/<files>      local/<name>/<files>
    hf/<org>/<repo>/<commit>/model.json   local/<name>/model.json

`model.json` holds the repository, the commit, every file with its sha256, size and
source, the licence and the card's path. A model whose licence cannot be determined is
still mirrored: its licence is None, a warning says so, and the bundle lists the licence
as unknown (NOASSERTION in the SBOM).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from cyclonedx.spdx import fixup_id, is_expression
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import (
    CHUNK,
    ChecksumMismatch,
    Download,
    DownloadsFailed,
    Fetched,
    Fetcher,
    MirrorError,
    json_of,
)
from sovereign.tools import sha256_file

MANIFEST = "model.json"
FORMAT = "sovereign-model/1"
CARD = "README.md"
LFS_VERSION = b"version https://git-lfs.github.com/spec/v1"
# The git-lfs spec keeps a pointer under 1024 bytes; a larger file is content, never read whole.
POINTER_MAX = 1024
STAGED_SUFFIX = ".unverified"
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
COMMIT = re.compile(r"[0-9a-fA-F]{40}")
LOCAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # as ModelSpec.name
HF_SOURCE = re.compile(rf"hf:(?P<repo>{REPO.pattern})(?:@(?P<rev>[^/]+))?(?:/(?P<file>.+))?")
# Kept whatever the filter says: the bundle's SBOM cites the card and the licence text.
ALWAYS_KEPT = (CARD, "LICENSE*", "LICENCE*", "COPYING*", "NOTICE*")
LICENCE_STEMS = frozenset({"LICENSE", "LICENCE", "COPYING"})
# Not the model: git's store, and the metadata `huggingface-cli download --local-dir` keeps.
LOCAL_SKIP = frozenset({".git", ".cache"})


# Sources


@dataclass(frozen=True)
class HubSource:
    repo: str  # <org>/<repo>
    revision: str | None
    file: str | None  # one file of the repository; None for all of it (or `allow`)


@dataclass(frozen=True)
class LocalSource:
    path: Path


def parse_source(source: str) -> HubSource | LocalSource:
    scheme, _, rest = source.partition(":")
    if scheme == "hf":
        match = HF_SOURCE.fullmatch(source)
        if match is None:
            raise MirrorError(f"{source!r}: expected hf:<org>/<repo>@<commit>[/<file>]")
        if match["file"] is not None:
            check_repo_path(match["file"], source)
        return HubSource(match["repo"], match["rev"], match["file"])
    if scheme == "file":
        path = PurePosixPath(rest)
        if not path.is_absolute() or ".." in path.parts:
            raise MirrorError(f"{source!r}: file: needs an absolute path without '..'")
        return LocalSource(Path(path))
    if scheme == "pkg":
        raise MirrorError(f"{source!r}: pkg: files come with `sovereign tools install`")
    if scheme == "bundle":
        raise MirrorError(f"{source!r}: bundle: names a file already in an imported bundle")
    raise MirrorError(f"{source!r}: the model mirror fetches hf: and file: sources")


def pinned_commit(revision: str | None) -> str | None:
    """The commit `revision` names if it is a full one, lower-cased; None for a branch, a
    tag or a short sha, which can move or become ambiguous."""
    if revision is not None and COMMIT.fullmatch(revision):
        return revision.lower()
    return None


def check_repo_path(path: str, where: str) -> None:
    """A file name from a listing or a source must stay inside the model's directory."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise MirrorError(f"{where}: {path!r} is not a relative path inside the repository")


def resolve_url(endpoint: str, repo: str, commit: str, path: str) -> str:
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/{quote(path)}"


def revision_url(endpoint: str, repo: str, revision: str, blobs: bool = False) -> str:
    url = f"{endpoint.rstrip('/')}/api/models/{repo}/revision/{quote(revision, safe='')}"
    return f"{url}?blobs=true" if blobs else url


def huggingface_purl(repo: str, commit: str) -> str:
    org, name = repo.split("/")
    return f"pkg:huggingface/{quote(org, safe='')}/{quote(name, safe='')}@{commit.lower()}"


# git and git-lfs


@dataclass(frozen=True)
class LfsPointer:
    sha256: str
    size: int


def parse_pointer(data: bytes) -> LfsPointer | None:
    """The object a git-lfs pointer names, or None when `data` is not a pointer."""
    if len(data) >= POINTER_MAX or not data.startswith(LFS_VERSION + b"\n"):
        return None
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        return None
    fields = {key: value for key, _, value in (line.partition(" ") for line in lines)}
    oid = re.fullmatch(r"sha256:([0-9a-f]{64})", fields.get("oid", ""))
    size = fields.get("size", "")
    if oid is None or not size.isdigit():
        return None
    return LfsPointer(oid.group(1), int(size))


def read_pointer(path: Path) -> LfsPointer | None:
    if path.stat().st_size >= POINTER_MAX:
        return None
    return parse_pointer(path.read_bytes())


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: sha1 of `blob <size>\\0<content>`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def git_blob_id_file(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size, usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_origin(clone: Path) -> tuple[str, str] | None:
    """The hub repository and commit a git clone was checked out from: its `origin`
    remote and HEAD. None when the directory is no clone or they cannot be read."""
    git = clone / ".git"
    if not git.is_dir():
        return None
    commit, repo = _git_head(git), _git_origin_repo(git)
    return (repo, commit) if commit is not None and repo is not None else None


def _git_head(git: Path) -> str | None:
    head = _read(git / "HEAD")
    if head is not None and head.startswith("ref: "):
        ref = head.removeprefix("ref: ")
        head = _read(git / ref) or _packed_ref(git, ref)
    return pinned_commit(head)


def _packed_ref(git: Path, ref: str) -> str | None:
    for line in (_read(git / "packed-refs") or "").splitlines():
        sha, _, name = line.partition(" ")
        if name == ref:
            return sha
    return None


def _git_origin_repo(git: Path) -> str | None:
    config = _read(git / "config") or ""
    section = re.search(r'^\s*\[remote "origin"\]\s*$(.*?)(?=^\s*\[|\Z)', config, re.M | re.S)
    url = re.search(r"^\s*url\s*=\s*(\S+)", section.group(1), re.M) if section else None
    if url is None:
        return None
    address = url.group(1)
    # https://host/<org>/<repo>(.git), or scp-like git@host:<org>/<repo>(.git)
    path = urlsplit(address).path if "://" in address else address.partition(":")[2]
    repo = path.strip("/").removesuffix(".git")
    return repo if REPO.fullmatch(repo) else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


# Licence


@dataclass(frozen=True)
class Licence:
    # An SPDX id or expression; LicenseRef-<name> for one the SPDX list lacks (or for the
    # text of a LICENSE file the card does not name); None when nothing says.
    spdx: str | None
    stated: str | None = None  # as the card or the hub wrote it: "apache-2.0", "other"
    name: str | None = None  # license_name, which names an "other" licence
    link: str | None = None  # license_link
    file: str | None = None  # the licence text kept in the mirror, where there is one


def front_matter(card: str) -> dict[str, Any]:
    """The YAML block a model card starts with; empty when it has none or it is broken
    (a broken card then states no licence, which is reported, not fatal)."""
    match = re.match(r"\ufeff?---[ \t]*\r?\n(.*?)^(?:---|\.\.\.)[ \t]*\r?$", card, re.S | re.M)
    if match is None:
        return {}
    try:
        data = YAML(typ="safe", pure=True).load(match.group(1))
    except YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def spdx_expression(stated: str | Sequence[str], name: str | None = None) -> str | None:
    """The hub's licence id(s) as SPDX. Hub ids are SPDX ids in lower case where SPDX has
    one (apache-2.0); others (llama3, openrail) and a named "other" become LicenseRef-s.
    A list must all be complied with, so it is joined with AND."""
    ids = [stated] if isinstance(stated, str) else list(stated)
    parts = [_spdx_id(str(one).strip(), name) for one in ids]
    known = [part for part in parts if part is not None]
    if not known or len(known) < len(parts):
        return None
    return " AND ".join(known)


def _spdx_id(stated: str, name: str | None) -> str | None:
    if spdx := fixup_id(stated):
        return spdx
    if stated.startswith("LicenseRef-") or (" " in stated and is_expression(stated)):
        return stated
    if stated.lower() in ("", "unknown"):
        return None
    if stated.lower() == "other":
        return f"LicenseRef-{_idstring(name)}" if name else None
    return f"LicenseRef-{_idstring(stated)}"


def _idstring(text: str) -> str:
    """SPDX allows letters, digits, '.' and '-' after LicenseRef-."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-") or "unnamed"


def licence_file(paths: Iterable[str]) -> str | None:
    for path in sorted(paths):
        if "/" not in path and PurePosixPath(path).stem.upper() in LICENCE_STEMS:
            return path
    return None


def determine_licence(
    card: str | None, card_data: Mapping[str, Any] | None, paths: Iterable[str], label: str
) -> Licence:
    """The card's front matter first, then the hub's `cardData` (its own reading of the
    card), then the presence of a LICENSE file, whose text is then the licence."""
    file = licence_file(paths)
    for meta in (front_matter(card) if card else {}, card_data or {}):
        stated = meta.get("license")
        if isinstance(stated, str | list) and stated:
            name, link = _text(meta.get("license_name")), _text(meta.get("license_link"))
            spdx = spdx_expression(stated, name)
            if spdx is None and file is not None:
                spdx = _file_ref(label, file)
            words = stated if isinstance(stated, str) else ", ".join(map(str, stated))
            return Licence(spdx, words, name, link, file)
    return Licence(_file_ref(label, file) if file else None, file=file)


def _file_ref(label: str, file: str) -> str:
    return f"LicenseRef-{_idstring(label)}-{_idstring(PurePosixPath(file).stem)}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def licence_warnings(label: str, licence: Licence) -> list[str]:
    if licence.spdx is None:
        return [
            f"{label}: no licence found (no `license:` in its {CARD} front matter or the "
            f"hub's card data, no LICENSE file); it is mirrored, and the bundle lists its "
            f"licence as unknown (NOASSERTION in the SBOM)"
        ]
    if licence.file is not None and licence.spdx == _file_ref(label, licence.file):
        return [
            f"{label}: the card names no licence; its licence is the text of "
            f"{licence.file}, recorded as {licence.spdx}"
        ]
    if licence.spdx.startswith("LicenseRef-"):
        return [f"{label}: licence {licence.stated!r} is not on the SPDX list; {licence.spdx}"]
    return []


# The result


@dataclass(frozen=True)
class MirroredFile:
    path: str  # inside the model's directory
    sha256: str
    size: int
    source: str  # the URL it was fetched from, or the local file's URI
    lfs: bool  # fetched as an LFS object (from the listing, or a pointer)


@dataclass(frozen=True)
class MirroredModel:
    name: str
    directory: Path
    version: str  # the commit; for a local source, `sha256:` of its content
    licence: Licence
    files: tuple[MirroredFile, ...]
    artifacts: tuple[Artifact, ...]
    warnings: tuple[str, ...]  # for the caller to print: an unknown licence, for one
    resumed: tuple[str, ...] = ()  # continued from a `.part` or after a dropped connection
    reused: tuple[str, ...] = ()  # already in place and checked; nothing was fetched


@dataclass
class _Fetch:
    files: list[MirroredFile] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def extend(self, other: _Fetch) -> None:
        self.files += other.files
        self.resumed += other.resumed
        self.reused += other.reused


def mirror_model(
    source: str,
    out: Path,
    fetcher: Fetcher,
    endpoint: str | None = None,
    *,
    allow: Sequence[str] | None = None,
    sha256: str | None = None,
    name: str | None = None,
    origin: str | None = None,
) -> MirroredModel:
    """Mirror the model `source` (hf:<org>/<repo>@<commit>[/<file>] or file:/<path>) into
    `out`, from the hub at `endpoint` (such as https://huggingface.co).

    `allow`: fnmatch patterns over the repository's paths (`*` also matches `/`) to keep;
    by default every file, or only the file the source names; the card and licence files
    are always kept. `sha256`: the digest the single file must have (the profile's
    ModelSpec.sha256). `name`: a local model's directory name (default: the file's stem
    or the directory's name). `origin`: <org>/<repo>@<commit> a local copy came from, to
    fetch what its LFS pointers stand for (default: read from a clone's `.git`; a single
    file's path in the repository is taken to be its name).

    Raises MirrorError (ChecksumMismatch, DownloadsFailed with BlobIdMismatch) naming the
    file; a file that failed its check is never left in the mirror.
    """
    parsed = parse_source(source)
    if isinstance(parsed, HubSource):
        if endpoint is None:
            raise MirrorError(f"{source}: an hf: source needs a hub endpoint")
        return _mirror_hub(source, parsed, out, fetcher, endpoint, allow, sha256)
    return _mirror_local(source, parsed, out, fetcher, endpoint, allow, sha256, name, origin)


# From the hub


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int | None
    blob_id: str | None  # git's id of what git holds: the content, or an LFS file's pointer
    lfs: LfsPointer | None


def hub_files(listing: Any, commit: str, where: str) -> list[HubFile]:
    """The files of a `?blobs=true` revision listing; each must be checkable."""
    if not isinstance(listing, dict) or not isinstance(listing.get("siblings"), list):
        raise MirrorError(f"{where}: not a model revision listing (no siblings)")
    if str(listing.get("sha", "")).lower() != commit:
        raise MirrorError(f"{where}: the hub answered for {listing.get('sha')!r}, not {commit}")
    return [_hub_file(entry, where) for entry in listing["siblings"]]


def _hub_file(entry: Any, where: str) -> HubFile:
    path = entry.get("rfilename") if isinstance(entry, dict) else None
    if not isinstance(path, str):
        raise MirrorError(f"{where}: a file without rfilename: {entry!r}")
    check_repo_path(path, where)
    lfs, blob_id, size = entry.get("lfs"), entry.get("blobId"), entry.get("size")
    pointer = None
    if isinstance(lfs, dict):
        sha256, lfs_size = lfs.get("sha256"), lfs.get("size")
        if not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise MirrorError(f"{where}: {path}: lfs.sha256 {sha256!r} is not a sha256")
        if not isinstance(lfs_size, int) or lfs_size < 0:
            raise MirrorError(f"{where}: {path}: lfs.size {lfs_size!r} is not a size")
        pointer = LfsPointer(sha256, lfs_size)
    elif not isinstance(blob_id, str):
        raise MirrorError(
            f"{where}: {path} has neither an LFS sha256 nor a git blob id to check it by"
        )
    return HubFile(
        path,
        size if isinstance(size, int) else None,
        blob_id if isinstance(blob_id, str) else None,
        pointer,
    )


def selected(path: str, allow: Sequence[str] | None, file: str | None) -> bool:
    """Whether a mirror keeps `path`: the file the source names, what `allow` matches
    (everything when neither is given), and always the card and licence files."""
    if path == file:
        return True
    patterns = [*ALWAYS_KEPT, *(allow if allow is not None else [] if file else ["*"])]
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def check_repo_commit(headers: Mapping[str, str], commit: str, url: str) -> None:
    """The hub names the commit it answered from; it must be the pinned one."""
    served = headers.get("X-Repo-Commit")
    if served is not None and served.strip().lower() != commit:
        raise MirrorError(f"{url}: the hub served commit {served}, not the pinned {commit}")


def _mirror_hub(
    source: str,
    ref: HubSource,
    out: Path,
    fetcher: Fetcher,
    endpoint: str,
    allow: Sequence[str] | None,
    sha256: str | None,
) -> MirroredModel:
    commit = _require_commit(source, ref, fetcher, endpoint)
    if sha256 is not None and ref.file is None:
        raise MirrorError(f"{source}: a sha256 pins one file: hf:<org>/<repo>@<commit>/<file>")
    listing_url = revision_url(endpoint, ref.repo, commit, blobs=True)
    listing = json_of(fetcher.get(listing_url))
    files = _choose(source, ref, hub_files(listing, commit, listing_url), allow, sha256)
    urls = {f.path: resolve_url(endpoint, ref.repo, commit, f.path) for f in files}
    _check_served_commit(fetcher, urls.values(), commit)
    directory = out.joinpath("hf", *ref.repo.split("/"), commit)
    fetched = _download_hub(fetcher, files, urls, directory, f"model {ref.repo}")
    if sha256 is not None and ref.file is not None:
        _check_expected(fetched, directory, ref.file, sha256)
    card_data = listing.get("cardData")
    licence = determine_licence(
        _card(directory, fetched),
        card_data if isinstance(card_data, dict) else None,
        [f.path for f in fetched.files],
        ref.repo,
    )
    identity = {"repo": ref.repo, "commit": commit, "path": None, "endpoint": endpoint}
    purl = huggingface_purl(ref.repo, commit)
    return _finish(out, directory, identity, ref.repo, commit, purl, licence, fetched)


def _require_commit(source: str, ref: HubSource, fetcher: Fetcher, endpoint: str) -> str:
    commit = pinned_commit(ref.revision)
    if commit is not None:
        return commit
    revision = ref.revision or "main"
    current = _current_commit(fetcher, endpoint, ref.repo, revision)
    pin = f"hf:{ref.repo}@{current}" + (f"/{ref.file}" if ref.file else "")
    hint = f"; {revision} is at {current} now: {pin}" if current else ""
    problem = f"revision {ref.revision!r} is not a commit" if ref.revision else "no commit"
    raise MirrorError(
        f"{source}: {problem}; a branch, tag or short sha can move, so pin the full "
        f"40-character commit{hint}"
    )


def _current_commit(fetcher: Fetcher, endpoint: str, repo: str, revision: str) -> str | None:
    """What a branch points to now, for the message only; None when the hub does not say."""
    try:
        data = json_of(fetcher.get(revision_url(endpoint, repo, revision)))
    except MirrorError:
        return None
    sha = data.get("sha") if isinstance(data, dict) else None
    return pinned_commit(sha) if isinstance(sha, str) else None


def _choose(
    source: str,
    ref: HubSource,
    available: list[HubFile],
    allow: Sequence[str] | None,
    sha256: str | None,
) -> list[HubFile]:
    by_path = {f.path: f for f in available}
    if ref.file is not None and ref.file not in by_path:
        raise MirrorError(f"{source}: the repository has no file {ref.file}")
    target = by_path.get(ref.file or "")
    pinned = target.lfs.sha256 if target is not None and target.lfs is not None else sha256
    if sha256 is not None and pinned != sha256:  # refused before gigabytes are fetched
        raise MirrorError(
            f"{source}: the hub lists sha256 {pinned} for {ref.file}, but {sha256} is pinned"
        )
    files = [f for f in available if selected(f.path, allow, ref.file)]
    if not files:
        raise MirrorError(f"{source}: no file of the repository matches {list(allow or [])}")
    if any(f.path == MANIFEST for f in files):
        raise MirrorError(f"{source}: a file named {MANIFEST} would be overwritten; filter it out")
    return files


def _check_served_commit(fetcher: Fetcher, urls: Iterable[str], commit: str) -> None:
    """HEAD each file as huggingface_hub does: the hub answers an LFS file with a redirect
    to its CDN, and only that first answer carries X-Repo-Commit."""
    for url in urls:
        try:
            with fetcher.http.head(url, allow_redirects=False, timeout=fetcher.timeout) as answer:
                if answer.status_code >= 400:
                    raise MirrorError(f"{url}: HTTP {answer.status_code} {answer.reason}")
                check_repo_commit(answer.headers, commit, url)
        except requests.RequestException as error:
            raise MirrorError(f"{url}: {error}") from None


def _download_hub(
    fetcher: Fetcher,
    files: list[HubFile],
    urls: Mapping[str, str],
    directory: Path,
    what: str,
) -> _Fetch:
    result = _Fetch()
    downloads = []
    plain: dict[Path, HubFile] = {}  # staging path: the file it becomes once checked
    for file in files:
        dest = directory / file.path
        if file.lfs is not None:
            downloads.append(Download(urls[file.path], dest, file.lfs.sha256, file.lfs.size))
        elif dest.is_file() and git_blob_id_file(dest) == file.blob_id:
            result.files.append(_plain(file, dest, urls[file.path]))
            result.reused.append(file.path)
        else:
            staged = dest.with_name(dest.name + STAGED_SUFFIX)
            plain[staged] = file
            downloads.append(Download(urls[file.path], staged, None, file.size))
    try:
        fetched = fetcher.download_all(downloads, what)
        pointers = _promote_plain(fetched, plain, directory, result)
    finally:
        for staged in plain:
            staged.unlink(missing_ok=True)  # never checked, so never kept
    for item in fetched:
        plain_file = plain.get(item.download.dest)
        path = (
            plain_file.path if plain_file else item.download.dest.relative_to(directory).as_posix()
        )
        if plain_file is None:  # an LFS file, checked by its sha256 as it was fetched
            result.files.append(MirroredFile(path, item.sha256, item.size, item.download.url, True))
        if item.reused:
            result.reused.append(path)
        elif item.resumed:
            result.resumed.append(path)
    if pointers:
        result.extend(_fetch_pointers(fetcher, pointers, directory, what))
    return result


def _plain(file: HubFile, dest: Path, url: str) -> MirroredFile:
    return MirroredFile(file.path, sha256_file(dest), dest.stat().st_size, url, False)


def _promote_plain(
    fetched: list[Fetched], plain: Mapping[Path, HubFile], directory: Path, result: _Fetch
) -> list[tuple[str, str, LfsPointer]]:
    """Check each plain file against its blob id and move it into place; a pointer among
    them is handed back to be fetched as the object it names."""
    failures: dict[str, Exception] = {}
    pointers = []
    for item in fetched:
        file = plain.get(item.download.dest)
        if file is None:
            continue
        staged, url = item.download.dest, item.download.url
        actual = git_blob_id_file(staged)
        if actual != file.blob_id:
            failures[url] = BlobIdMismatch(url, file.path, str(file.blob_id), actual)
            continue
        if (pointer := read_pointer(staged)) is not None:
            pointers.append((file.path, url, pointer))
            continue
        os.replace(staged, directory / file.path)
        result.files.append(MirroredFile(file.path, item.sha256, item.size, url, False))
    if failures:
        raise DownloadsFailed(failures)
    return pointers


def _check_expected(fetched: _Fetch, directory: Path, path: str, sha256: str) -> None:
    for file in fetched.files:
        if file.path == path and file.sha256 != sha256:
            (directory / path).unlink()
            raise ChecksumMismatch(file.source, sha256, file.sha256)


class BlobIdMismatch(MirrorError):
    """A plain file whose content is not the blob the hub's listing names."""

    def __init__(self, url: str, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{url}: {path} has git blob id {actual}, but the listing says {expected}; "
            f"the file was rejected"
        )
        self.url = url
        self.path = path
        self.expected = expected
        self.actual = actual


def _fetch_pointers(
    fetcher: Fetcher, pointers: list[tuple[str, str, LfsPointer]], directory: Path, what: str
) -> _Fetch:
    """The objects git-lfs pointers name, from `resolve/`, checked by the pointer's
    sha256 and size; the pointer itself is never stored."""
    downloads = [Download(url, directory / path, p.sha256, p.size) for path, url, p in pointers]
    try:
        fetched = fetcher.download_all(downloads, f"{what} (LFS pointers)")
    except DownloadsFailed as error:
        names = ", ".join(path for path, _, _ in pointers)
        raise MirrorError(
            f"{names}: git-lfs pointer(s), whose objects could not be fetched; nothing was "
            f"stored for them\n{error}"
        ) from None
    result = _Fetch()
    for item in fetched:
        path = item.download.dest.relative_to(directory).as_posix()
        result.files.append(MirroredFile(path, item.sha256, item.size, item.download.url, True))
        if item.resumed:
            result.resumed.append(path)
        elif item.reused:
            result.reused.append(path)
    return result


def _card(directory: Path, fetched: _Fetch) -> str | None:
    if any(f.path == CARD for f in fetched.files):
        return (directory / CARD).read_text(errors="replace")
    return None


# From a local file or directory


def _mirror_local(
    source: str,
    ref: LocalSource,
    out: Path,
    fetcher: Fetcher,
    endpoint: str | None,
    allow: Sequence[str] | None,
    sha256: str | None,
    name: str | None,
    origin: str | None,
) -> MirroredModel:
    root = ref.path
    if not root.exists():
        raise MirrorError(f"{source}: {root} does not exist")
    single = root.is_file()
    if sha256 is not None and not single:
        raise MirrorError(f"{source}: a sha256 pins one file, and {root} is a directory")
    label = name or (root.stem if single else root.name)
    if not LOCAL_NAME.fullmatch(label):
        raise MirrorError(f"{source}: {label!r} is not a model name ({LOCAL_NAME.pattern})")
    found = {root.name: root} if single else _local_files(root, allow)
    pointers = {rel: p for rel, path in found.items() if (p := read_pointer(path)) is not None}
    hub = _local_origin(origin, root, single)
    if pointers and (endpoint is None or hub is None):
        raise MirrorError(_pointer_refusal(source, pointers, endpoint))
    directory = out / "local" / label
    fetched = _Fetch()
    for rel, path in found.items():
        if rel not in pointers:
            digest, size = _copy_in(path, directory / rel, sha256 if single else None)
            fetched.files.append(MirroredFile(rel, digest, size, path.as_uri(), False))
    if pointers and endpoint is not None and hub is not None:
        if sha256 is not None and pointers[root.name].sha256 != sha256:
            raise ChecksumMismatch(str(root), sha256, pointers[root.name].sha256)
        wanted = [(rel, resolve_url(endpoint, *hub, rel), p) for rel, p in pointers.items()]
        fetched.extend(_fetch_pointers(fetcher, wanted, directory, f"model {label}"))
    paths = [f.path for f in fetched.files]
    licence = determine_licence(_card(directory, fetched), None, paths, label)
    identity = {
        "repo": hub[0] if hub else None,
        "commit": hub[1] if hub else None,
        "path": str(root),
        "endpoint": endpoint if pointers else None,
    }
    version = _content_version(fetched.files)
    return _finish(out, directory, identity, label, version, None, licence, fetched)


def _local_files(root: Path, allow: Sequence[str] | None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in LOCAL_SKIP]
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_file() and selected(rel, allow, None):
                found[rel] = path
    if not found:
        raise MirrorError(f"{root}: no files to mirror")
    if MANIFEST in found:
        raise MirrorError(f"{root}: a file named {MANIFEST} would be overwritten; filter it out")
    return found


def _local_origin(origin: str | None, root: Path, single: bool) -> tuple[str, str] | None:
    if origin is None:  # a clone made without git-lfs says in its .git where it came from
        return None if single else git_origin(root)
    repo, _, revision = origin.partition("@")
    commit = pinned_commit(revision)
    if not REPO.fullmatch(repo) or commit is None:
        raise MirrorError(f"origin {origin!r}: expected <org>/<repo>@<40-character commit>")
    return repo, commit


def _pointer_refusal(source: str, pointers: Collection[str], endpoint: str | None) -> str:
    names = ", ".join(sorted(pointers))
    what = "is a git-lfs pointer" if len(pointers) == 1 else "are git-lfs pointers"
    if endpoint is None:
        fix = "give a hub endpoint to fetch the files they name, or run `git lfs pull` there"
    else:
        fix = "the hub repository is unknown: give origin <org>/<repo>@<commit>"
    return f"{source}: {names} {what}, not the model's file(s) (cloned without git-lfs?); {fix}"


def _copy_in(source: Path, dest: Path, expected: str | None) -> tuple[str, int]:
    """Copied under `.part`, hashed on the way, and renamed into place once it matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with source.open("rb") as reader, part.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        part.unlink()
        raise ChecksumMismatch(str(source), expected, actual)
    os.replace(part, dest)
    return actual, dest.stat().st_size


def _content_version(files: Iterable[MirroredFile]) -> str:
    """A local model has no commit: its version is a digest of its files and their digests."""
    listing = "".join(f"{f.path}\0{f.sha256}\n" for f in sorted(files, key=lambda f: f.path))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


# The manifest and the artifacts


def _finish(
    out: Path,
    directory: Path,
    identity: dict[str, Any],
    name: str,
    version: str,
    purl: str | None,
    licence: Licence,
    fetched: _Fetch,
) -> MirroredModel:
    files = tuple(sorted(fetched.files, key=lambda f: f.path))
    card = CARD if any(f.path == CARD for f in files) else None
    header = {"format": FORMAT, "name": name, **identity, "version": version, "purl": purl}
    write_manifest(directory, {**header, "licence": asdict(licence), "card": card}, files)
    artifacts = tuple(
        Artifact(
            kind="model",
            name=name,
            version=version,
            path=(directory / f.path).relative_to(out).as_posix(),
            sha256=f.sha256,
            size=f.size,
            source=f.source,
            licence=licence.spdx,
            purl=purl,
        )
        for f in files
    )
    return MirroredModel(
        name=name,
        directory=directory,
        version=version,
        licence=licence,
        files=files,
        artifacts=artifacts,
        warnings=tuple(licence_warnings(name, licence)),
        resumed=tuple(sorted(fetched.resumed)),
        reused=tuple(sorted(fetched.reused)),
    )


def write_manifest(
    directory: Path, header: Mapping[str, Any], files: Iterable[MirroredFile]
) -> None:
    """`model.json`, written whole or not at all. Two profile models may take different
    files of one repository at one commit into one directory, so the files an earlier run
    recorded for the same repository, commit and path are kept while they are still there."""
    path = directory / MANIFEST
    entries = {f["path"]: f for f in _earlier_files(path, header)}
    entries.update({f.path: asdict(f) for f in files})
    data = {**header, "files": [entries[key] for key in sorted(entries)]}
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)


def _earlier_files(path: Path, header: Mapping[str, Any]) -> list[dict[str, Any]]:
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict) or any(
        earlier.get(key) != header.get(key) for key in ("repo", "commit", "path")
    ):
        return []
    return [
        entry
        for entry in earlier.get("files", [])
        if isinstance(entry, dict)
        and isinstance(entry.get("path"), str)
        and (path.parent / entry["path"]).is_file()
        and (path.parent / entry["path"]).stat().st_size == entry.get("size")
    ]
