"""The Debian mirror: signed suites, their Packages indexes, and the .debs a package list needs.

Each step is checked by the one before it, as apt does: the keyring checks the suite's
InRelease (or Release + Release.gpg) with `gpgv`; the verified Release's SHA256 list checks
each Packages index; each index's SHA256 field checks each .deb. Nothing is parsed before
it has been checked, and only the text gpgv says was signed is read from an InRelease.

Packages are resolved the way apt resolves them, so the mirror holds what an install from
it will ask for:
- each name has one candidate per architecture, its highest version across all suites
  (bookworm, bookworm-updates and bookworm-security together); a versioned dependency the
  candidate does not meet is an error, as it is for apt, not a reason to take an older one;
- Depends and Pre-Depends are followed; Recommends and Suggests are not, since the image
  build (mmdebstrap, like debootstrap) does not install them;
- of alternatives `a | b`, one already chosen wins, else the first that can be met;
- a virtual name is met by a candidate whose Provides names it (a versioned dependency
  only by a versioned Provides that meets it); a real package is preferred;
- Breaks and Conflicts are not checked: apt checks them on the node, and a mirror holding
  both sides of a conflict does no harm.

Packages that are Essential or of Priority required are not depended on by others, since
every system has them. Pass `include_priority_required` to mirror them (with their closure)
for a bootstrap from scratch, as mmdebstrap's minbase variant makes; it installs apt too, so
list apt among the packages.

Layout of `out`: `pool/...` as the repository's Filename fields say, `dists/<suite>/` with
the verified InRelease (or Release and Release.gpg) and the Packages indexes used, so an
import can serve it as a repository again, and `packages.json` listing what was mirrored.
Licences are left as None: Debian records them in each package's copyright file, free text
or DEP-5 with Debian's own short names, which do not map to SPDX reliably.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath

import requests
from debian import deb822
from debian.debian_support import version_compare
from packageurl import PackageURL

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import ChecksumMismatch, Download, Fetcher, MirrorError

GPGV_TIMEOUT_S = 60
# Tried in this order: the smallest download first.
INDEX_SUFFIXES = (".xz", ".gz", "")
PACKAGE_FIELDS = [
    "Package",
    "Version",
    "Architecture",
    "Filename",
    "Size",
    "SHA256",
    "Source",
    "Priority",
    "Essential",
    "Depends",
    "Pre-Depends",
    "Provides",
]
PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}
MISSING = (404, 410)


@dataclass(frozen=True)
class Source:
    """One suite of one archive, as an apt sources line names it."""

    url: str  # the archive's root, e.g. http://deb.debian.org/debian
    suite: str
    components: tuple[str, ...] = ("main",)

    @property
    def dists(self) -> str:
        return f"{self.url.rstrip('/')}/dists/{self.suite}"


def parse_source(line: str) -> Source:
    """A one-line apt source, `deb URL SUITE COMPONENT...`, as the image recipe lists them."""
    words = line.split()
    if len(words) < 4 or words[0] != "deb" or words[1].startswith("["):
        raise MirrorError(f"{line!r}: expected 'deb URL SUITE COMPONENT...' without options")
    return Source(words[1], words[2], tuple(words[3:]))


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    filename: str
    sha256: str
    size: int
    source_package: str
    priority: str
    essential: bool
    depends: str  # Pre-Depends and Depends, parsed only if the package is chosen
    provides: tuple[tuple[str, str | None], ...]  # (virtual name, provided version)
    origin: Source

    @property
    def url(self) -> str:
        return f"{self.origin.url.rstrip('/')}/{self.filename}"

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.arch}, {self.origin.suite})"


@dataclass
class Suite:
    """A verified suite: the signed Release files and indexes it was read from, and its
    packages."""

    source: Source
    files: dict[str, bytes] = field(default_factory=dict)  # path under dists/<suite>/
    packages: list[Package] = field(default_factory=list)


def mirror_debian(
    url: str,
    suites: Sequence[str],
    components: Sequence[str],
    architectures: Sequence[str],
    packages: Sequence[str],
    keyring: Path,
    out: Path,
    fetcher: Fetcher,
    *,
    include_priority_required: bool = False,
    now: datetime | None = None,
) -> list[Artifact]:
    """Mirror `packages` and their dependencies from `suites` of the archive at `url`."""
    sources = [Source(url, suite, tuple(components)) for suite in suites]
    return mirror_sources(
        sources,
        architectures,
        packages,
        keyring,
        out,
        fetcher,
        include_priority_required=include_priority_required,
        now=now,
    )


def mirror_sources(
    sources: Sequence[Source],
    architectures: Sequence[str],
    packages: Sequence[str],
    keyring: Path,
    out: Path,
    fetcher: Fetcher,
    *,
    include_priority_required: bool = False,
    now: datetime | None = None,
) -> list[Artifact]:
    """Mirror from several archives at once (Debian's security suite has its own root).

    `keyring` is a binary OpenPGP keyring such as debian-archive-keyring.gpg; gpgv before
    2.3 cannot read an armored one.
    """
    names = [source.suite for source in sources]
    if len(set(names)) != len(names):
        raise MirrorError(f"suites {names}: each suite may be named once, as it has one dists/")
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    suites = [load_suite(s, architectures, keyring, fetcher, moment) for s in sources]
    chosen = resolve(
        [package for suite in suites for package in suite.packages],
        packages,
        architectures,
        include_priority_required=include_priority_required,
    )
    fetcher.download_all(_downloads(chosen, out), "debian")
    for suite in suites:
        for name, data in suite.files.items():
            _write_atomic(out / "dists" / suite.source.suite / name, data)
    _write_atomic(out / "packages.json", _listing(suites, architectures, chosen))
    return [_artifact(package) for package in chosen]


# -- the signed suite and its indexes -------------------------------------------------------


def load_suite(
    source: Source,
    architectures: Sequence[str],
    keyring: Path,
    fetcher: Fetcher,
    now: datetime,
) -> Suite:
    suite = Suite(source)
    release = _verified_release(suite, keyring, fetcher)
    _check_release(source, release, architectures, now)
    for component, arch in wanted_indexes(release, source.components, architectures):
        name, data = _fetch_index(suite, release, component, arch, fetcher)
        suite.files[name] = data
        suite.packages.extend(_parse_index(source, name, data))
    return suite


def _verified_release(suite: Suite, keyring: Path, fetcher: Fetcher) -> deb822.Release:
    """The Release text gpgv vouches for, from InRelease or else Release + Release.gpg."""
    base = suite.source.dists
    inline = _get_optional(fetcher, f"{base}/InRelease")
    if inline is not None:
        signed = _gpgv(suite.source, f"{base}/InRelease", keyring, inline, None)
        suite.files["InRelease"] = inline
        return deb822.Release(signed)
    release = _get_optional(fetcher, f"{base}/Release")
    if release is None:
        raise MirrorError(f"{suite.source.suite}: neither {base}/InRelease nor Release exists")
    signature = _get_optional(fetcher, f"{base}/Release.gpg")
    if signature is None:
        raise MirrorError(
            f"{suite.source.suite}: {base}/Release is not signed (no InRelease, no Release.gpg)"
        )
    _gpgv(suite.source, f"{base}/Release", keyring, signature, release)
    suite.files["Release"] = release
    suite.files["Release.gpg"] = signature
    return deb822.Release(release)


def _gpgv(
    source: Source, url: str, keyring: Path, signed: bytes, detached_data: bytes | None
) -> bytes:
    """Check a signature against `keyring` alone; gives the signed text.

    The exit status is not enough: judged by gpgv's status lines as apt does, a good
    signature (GOODSIG and VALIDSIG) must be there and no bad one (BADSIG). A second
    signature by a key outside the keyring is allowed, as Debian signs with several keys.
    """
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise MirrorError(f"{source.suite}: gpgv is not installed; cannot check {url}")
    if not keyring.is_file():
        raise MirrorError(f"{source.suite}: keyring {keyring} does not exist")
    with tempfile.TemporaryDirectory(prefix="sovereign-gpgv-") as tmp:
        work = Path(tmp)
        (work / "signed").write_bytes(signed)
        # An empty home: no default trustedkeys.kbx from the user's ~/.gnupg joins in.
        home = work / "home"
        home.mkdir(mode=0o700)
        argv = [gpgv, "--homedir", str(home), "--keyring", str(keyring.resolve())]
        argv += ["--status-fd", "1", "--output", str(work / "payload"), str(work / "signed")]
        if detached_data is not None:
            (work / "data").write_bytes(detached_data)
            argv.append(str(work / "data"))
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=GPGV_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise MirrorError(
                f"{source.suite}: gpgv ran past {GPGV_TIMEOUT_S} s on {url}"
            ) from None
        problem = _signature_problem(result.stdout)
        if problem is not None:
            detail = result.stderr.strip().replace("\n", "; ")
            raise MirrorError(
                f"{source.suite}: the signature on {url} was refused: {problem} "
                f"(keyring {keyring}; gpgv: {detail})"
            )
        if detached_data is not None:
            return detached_data
        return (work / "payload").read_bytes()


def _signature_problem(status: str) -> str | None:
    """What is wrong with a signature, by gpgv's `[GNUPG:]` lines; None if it is good."""
    seen: dict[str, list[str]] = {}
    for line in status.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "[GNUPG:]":
            seen.setdefault(words[1], []).append(" ".join(words[2:3]))
    if "BADSIG" in seen:
        return "bad signature: the text was changed after it was signed"
    if "GOODSIG" in seen and "VALIDSIG" in seen:
        return None
    for keyword, why in (
        ("EXPKEYSIG", "signed by an expired key"),
        ("REVKEYSIG", "signed by a revoked key"),
        ("EXPSIG", "the signature has expired"),
        ("NO_PUBKEY", "signed by key {} which is not in the keyring"),
    ):
        if keyword in seen:
            return why.format(", ".join(seen[keyword]))
    if "NODATA" in seen or "NEWSIG" not in seen:
        return "no signature found"
    return "no good signature"


def _check_release(
    source: Source, release: deb822.Release, architectures: Sequence[str], now: datetime
) -> None:
    where = f"{source.suite}: the Release at {source.dists}"
    # A validly signed Release of another suite served here would swap one suite for another.
    names = {release.get("Suite"), release.get("Codename")}
    if source.suite not in names:
        found = ", ".join(sorted(str(name) for name in names if name))
        raise MirrorError(f"{where} is for {found or 'no suite'}, not {source.suite}")
    valid_until = release.get("Valid-Until")
    if valid_until:
        expiry = _release_date(where, valid_until)
        if expiry < now:
            raise MirrorError(
                f"{where} expired on {valid_until} (Valid-Until); an old signed Release "
                f"may be a replay that hides security updates, so it is refused"
            )
    offered = set(str(release.get("Architectures", "")).split())
    missing = [arch for arch in architectures if arch not in offered]
    if missing:
        raise MirrorError(f"{where} lists architectures {sorted(offered)}, not {missing}")


def _release_date(where: str, text: str) -> datetime:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        raise MirrorError(f"{where}: cannot read the date {text!r}") from None
    # Debian's dates say UTC; a date without a zone is read as UTC too.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def wanted_indexes(
    release: deb822.Release, components: Sequence[str], architectures: Sequence[str]
) -> list[tuple[str, str]]:
    """The (component, architecture) Packages indexes to read.

    binary-all is read when the Release lists it, unless the Release says arch:all
    packages are in every binary-<arch> index too (`No-Support-for-Architecture-all:
    Packages`, as Debian's does), which spares a download of the same entries.
    """
    listed = _listing_of(release)
    all_inline = release.get("No-Support-for-Architecture-all") == "Packages"
    wanted: list[tuple[str, str]] = []
    for component in components:
        for arch in [*architectures, "all"]:
            present = any(
                f"{component}/binary-{arch}/Packages{s}" in listed for s in INDEX_SUFFIXES
            )
            if arch == "all":
                if present and not all_inline:
                    wanted.append((component, arch))
            elif present:
                wanted.append((component, arch))
            else:
                raise MirrorError(
                    f"{release.get('Codename') or release.get('Suite')}: the Release lists "
                    f"no Packages index for {component}/binary-{arch}"
                )
    return wanted


def _listing_of(release: deb822.Release) -> dict[str, str]:
    """The Release's SHA256 section: path under dists/<suite>/ -> sha256."""
    return {entry["name"]: entry["sha256"] for entry in release.get("SHA256", [])}


def _fetch_index(
    suite: Suite, release: deb822.Release, component: str, arch: str, fetcher: Fetcher
) -> tuple[str, bytes]:
    """The first Packages variant the Release lists and the server has, checked."""
    listed = _listing_of(release)
    tried: list[str] = []
    for suffix in INDEX_SUFFIXES:
        name = f"{component}/binary-{arch}/Packages{suffix}"
        if name not in listed:
            continue
        url = f"{suite.source.dists}/{name}"
        data = _get_optional(fetcher, url)
        if data is None:
            tried.append(url)
            continue  # Debian lists the uncompressed index but does not serve it
        expected = listed[name]
        actual = _sha256(data)
        if actual != expected:
            raise ChecksumMismatch(url, expected, actual)
        return name, data
    raise MirrorError(f"{suite.source.suite}: no listed Packages index exists: {tried}")


def _get_optional(fetcher: Fetcher, url: str) -> bytes | None:
    """A small file, or None where the server has none (apt's fallbacks need to know)."""
    try:
        response = fetcher.http.get(url, timeout=fetcher.timeout)
    except requests.RequestException as error:
        raise MirrorError(f"{url}: {error}") from None
    if response.status_code in MISSING:
        return None
    if not response.ok:
        raise MirrorError(f"{url}: HTTP {response.status_code} {response.reason}")
    return response.content


def _parse_index(source: Source, name: str, data: bytes) -> Iterator[Package]:
    url = f"{source.dists}/{name}"
    try:
        if name.endswith(".xz"):
            data = lzma.decompress(data)
        elif name.endswith(".gz"):
            data = gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as error:
        raise MirrorError(f"{url}: cannot decompress: {error}") from None
    paragraphs = deb822.Packages.iter_paragraphs(data, fields=PACKAGE_FIELDS, use_apt_pkg=False)
    for paragraph in paragraphs:
        try:
            yield _package(source, paragraph)
        except (KeyError, ValueError) as error:
            what = paragraph.get("Package", "an entry")
            raise MirrorError(f"{url}: {what} is malformed: {error}") from None


def _package(source: Source, paragraph: deb822.Packages) -> Package:
    filename = paragraph["Filename"]
    path = PurePosixPath(filename)
    # The index is checked, but a path that climbs out of the mirror is never written.
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"unsafe Filename {filename!r}")
    depends = ", ".join(
        text for text in (paragraph.get("Pre-Depends"), paragraph.get("Depends")) if text
    )
    return Package(
        name=paragraph["Package"],
        version=paragraph["Version"],
        arch=paragraph["Architecture"],
        filename=filename,
        sha256=paragraph["SHA256"].lower(),
        size=int(paragraph["Size"]),
        source_package=(paragraph.get("Source") or paragraph["Package"]).split()[0],
        priority=paragraph.get("Priority", "optional"),
        essential=paragraph.get("Essential") == "yes",
        depends=depends,
        provides=tuple(_provides(paragraph.get("Provides", ""))),
        origin=source,
    )


def _provides(text: str) -> Iterator[tuple[str, str | None]]:
    for group in _relations(text):
        for entry in group:
            constraint = entry.get("version")
            yield entry["name"], constraint[1] if constraint else None


# -- resolution --------------------------------------------------------------------------------


class Candidates:
    """apt's view of one architecture: the highest version of each name, and who provides
    each virtual name among those."""

    def __init__(self, arch: str, packages: Iterable[Package]) -> None:
        self.arch = arch
        self.best: dict[str, Package] = {}
        for package in packages:
            if package.arch not in (arch, "all"):
                continue
            held = self.best.get(package.name)
            # Ties keep the first suite given, so the result does not depend on the server.
            if held is None or version_compare(package.version, held.version) > 0:
                self.best[package.name] = package
        self.providers: dict[str, list[tuple[Package, str | None]]] = {}
        for package in self.best.values():
            for virtual, version in package.provides:
                self.providers.setdefault(virtual, []).append((package, version))

    def meet(self, relation: Relation, chosen: set[Package]) -> Package | None:
        """The candidate that meets `relation`: the real package, else a provider (one
        already chosen, else the most important, then by name)."""
        real = self.best.get(relation.name)
        if real is not None and relation.allows(real.version):
            return real
        providers = [
            package
            for package, version in self.providers.get(relation.name, [])
            if relation.op is None or (version is not None and relation.allows(version))
        ]
        if not providers:
            return None
        return min(
            providers,
            key=lambda p: (p not in chosen, PRIORITY_RANK.get(p.priority, 5), p.name),
        )

    def why_not(self, relation: Relation) -> str:
        real = self.best.get(relation.name)
        if real is not None:
            return f"{relation.name} {real.version} is the candidate"
        if relation.name in self.providers:
            versions = [
                f"{p.name} provides {v or 'it unversioned'}"
                for p, v in self.providers[relation.name]
            ]
            return "; ".join(versions)
        return f"no package {relation.name} for {self.arch}"


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None
    version: str | None
    archqual: str | None

    @classmethod
    def parse(cls, entry: deb822.PkgRelation.ParsedRelation) -> Relation:
        constraint = entry.get("version")
        op, version = constraint if constraint else (None, None)
        return cls(entry["name"], op, version, entry.get("archqual"))

    def allows(self, version: str) -> bool:
        if self.op is None or self.version is None:
            return True
        order = version_compare(version, self.version)
        return {
            "<<": order < 0,
            "<=": order <= 0,
            "<": order <= 0,  # the obsolete spelling of <=
            "=": order == 0,
            ">=": order >= 0,
            ">": order >= 0,  # the obsolete spelling of >=
            ">>": order > 0,
        }[self.op]

    def __str__(self) -> str:
        qualifier = f":{self.archqual}" if self.archqual else ""
        version = f" ({self.op} {self.version})" if self.op else ""
        return f"{self.name}{qualifier}{version}"


def resolve(
    packages: Sequence[Package],
    wanted: Sequence[str],
    architectures: Sequence[str],
    *,
    include_priority_required: bool = False,
) -> list[Package]:
    """`wanted` and the Depends/Pre-Depends closure for each architecture, sorted.

    Every problem is collected first, so one run names every missing package.
    """
    tables = {arch: Candidates(arch, packages) for arch in architectures}
    chosen: dict[str, set[Package]] = {arch: set() for arch in architectures}
    queue: deque[tuple[str, Package]] = deque()
    problems: list[str] = []

    def choose(arch: str, package: Package) -> None:
        if package not in chosen[arch]:
            chosen[arch].add(package)
            queue.append((arch, package))

    for arch, table in tables.items():
        for name in wanted:
            found = _requested(table, name, problems)
            if found is not None:
                choose(arch, found)
        if include_priority_required:
            for package in table.best.values():
                if package.essential or package.priority == "required":
                    choose(arch, package)
    while queue:
        arch, package = queue.popleft()
        for group in _relations(package.depends):
            met = _satisfy(tables, arch, package, group, chosen, problems)
            if met is not None:
                choose(*met)
    if problems:
        raise MirrorError("cannot resolve the Debian packages:\n  " + "\n  ".join(problems))
    unique = {package for held in chosen.values() for package in held}
    return sorted(unique, key=lambda p: (p.name, p.arch, p.version))


def _relations(text: str) -> list[list[deb822.PkgRelation.ParsedRelation]]:
    # python-debian reads "" as one relation on a package named "".
    return deb822.PkgRelation.parse_relations(text) if text.strip() else []


def _requested(table: Candidates, name: str, problems: list[str]) -> Package | None:
    """A name asked for: its candidate, or the one package providing it. As with
    `apt install`, a virtual name with several providers must be made specific."""
    real = table.best.get(name)
    if real is not None:
        return real
    providers = sorted({package.name for package, _ in table.providers.get(name, [])})
    if len(providers) == 1:
        return table.best[providers[0]]
    if providers:
        problems.append(f"{name} (requested) is virtual, provided by {', '.join(providers)}")
    else:
        problems.append(f"{name} (requested): no such package for {table.arch}")
    return None


def _satisfy(
    tables: dict[str, Candidates],
    arch: str,
    needer: Package,
    group: list[deb822.PkgRelation.ParsedRelation],
    chosen: dict[str, set[Package]],
    problems: list[str],
) -> tuple[str, Package] | None:
    relations = [Relation.parse(entry) for entry in group]
    options: list[tuple[str, Package]] = []
    reasons: list[str] = []
    for relation in relations:
        # :any and :native are met within this architecture (a single-architecture node);
        # an explicit foreign architecture is met only if it is mirrored too.
        target = arch if relation.archqual in (None, "any", "native") else relation.archqual
        table = tables.get(str(target))
        if table is None:
            reasons.append(f"{relation}: architecture {target} is not mirrored")
            continue
        found = table.meet(relation, chosen[table.arch])
        if found is None:
            reasons.append(f"{relation}: {table.why_not(relation)}")
            continue
        if found in chosen[table.arch]:
            return None  # already met by something chosen
        options.append((table.arch, found))
    if options:
        return options[0]
    wanted = " | ".join(str(relation) for relation in relations)
    problems.append(f"{wanted}, needed by {needer}: {'; '.join(reasons)}")
    return None


# -- output ------------------------------------------------------------------------------------


def _downloads(chosen: Sequence[Package], out: Path) -> list[Download]:
    # An arch:all package chosen for two architectures is one file; `download_all` fetches
    # it once, and refuses two archives (debian, debian-security) that put different files
    # at one pool path.
    return [
        Download(url=p.url, dest=out / p.filename, sha256=p.sha256, size=p.size) for p in chosen
    ]


def _listing(
    suites: Sequence[Suite], architectures: Sequence[str], chosen: Sequence[Package]
) -> bytes:
    document = {
        "architectures": list(architectures),
        "suites": [
            {
                "url": suite.source.url,
                "suite": suite.source.suite,
                "components": list(suite.source.components),
                "files": sorted(f"dists/{suite.source.suite}/{name}" for name in suite.files),
            }
            for suite in suites
        ],
        "packages": [
            {
                "name": package.name,
                "version": package.version,
                "arch": package.arch,
                "filename": package.filename,
                "sha256": package.sha256,
                "size": package.size,
                "source": package.source_package,
                "suite": package.origin.suite,
                "url": package.url,
            }
            for package in chosen
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def _artifact(package: Package) -> Artifact:
    purl = PackageURL(
        type="deb",
        namespace="debian",
        name=package.name,
        version=package.version,
        qualifiers={"arch": package.arch, "distro": package.origin.suite},
    )
    return Artifact(
        kind="deb",
        name=package.name,
        version=package.version,
        path=package.filename,
        sha256=package.sha256,
        size=package.size,
        source=package.url,
        licence=None,
        purl=purl.to_string(),
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
