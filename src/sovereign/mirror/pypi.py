"""The PyPI mirror: the wheels a hashed requirements file pins, for each target platform.

Reads a requirements file in the form `uv export` and `pip-compile --generate-hashes`
write (every requirement pinned with `==` and carrying `--hash`), asks the index for each
project through the PEP 691 JSON API, or the PEP 503 HTML one where the index has no JSON,
and fetches, for every target (Python version and platform), the most specific compatible
wheel whose sha256 the requirements file allows. The result is a flat directory of wheels
and `wheels.json`, which the bundle turns into a PEP 503 tree on the air-gapped side.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urldefrag, urljoin

from packaging import tags
from packaging.markers import Marker
from packaging.metadata import Metadata
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import Download, Fetcher, MirrorError, json_of
from sovereign.tools import sha256_file

PEP691_JSON = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{PEP691_JSON}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
MANIFEST = "wheels.json"
# manylinux_2_X tags and the legacy names pip still accepts for them.
LEGACY_MANYLINUX = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: Version
    hashes: frozenset[str]
    marker: Marker | None
    where: str  # file:line, for messages


@dataclass(frozen=True)
class Target:
    """One Python version on one platform, as pip's `--python-version` and `--platform`."""

    python: tuple[int, int]
    platform: str

    @classmethod
    def parse(cls, python: str, platform: str) -> Target:
        match = re.fullmatch(r"3\.(\d+)", python)
        if not match:
            raise MirrorError(f"python version {python!r}: expected 3.N, such as 3.11")
        if not re.fullmatch(r"[a-z0-9_]+", platform):
            raise MirrorError(f"platform {platform!r}: expected a wheel platform tag")
        legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
        if legacy:
            glibc = {v: k for k, v in LEGACY_MANYLINUX.items()}[legacy.group(1)]
            raise MirrorError(
                f"platform {platform!r}: give the glibc it means, "
                f"manylinux_{glibc[0]}_{glibc[1]}_{legacy.group(2)}"
            )
        return cls((3, int(match.group(1))), platform)

    def __str__(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}-{self.platform}"

    def tags(self) -> list[tags.Tag]:
        """Compatible wheel tags, most specific first, as pip orders them."""
        interpreter = f"cp{self.python[0]}{self.python[1]}"
        platforms = list(_expand_platform(self.platform))
        return [
            *tags.cpython_tags(self.python, [interpreter], platforms),
            *tags.compatible_tags(self.python, interpreter, platforms),
        ]

    def environment(self) -> dict[str, str]:
        machine = re.sub(
            r"^(manylinux|musllinux)_\d+_\d+_|^linux_|^macosx_\d+_\d+_", "", self.platform
        )
        system = (
            "Darwin"
            if self.platform.startswith("macosx")
            else ("Windows" if self.platform.startswith("win") else "Linux")
        )
        return {
            "python_version": f"{self.python[0]}.{self.python[1]}",
            "python_full_version": f"{self.python[0]}.{self.python[1]}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "platform_machine": machine,
            "platform_system": system,
            "sys_platform": {"Darwin": "darwin", "Windows": "win32"}.get(system, "linux"),
            "os_name": "nt" if system == "Windows" else "posix",
        }


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None
    requires_python: str | None


def _allows(requires_python: str, python: Version) -> bool:
    """pip skips a file whose Requires-Python it cannot read; so does the mirror."""
    try:
        return python in SpecifierSet(requires_python)
    except InvalidSpecifier:
        return False


def _expand_platform(platform: str) -> Iterator[str]:
    """manylinux_2_36_x86_64 also takes every older manylinux wheel, as pip on such a
    system does (pip's own --platform takes only the tag given)."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        yield platform
        return
    glibc, arch = int(match.group(1)), match.group(2)
    for minor in range(glibc, 4, -1):
        yield f"manylinux_2_{minor}_{arch}"
        if (2, minor) in LEGACY_MANYLINUX:
            yield f"{LEGACY_MANYLINUX[(2, minor)]}_{arch}"


def read_requirements(path: Path) -> list[Pin]:
    """Pinned, hashed requirements; anything else is refused with its file and line."""
    try:
        text = path.read_text()
    except OSError as error:
        raise MirrorError(f"{path}: {error.strerror}") from None
    pins: list[Pin] = []
    for line_number, line in _logical_lines(text):
        where = f"{path}:{line_number}"
        # pip's own rule: a comment starts at a # at the line's start or after a space.
        words = re.sub(r"(^|\s)#.*$", "", line).split()
        if not words:
            continue
        if words[0].startswith("-"):
            if words[0] in {"--index-url", "-i", "--extra-index-url"}:
                continue  # the mirror's index is given to it, not taken from the file
            raise MirrorError(f"{where}: option {words[0]} is not supported in a mirrored lock")
        hashes, spec = _split_hashes(words, where)
        try:
            requirement = Requirement(" ".join(spec))
        except InvalidRequirement as error:
            raise MirrorError(f"{where}: {error}") from None
        pins.append(_pin(requirement, hashes, where))
    if not pins:
        raise MirrorError(f"{path}: no requirements")
    return pins


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines joined across trailing backslashes, each with the number of its first line."""
    buffer: list[str] = []
    first = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not buffer:
            first = number
        if raw.rstrip().endswith("\\"):
            buffer.append(raw.rstrip()[:-1])
            continue
        buffer.append(raw)
        yield first, " ".join(buffer)
        buffer = []
    if buffer:
        yield first, " ".join(buffer)


def _split_hashes(words: list[str], where: str) -> tuple[set[str], list[str]]:
    hashes: set[str] = set()
    spec: list[str] = []
    for word in words:
        if word.startswith("--hash="):
            algorithm, _, value = word.removeprefix("--hash=").partition(":")
            if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", value):
                raise MirrorError(f"{where}: {word}: expected --hash=sha256:<64 hex digits>")
            hashes.add(value)
        else:
            spec.append(word)
    return hashes, spec


def _pin(requirement: Requirement, hashes: set[str], where: str) -> Pin:
    specifiers = list(requirement.specifier)
    if requirement.url or len(specifiers) != 1 or specifiers[0].operator not in {"==", "==="}:
        raise MirrorError(
            f"{where}: {requirement.name} is not pinned: a mirrored lock pins each "
            f"requirement with == (uv export, pip-compile --generate-hashes)"
        )
    if not hashes:
        raise MirrorError(f"{where}: {requirement.name} has no --hash=sha256:…")
    return Pin(
        canonicalize_name(requirement.name),
        Version(specifiers[0].version),
        frozenset(hashes),
        requirement.marker,
        where,
    )


@dataclass(frozen=True)
class ProjectPage:
    api: Literal["json", "html"]  # PEP 691 or PEP 503, whichever the index answered with
    files: list[IndexFile]


def project_page(fetcher: Fetcher, index: str, name: str) -> ProjectPage:
    url = urljoin(index.rstrip("/") + "/", f"{name}/")
    response = fetcher.get(url, headers={"Accept": ACCEPT})
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type == PEP691_JSON:
        return ProjectPage("json", _json_files(json_of(response), response.url))
    return ProjectPage("html", _html_files(response.text, response.url))


def _json_files(data: Any, base: str) -> list[IndexFile]:
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise MirrorError(f"{base}: not a PEP 691 project page")
    try:
        return [
            IndexFile(
                str(entry["filename"]),
                urljoin(base, str(entry["url"])),
                (entry.get("hashes") or {}).get("sha256"),
                entry.get("requires-python"),
            )
            for entry in data["files"]
        ]
    except (KeyError, TypeError, AttributeError):
        raise MirrorError(f"{base}: a file entry lacks its filename or url") from None


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str | None, str]] = []
        self._attributes: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._attributes = dict(attrs)
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._attributes is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._attributes is not None:
            href = self._attributes.get("href") or ""
            self.found.append(
                (href, self._attributes.get("data-requires-python"), "".join(self._text))
            )
            self._attributes = None


def _html_files(html: str, base: str) -> list[IndexFile]:
    parser = _Anchors()
    parser.feed(html)
    files = []
    for href, requires_python, text in parser.found:
        url, fragment = urldefrag(urljoin(base, href))
        algorithm, _, digest = fragment.partition("=")
        filename = text.strip() or url.rsplit("/", 1)[-1]
        files.append(
            IndexFile(filename, url, digest if algorithm == "sha256" else None, requires_python)
        )
    return files


def choose(pin: Pin, files: Iterable[IndexFile], target: Target) -> IndexFile:
    """The most specific wheel of the pinned version for `target`, among those the lock
    allows; pip would pick the same one."""
    ranked = {tag: rank for rank, tag in enumerate(target.tags())}
    python = Version(f"{target.python[0]}.{target.python[1]}")
    best: tuple[int, IndexFile] | None = None
    seen: list[str] = []
    for file in files:
        try:
            name, version, _, wheel_tags = parse_wheel_filename(file.filename)
        except InvalidWheelFilename:
            continue
        if name != pin.name or version != pin.version:
            continue
        seen.append(file.filename)
        if file.requires_python and not _allows(file.requires_python, python):
            continue
        rank = min((ranked[tag] for tag in wheel_tags if tag in ranked), default=None)
        if rank is None or (file.sha256 is not None and file.sha256 not in pin.hashes):
            continue
        if best is None or rank < best[0]:
            best = (rank, file)
    if best is None:
        listed = ", ".join(seen) or "none"
        raise MirrorError(
            f"{pin.where}: no wheel of {pin.name}=={pin.version} for {target} whose sha256 "
            f"the lock allows (wheels on the index: {listed})"
        )
    return best[1]


# Builds a wheel for a target from a pinned sdist the mirror fetched; gives the wheel.
SdistBuilder = Callable[[Pin, Path, Target], Path]


def mirror_wheels(
    requirements: Path,
    index: str,
    out: Path,
    fetcher: Fetcher,
    targets: list[Target],
    build: SdistBuilder | None = None,
) -> list[Artifact]:
    """The lock's wheels for every target. A project the index publishes only as an sdist
    is refused, or, given `build`, its hash-checked sdist is built into a wheel there."""
    pins = read_requirements(requirements)
    wanted: dict[str, tuple[Pin, IndexFile]] = {}
    sdists: dict[str, tuple[Pin, IndexFile, list[Target]]] = {}
    for pin in pins:
        applicable = [
            t for t in targets if pin.marker is None or pin.marker.evaluate(t.environment())
        ]
        if not applicable:
            continue
        files = project_page(fetcher, index, pin.name).files
        for target in applicable:
            try:
                file = choose(pin, files, target)
            except MirrorError:
                sdist = choose_sdist(pin, files) if build is not None else None
                if sdist is None:
                    raise
                sdists.setdefault(sdist.filename, (pin, sdist, []))[2].append(target)
                continue
            wanted.setdefault(file.filename, (pin, file))
    downloads = [
        Download(file.url, out / file.filename, file.sha256)
        for _, file in (*wanted.values(), *((p, f) for p, f, _ in sdists.values()))
    ]
    fetched = fetcher.download_all(downloads, "wheels")
    artifacts = []
    for result in sorted(fetched, key=lambda r: r.download.dest.name):
        name = result.download.dest.name
        pin, file = wanted[name] if name in wanted else sdists[name][:2]
        if result.sha256 not in pin.hashes:
            result.download.dest.unlink()
            raise MirrorError(
                f"{pin.where}: {file.filename} has sha256 {result.sha256}, which the lock "
                f"does not allow; the file was rejected"
            )
        if name in sdists and build is not None:  # sdists are only kept to be built
            # The sdist stays beside the wheels: a second run finds it and fetches nothing.
            for target in sdists[name][2]:
                artifacts.append(_built(pin, build(pin, result.download.dest, target), out, file))
            continue
        artifacts.append(
            Artifact(
                kind="wheel",
                name=pin.name,
                version=str(pin.version),
                path=file.filename,
                sha256=result.sha256,
                size=result.size,
                source=file.url,
                licence=wheel_licence(result.download.dest),
                purl=f"pkg:pypi/{pin.name}@{pin.version}?file_name={file.filename}",
            )
        )
    _write_manifest(out, artifacts)
    return artifacts


def choose_sdist(pin: Pin, files: Iterable[IndexFile]) -> IndexFile | None:
    """The pinned version's sdist whose sha256 the lock allows, if the index has one."""
    for file in files:
        try:
            name, version = parse_sdist_filename(file.filename)
        except InvalidSdistFilename:
            continue
        if name == pin.name and version == pin.version and file.sha256 in pin.hashes:
            return file
    return None


def _built(pin: Pin, wheel: Path, out: Path, sdist: IndexFile) -> Artifact:
    """A wheel built from the sdist, copied in beside the fetched ones."""
    placed = out / wheel.name
    shutil.copyfile(wheel, placed)
    return built_wheel(placed, f"built from {sdist.url} (sha256 {sdist.sha256})")


def built_wheel(wheel: Path, source: str) -> Artifact:
    """The record of a wheel made here rather than fetched: `source` says from what."""
    name, version, _, _ = parse_wheel_filename(wheel.name)
    return Artifact(
        kind="wheel",
        name=name,
        version=str(version),
        path=wheel.name,
        sha256=sha256_file(wheel),
        size=wheel.stat().st_size,
        source=source,
        licence=wheel_licence(wheel),
        purl=f"pkg:pypi/{name}@{version}?file_name={wheel.name}",
    )


def wheel_licence(wheel: Path) -> str | None:
    """The wheel's own statement: PEP 639's License-Expression, else its licence classifier."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if not names:
            raise MirrorError(f"{wheel.name}: no .dist-info/METADATA; not a wheel")
        metadata = Metadata.from_email(archive.read(names[0]), validate=False)
    if metadata.license_expression:
        return str(metadata.license_expression)
    for classifier in metadata.classifiers or []:
        if classifier.startswith("License :: OSI Approved :: "):
            return CLASSIFIER_SPDX.get(classifier.rsplit(" :: ", 1)[-1])
    return None


# Classifiers that name exactly one licence, as SPDX identifiers ("BSD License" names no
# single one, so it stays unknown).
CLASSIFIER_SPDX = {
    "MIT License": "MIT",
    "Apache Software License": "Apache-2.0",
    "ISC License (ISCL)": "ISC",
    "Python Software Foundation License": "PSF-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
}


def _write_manifest(out: Path, artifacts: list[Artifact]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps([a.to_json() for a in artifacts], indent=2) + "\n")
    temporary.replace(out / MANIFEST)
