"""The Debian mirror against a real reprepro repository served over loopback HTTP.

Takes a repository built and signed here (bookworm and bookworm-updates, amd64); gives the
mirrored closure with every file checked, the refusals of a bad or missing signature, an
expired Release, a tampered index, a changed .deb and unknown or unmet names, and a
download resumed with Range after the server stopped mid-transfer.
"""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from debian import deb822

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.debian import mirror_debian, wanted_indexes
from sovereign.mirror.fetch import (
    ChecksumMismatch,
    Download,
    DownloadsFailed,
    Fetched,
    Fetcher,
    MirrorError,
    sha256_file,
)
from tests.integration.airgap.aptrepo import Deb, Key, build_deb, make_repository, signing_key
from tests.integration.airgap.servers import file_server, need

pytestmark = pytest.mark.slow

BIG = 3 * 1024 * 1024
# Slow enough that the first 1 MiB chunk lands well before the body ends.
RATE = 512 * 1024
BOTH = ("bookworm", "bookworm-updates")

BOOKWORM = [
    Deb("app", "1.0", fields={"Depends": "libfoo (>= 1.2) | libbar, data"}),
    Deb("libfoo", "1.2", fields={"Provides": "foo-api (= 1.2)"}),
    Deb("libbar", "1.0"),
    Deb("data", "1.0", arch="all"),
    Deb(
        "tool",
        "1.0",
        fields={"Pre-Depends": "base-lib (>= 1.0)", "Depends": "foo-api (>= 1.3), helper:any"},
    ),
    Deb("base-lib", "1.0"),
    Deb("helper", "1.0", fields={"Multi-Arch": "allowed"}),
    Deb("req", "1.0", fields={"Priority": "required", "Depends": "base-lib"}),
    Deb("needy", "1.0", fields={"Depends": "libfoo (>= 2.0)"}),
    Deb("big", "1.0", payload=BIG),
]
# Newer libfoo and helper (by epoch), an older data: the highest version wins either way.
UPDATES = [
    Deb("libfoo", "1.3", fields={"Provides": "foo-api (= 1.3)"}),
    Deb("helper", "1:0.5", fields={"Multi-Arch": "allowed"}),
    Deb("data", "0.9", arch="all"),
]
CLOSURE = {
    ("app", "1.0"),
    ("libfoo", "1.3"),
    ("data", "1.0"),
    ("tool", "1.0"),
    ("base-lib", "1.0"),
    ("helper", "1:0.5"),
}


@dataclass(frozen=True)
class Pristine:
    root: Path
    key: Key
    other: Key  # a key the mirror's keyring does not hold


class RecordingFetcher(Fetcher):
    """Keeps every download's result, so a test can see what was resumed or reused."""

    def __init__(self) -> None:
        super().__init__(backoff=0.2)
        self.fetched: list[Fetched] = []

    def download(self, item: Download) -> Fetched:
        result = super().download(item)
        self.fetched.append(result)
        return result


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    need("reprepro", "gpg", "gpgv", "dpkg-deb")
    base = tmp_path_factory.mktemp("aptrepo")
    with (
        signing_key(base / "archive", "Test Archive <archive@sovereign.invalid>") as key,
        signing_key(base / "other", "Someone Else <other@sovereign.invalid>") as other,
    ):
        debs = base / "debs"
        debs.mkdir()
        dists = {
            "bookworm": [build_deb(debs, deb) for deb in BOOKWORM],
            "bookworm-updates": [build_deb(debs, deb) for deb in UPDATES],
        }
        make_repository(base / "repo", key, dists, valid_for={"bookworm": "30d"})
        yield Pristine(base / "repo", key, other)


@pytest.fixture
def repo(pristine: Pristine, tmp_path: Path) -> Path:
    """A copy of the repository that a test may damage before serving it."""
    copy = tmp_path / "served"
    shutil.copytree(pristine.root, copy, ignore=shutil.ignore_patterns("conf", "db"))
    return copy


@pytest.fixture
def fetcher() -> Iterator[RecordingFetcher]:
    recording = RecordingFetcher()
    yield recording
    recording.http.close()


def mirror(
    url: str,
    fetcher: Fetcher,
    out: Path,
    key: Key,
    packages: list[str],
    suites: tuple[str, ...] = BOTH,
    **options: Any,
) -> list[Artifact]:
    return mirror_debian(
        url, list(suites), ["main"], ["amd64"], packages, key.keyring, out, fetcher, **options
    )


def test_mirrors_the_closure_with_every_file_checked(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    out = tmp_path / "mirror"
    with file_server(repo, tmp_path / "server.log") as server:
        artifacts = mirror(server.url, fetcher, out, pristine.key, ["app", "tool"])
        again = mirror(server.url, fetcher, out, pristine.key, ["app", "tool"])

    assert {(a.name, a.version) for a in artifacts} == CLOSURE
    for artifact in artifacts:
        file = out / artifact.path
        assert artifact.path.startswith("pool/main/")
        assert sha256_file(file) == artifact.sha256 == sha256_file(repo / artifact.path)
        assert file.stat().st_size == artifact.size
        assert artifact.source == f"{server.url}/{artifact.path}"
        assert (artifact.kind, artifact.licence) == ("deb", None)
    purls = {a.name: a.purl for a in artifacts}
    assert purls["helper"] == "pkg:deb/debian/helper@1:0.5?arch=amd64&distro=bookworm-updates"
    assert purls["data"] == "pkg:deb/debian/data@1.0?arch=all&distro=bookworm"

    app = next(a for a in artifacts if a.name == "app")
    info = subprocess.run(
        ["dpkg-deb", "--info", str(out / app.path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert " Package: app\n" in info
    assert " Depends: libfoo (>= 1.2) | libbar, data\n" in info

    # What the import side rebuilds a repository from: the signed files as served.
    for suite in BOTH:
        for name in ("InRelease", "main/binary-amd64/Packages.xz"):
            served = repo / "dists" / suite / name
            assert (out / "dists" / suite / name).read_bytes() == served.read_bytes()
    listing = json.loads((out / "packages.json").read_text())
    rows = {(p["name"], p["version"], p["sha256"]) for p in listing["packages"]}
    assert rows == {(a.name, a.version, a.sha256) for a in artifacts}
    assert {p["name"]: p["suite"] for p in listing["packages"]} == {
        "app": "bookworm",
        "libfoo": "bookworm-updates",
        "data": "bookworm",
        "tool": "bookworm",
        "base-lib": "bookworm",
        "helper": "bookworm-updates",
    }
    assert not list(out.rglob("*.part"))

    # A second run finds every file in place and fetches none again.
    assert again == artifacts
    assert [f.reused for f in fetcher.fetched] == [False] * 6 + [True] * 6


def test_priority_required_is_added_only_when_asked(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    with file_server(repo, tmp_path / "server.log") as server:
        plain = mirror(server.url, fetcher, tmp_path / "a", pristine.key, ["data"])
        full = mirror(
            server.url,
            fetcher,
            tmp_path / "b",
            pristine.key,
            ["data"],
            include_priority_required=True,
        )
    assert {(a.name, a.version) for a in plain} == {("data", "1.0")}
    assert {(a.name, a.version) for a in full} == {
        ("data", "1.0"),
        ("req", "1.0"),
        ("base-lib", "1.0"),
    }


def test_release_and_detached_signature_when_there_is_no_inrelease(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    for suite in BOTH:
        (repo / "dists" / suite / "InRelease").unlink()
    out = tmp_path / "mirror"
    with file_server(repo, tmp_path / "server.log") as server:
        artifacts = mirror(server.url, fetcher, out, pristine.key, ["app", "tool"])
    assert {(a.name, a.version) for a in artifacts} == CLOSURE
    stored = out / "dists" / "bookworm"
    assert sorted(p.name for p in stored.iterdir() if p.is_file()) == ["Release", "Release.gpg"]


def _other_key(repo: Path, pristine: Pristine) -> None:
    release = (repo / "dists" / "bookworm" / "Release").read_bytes()
    (repo / "dists" / "bookworm" / "InRelease").write_bytes(pristine.other.clearsign(release))


def _changed_text(repo: Path, pristine: Pristine) -> None:
    # What an attacker would change: the hash that vouches for the Packages index.
    path = repo / "dists" / "bookworm" / "InRelease"
    index = sha256_file(repo / "dists" / "bookworm" / "main" / "binary-amd64" / "Packages.xz")
    path.write_bytes(path.read_bytes().replace(index.encode(), b"0" * 64))


def _unsigned(repo: Path, pristine: Pristine) -> None:
    (repo / "dists" / "bookworm" / "InRelease").unlink()
    (repo / "dists" / "bookworm" / "Release.gpg").unlink()


def _other_suite(repo: Path, pristine: Pristine) -> None:
    # Correctly signed, but for another suite: a substitution apt would only warn about.
    shutil.copy(
        repo / "dists" / "bookworm-updates" / "InRelease", repo / "dists" / "bookworm" / "InRelease"
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_other_key, "which is not in the keyring"),
        (_changed_text, "bad signature"),
        (_unsigned, "is not signed"),
        (_other_suite, "is for bookworm-updates, not bookworm"),
    ],
)
def test_a_release_without_a_good_signature_is_refused(
    pristine: Pristine,
    repo: Path,
    fetcher: RecordingFetcher,
    tmp_path: Path,
    damage: Callable[[Path, Pristine], None],
    reason: str,
) -> None:
    damage(repo, pristine)
    out = tmp_path / "mirror"
    with (
        file_server(repo, tmp_path / "server.log") as server,
        pytest.raises(MirrorError) as caught,
    ):
        mirror(server.url, fetcher, out, pristine.key, ["app"])
    message = str(caught.value)
    assert message.startswith("bookworm: ")
    assert f"{server.url}/dists/bookworm" in message
    assert reason in message
    assert not out.exists()


def test_an_expired_release_is_refused(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    assert "\nValid-Until: " in (repo / "dists" / "bookworm" / "Release").read_text()
    later = datetime.now(UTC) + timedelta(days=31)
    with (
        file_server(repo, tmp_path / "server.log") as server,
        pytest.raises(MirrorError, match=r"^bookworm: .* expired on .* \(Valid-Until\)"),
    ):
        mirror(server.url, fetcher, tmp_path / "mirror", pristine.key, ["app"], now=later)


def test_a_tampered_packages_index_is_refused(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    index = repo / "dists" / "bookworm" / "main" / "binary-amd64" / "Packages.xz"
    text = lzma.decompress(index.read_bytes())
    index.write_bytes(lzma.compress(text.replace(b"libfoo (>= 1.2) | libbar", b"evil")))
    out = tmp_path / "mirror"
    with (
        file_server(repo, tmp_path / "server.log") as server,
        pytest.raises(ChecksumMismatch) as caught,
    ):
        mirror(server.url, fetcher, out, pristine.key, ["app"])
    assert caught.value.url == f"{server.url}/dists/bookworm/main/binary-amd64/Packages.xz"
    assert "binary-amd64/Packages.xz" in str(caught.value)
    assert not out.exists()


def test_a_changed_deb_is_rejected_and_not_kept(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    deb = repo / "pool" / "main" / "a" / "app" / "app_1.0_amd64.deb"
    data = bytearray(deb.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    deb.write_bytes(data)
    out = tmp_path / "mirror"
    with (
        file_server(repo, tmp_path / "server.log") as server,
        pytest.raises(DownloadsFailed) as caught,
    ):
        mirror(server.url, fetcher, out, pristine.key, ["app"])
    url = f"{server.url}/pool/main/a/app/app_1.0_amd64.deb"
    assert list(caught.value.failures) == [url]
    assert isinstance(caught.value.failures[url], ChecksumMismatch)
    assert "app_1.0_amd64.deb" in str(caught.value)
    assert not list(out.rglob("app_1.0_amd64.deb*"))  # neither the file nor a .part
    # The other downloads finished; nothing claims the mirror is complete.
    assert (out / "pool" / "main" / "libf" / "libfoo" / "libfoo_1.3_amd64.deb").is_file()
    assert not (out / "packages.json").exists()


@pytest.mark.parametrize(
    ("packages", "suites", "fragments"),
    [
        (["app", "nosuch"], BOTH, ["nosuch (requested): no such package for amd64"]),
        (["needy"], BOTH, ["libfoo (>= 2.0), needed by needy 1.0", "libfoo 1.3 is the candidate"]),
        # Without bookworm-updates only libfoo 1.2 provides foo-api, at version 1.2.
        (["tool"], ("bookworm",), ["foo-api (>= 1.3), needed by tool 1.0", "libfoo provides 1.2"]),
    ],
)
def test_unknown_or_unmet_names_are_refused(
    pristine: Pristine,
    repo: Path,
    fetcher: RecordingFetcher,
    tmp_path: Path,
    packages: list[str],
    suites: tuple[str, ...],
    fragments: list[str],
) -> None:
    out = tmp_path / "mirror"
    with (
        file_server(repo, tmp_path / "server.log") as server,
        pytest.raises(MirrorError) as caught,
    ):
        mirror(server.url, fetcher, out, pristine.key, packages, suites)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert not (out / "pool").exists()


def test_a_download_cut_off_by_the_server_resumes(
    pristine: Pristine, repo: Path, fetcher: RecordingFetcher, tmp_path: Path
) -> None:
    out = tmp_path / "mirror"
    part = out / "pool" / "main" / "b" / "big" / "big_1.0_amd64.deb.part"
    with (
        file_server(repo, tmp_path / "server.log", rate=RATE) as server,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        running = pool.submit(mirror, server.url, fetcher, out, pristine.key, ["big"])
        deadline = time.monotonic() + 30
        while not (part.is_file() and part.stat().st_size > 0):
            assert time.monotonic() < deadline, "no part of big.deb arrived"
            assert not running.done(), running.result()
            time.sleep(0.05)
        cut = part.stat().st_size
        server.restart(rate=0)
        [big] = running.result(timeout=60)

    assert 0 < cut < big.size
    assert sha256_file(out / big.path) == sha256_file(repo / big.path) == big.sha256
    [fetched] = fetcher.fetched
    assert fetched.resumed
    assert fetched.size == big.size
    assert not part.exists()


def test_binary_all_is_read_where_the_release_lists_it() -> None:
    digest = "0" * 64
    text = (
        "Codename: trixie\nArchitectures: all amd64 arm64\nComponents: main\nSHA256:\n"
        f" {digest} 1 main/binary-amd64/Packages.xz\n"
        f" {digest} 1 main/binary-arm64/Packages.gz\n"
        f" {digest} 1 main/binary-all/Packages.xz\n"
    )
    release = deb822.Release(text)
    assert wanted_indexes(release, ["main"], ["amd64", "arm64"]) == [
        ("main", "amd64"),
        ("main", "arm64"),
        ("main", "all"),
    ]
    inline = deb822.Release("No-Support-for-Architecture-all: Packages\n" + text)
    assert wanted_indexes(inline, ["main"], ["amd64"]) == [("main", "amd64")]
    with pytest.raises(MirrorError, match="no Packages index for contrib/binary-amd64"):
        wanted_indexes(release, ["contrib"], ["amd64"])
