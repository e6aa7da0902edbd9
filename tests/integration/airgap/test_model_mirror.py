"""The model mirror against a hub-like file server process on loopback: a pinned commit
mirrored with every file checked, a branch refused, LFS and plain files changed in transit
refused, a transfer resumed across a server restart, a clone's LFS pointers refused or
fetched from the hub, a local file checked against the profile's sha256, and a model with
no licence mirrored with a warning."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from packageurl import PackageURL
from rich.console import Console

from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import ChecksumMismatch, DownloadsFailed, Fetcher, MirrorError
from sovereign.mirror.models import BlobIdMismatch, MirroredModel, mirror_model
from tests.integration.airgap.servers import file_server

pytestmark = pytest.mark.timeout(120)

REPO = "acme/tiny-model"
COMMIT = hashlib.sha1(b"acme/tiny-model, first commit", usedforsecurity=False).hexdigest()
WEIGHTS = "tiny.Q4_K_M.gguf"
CARD = "---\nlicense: apache-2.0\nlibrary_name: gguf\n---\n# Tiny model\nStand-in weights.\n"
DIRECTORY = Path("hf", "acme", "tiny-model", COMMIT)
ALLOW = ["*.gguf", "config.json", "tokenizer.json"]


def _model(card: str = CARD, weights_size: int = 4096) -> dict[str, bytes]:
    return {
        WEIGHTS: b"GGUF" + hashlib.shake_256(b"weights").digest(weights_size - 4),
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "tokenizer.json": json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
        "README.md": card.encode(),
        "extra/optimizer.pt": hashlib.shake_256(b"optimizer").digest(2048),
    }


def _publish(
    root: Path,
    files: dict[str, bytes],
    served: dict[str, bytes] | None = None,
    lfs: tuple[str, ...] = (WEIGHTS, "extra/optimizer.pt"),
) -> None:
    """A hub repository as fileserver.py lays it out; `served` replaces what the hub's
    CDN hands out for a file, while its listing still describes the committed one."""
    folder = root / REPO / COMMIT
    for name, data in {**files, **{f".served/{n}": d for n, d in (served or {}).items()}}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / ".lfs").write_text("".join(f"{name}\n" for name in lfs))
    (root / REPO / "refs").mkdir()
    (root / REPO / "refs" / "main").write_text(COMMIT)


def _fetcher() -> Fetcher:
    return Fetcher(workers=3, backoff=0.2, console=Console(record=True, force_terminal=False))


def _tree(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_pinned_commit_is_mirrored_with_every_file_checked_and_recorded(
    tmp_path: Path,
) -> None:
    files = _model()
    _publish(tmp_path / "hub", files)
    out = tmp_path / "mirror"
    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server:
        source = f"hf:{REPO}@{COMMIT}"
        result = mirror_model(source, out, _fetcher(), server.url, allow=ALLOW)
        again = mirror_model(source, out, _fetcher(), server.url, allow=ALLOW)

    kept = sorted(["README.md", WEIGHTS, "config.json", "tokenizer.json"])
    directory = out / DIRECTORY
    assert result.directory == directory
    assert _tree(directory) == sorted([*kept, "model.json"])  # no .part, nothing unchecked
    for file in result.files:
        assert (directory / file.path).read_bytes() == files[file.path]
        assert file.sha256 == _sha256(files[file.path])
    assert {f.path: f.lfs for f in result.files} == {p: p == WEIGHTS for p in kept}

    resolve = f"{server.url}/{REPO}/resolve/{COMMIT}"
    manifest = json.loads((directory / "model.json").read_text())
    assert (manifest["repo"], manifest["commit"], manifest["card"]) == (REPO, COMMIT, "README.md")
    assert manifest["purl"] == f"pkg:huggingface/acme/tiny-model@{COMMIT}"
    assert manifest["licence"]["spdx"] == "Apache-2.0"
    assert manifest["licence"]["stated"] == "apache-2.0"
    assert manifest["files"] == [
        {
            "path": path,
            "sha256": _sha256(files[path]),
            "size": len(files[path]),
            "source": f"{resolve}/{path}",
            "lfs": path == WEIGHTS,
        }
        for path in kept
    ]

    weights = next(a for a in result.artifacts if a.path.endswith(WEIGHTS))
    assert weights == Artifact(
        kind="model",
        name=REPO,
        version=COMMIT,
        path=f"{DIRECTORY.as_posix()}/{WEIGHTS}",
        sha256=_sha256(files[WEIGHTS]),
        size=len(files[WEIGHTS]),
        source=f"{resolve}/{WEIGHTS}",
        licence="Apache-2.0",
        purl=f"pkg:huggingface/acme/tiny-model@{COMMIT}",
    )
    assert all((out / a.path).is_file() for a in result.artifacts)
    purl = PackageURL.from_string(str(weights.purl))
    assert (purl.type, purl.namespace, purl.name, purl.version) == (
        "huggingface",
        "acme",
        "tiny-model",
        COMMIT,
    )
    assert result.warnings == ()
    # a second run checks what is there and fetches nothing
    assert again.reused == tuple(kept)
    assert again.files == result.files


def test_a_single_file_source_takes_that_file_and_is_checked_against_the_profile(
    tmp_path: Path,
) -> None:
    files = _model()
    _publish(tmp_path / "hub", files)
    out = tmp_path / "mirror"
    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server:
        with pytest.raises(MirrorError, match=f"but {'0' * 64} is pinned"):
            mirror_model(
                f"hf:{REPO}@{COMMIT}/{WEIGHTS}", out, _fetcher(), server.url, sha256="0" * 64
            )
        assert not out.exists()  # refused from the listing, before the weights were fetched
        weights = mirror_model(
            f"hf:{REPO}@{COMMIT}/{WEIGHTS}",
            out,
            _fetcher(),
            server.url,
            sha256=_sha256(files[WEIGHTS]),
        )
        # a second profile model from the same commit shares the directory and manifest
        config = mirror_model(f"hf:{REPO}@{COMMIT}/config.json", out, _fetcher(), server.url)
    assert [f.path for f in weights.files] == ["README.md", WEIGHTS]
    assert [f.path for f in config.files] == ["README.md", "config.json"]
    manifest = json.loads((out / DIRECTORY / "model.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["README.md", "config.json", WEIGHTS]


def test_a_branch_is_refused_with_the_commit_to_pin(tmp_path: Path) -> None:
    _publish(tmp_path / "hub", _model())
    out = tmp_path / "mirror"
    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server:
        with pytest.raises(MirrorError) as branch:
            mirror_model(f"hf:{REPO}@main/{WEIGHTS}", out, _fetcher(), server.url)
        with pytest.raises(MirrorError) as unpinned:
            mirror_model(f"hf:{REPO}", out, _fetcher(), server.url)
        with pytest.raises(MirrorError) as short:
            mirror_model(f"hf:{REPO}@{COMMIT[:7]}", out, _fetcher(), server.url)
    assert "revision 'main' is not a commit" in str(branch.value)
    assert f"main is at {COMMIT} now: hf:{REPO}@{COMMIT}/{WEIGHTS}" in str(branch.value)
    assert f"main is at {COMMIT} now: hf:{REPO}@{COMMIT}" in str(unpinned.value)
    assert f"revision '{COMMIT[:7]}' is not a commit" in str(short.value)
    assert not out.exists()


def test_weights_that_no_longer_match_their_lfs_sha256_are_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    files = _model()
    tampered = files[WEIGHTS][:-1] + bytes([files[WEIGHTS][-1] ^ 1])
    _publish(tmp_path / "hub", files, served={WEIGHTS: tampered})
    out = tmp_path / "mirror"
    with (
        file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server,
        pytest.raises(DownloadsFailed) as caught,
    ):
        mirror_model(f"hf:{REPO}@{COMMIT}", out, _fetcher(), server.url, allow=ALLOW)
    url = f"{server.url}/{REPO}/resolve/{COMMIT}/{WEIGHTS}"
    assert list(caught.value.failures) == [url]
    failure = caught.value.failures[url]
    assert isinstance(failure, ChecksumMismatch)
    assert failure.expected == _sha256(files[WEIGHTS])
    assert failure.actual == _sha256(tampered)
    assert WEIGHTS in str(caught.value)
    # no weights, no .part, no plain file left unchecked, no manifest
    assert _tree(out) == []


def test_a_plain_file_changed_in_transit_is_refused_by_its_git_blob_id(tmp_path: Path) -> None:
    files = _model()
    # the same size, so only the blob id can tell
    changed = files["config.json"].replace(b"LlamaForCausalLM", b"EvilForCausalLM!")
    _publish(tmp_path / "hub", files, served={"config.json": changed})
    out = tmp_path / "mirror"
    with (
        file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server,
        pytest.raises(DownloadsFailed) as caught,
    ):
        mirror_model(f"hf:{REPO}@{COMMIT}", out, _fetcher(), server.url, allow=ALLOW)
    url = f"{server.url}/{REPO}/resolve/{COMMIT}/config.json"
    assert list(caught.value.failures) == [url]
    assert isinstance(caught.value.failures[url], BlobIdMismatch)
    assert "config.json has git blob id" in str(caught.value)
    # what was checked stays for the next run; the changed file, its staging copy and the
    # manifest do not
    kept = sorted(["README.md", WEIGHTS, "tokenizer.json"])
    assert _tree(out) == [f"{DIRECTORY.as_posix()}/{path}" for path in kept]


def test_a_pointer_the_hub_serves_as_a_plain_file_is_never_stored(tmp_path: Path) -> None:
    files = _model()
    pointer = _pointer(files[WEIGHTS])
    # committed as a plain git file: the hub's resolve/ serves the pointer, not the weights
    _publish(tmp_path / "hub", {**files, WEIGHTS: pointer}, lfs=())
    out = tmp_path / "mirror"
    with (
        file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server,
        pytest.raises(MirrorError) as caught,
    ):
        mirror_model(f"hf:{REPO}@{COMMIT}", out, _fetcher(), server.url, allow=ALLOW)
    assert str(caught.value).startswith(f"{WEIGHTS}: git-lfs pointer(s), whose objects")
    assert WEIGHTS not in {Path(p).name for p in _tree(out)}
    assert not (out / DIRECTORY / "model.json").exists()


def test_a_transfer_cut_off_by_a_server_restart_is_resumed_and_correct(tmp_path: Path) -> None:
    files = _model(weights_size=600_000)
    _publish(tmp_path / "hub", files)
    out = tmp_path / "mirror"
    part = out / DIRECTORY / f"{WEIGHTS}.part"
    results: list[MirroredModel | BaseException] = []

    def mirror(url: str) -> None:
        try:
            results.append(mirror_model(f"hf:{REPO}@{COMMIT}", out, _fetcher(), url, allow=ALLOW))
        except BaseException as error:  # re-raised below, in the test's own thread
            results.append(error)

    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True, rate=200_000) as server:
        worker = threading.Thread(target=mirror, args=(server.url,))
        worker.start()
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 100_000):
            assert time.monotonic() < deadline, "the weights never started to arrive"
            time.sleep(0.05)
        server.stop()  # mid-transfer: the client sees the connection drop
        assert 0 < part.stat().st_size < 600_000
        time.sleep(0.3)
        server.restart(rate=0)
        worker.join(60)
    assert not worker.is_alive()
    [result] = results
    if isinstance(result, BaseException):
        raise result
    assert result.resumed == (WEIGHTS,)
    assert (out / DIRECTORY / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert not part.exists()


def _pointer(data: bytes) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{_sha256(data)}\nsize {len(data)}\n".encode()


def _clone(path: Path, files: dict[str, bytes]) -> None:
    """A `git clone` made without git-lfs: the weights are a pointer."""
    for name, data in {**files, WEIGHTS: _pointer(files[WEIGHTS])}.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    git = path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    (git / "config").write_text(f'[remote "origin"]\n\turl = https://huggingface.co/{REPO}\n')


def test_a_clone_with_an_lfs_pointer_is_refused_and_fetched_from_the_hub_given_an_endpoint(
    tmp_path: Path,
) -> None:
    files = _model()
    _publish(tmp_path / "hub", files)
    clone = tmp_path / "tiny-model"
    _clone(clone, {k: v for k, v in files.items() if k != "extra/optimizer.pt"})
    out = tmp_path / "mirror"
    with pytest.raises(MirrorError) as caught:
        mirror_model(f"file:{clone}", out, _fetcher())
    assert f"{WEIGHTS} is a git-lfs pointer" in str(caught.value)
    assert not out.exists()  # nothing copied, the pointer least of all

    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server:
        result = mirror_model(f"file:{clone}", out, _fetcher(), server.url)
    directory = out / "local" / "tiny-model"
    assert _tree(directory) == sorted(
        ["README.md", WEIGHTS, "config.json", "tokenizer.json", "model.json"]
    )
    assert (directory / WEIGHTS).read_bytes() == files[WEIGHTS]
    sources = {f.path: f.source for f in result.files}
    assert sources[WEIGHTS] == f"{server.url}/{REPO}/resolve/{COMMIT}/{WEIGHTS}"
    assert sources["config.json"] == (clone / "config.json").as_uri()
    manifest = json.loads((directory / "model.json").read_text())
    assert (manifest["repo"], manifest["commit"], manifest["path"]) == (REPO, COMMIT, str(clone))
    assert {a.licence for a in result.artifacts} == {"Apache-2.0"}
    assert {a.purl for a in result.artifacts} == {None}  # local bytes: not vouched for by the hub
    assert result.version.startswith("sha256:")


def test_a_local_file_is_copied_and_checked_against_the_profiles_sha256(tmp_path: Path) -> None:
    weights = _model()[WEIGHTS]
    path = tmp_path / "models" / WEIGHTS
    path.parent.mkdir()
    path.write_bytes(weights)
    result = mirror_model(f"file:{path}", tmp_path / "good", _fetcher(), sha256=_sha256(weights))
    assert [(f.path, f.sha256) for f in result.files] == [(WEIGHTS, _sha256(weights))]
    assert (tmp_path / "good" / "local" / "tiny.Q4_K_M" / WEIGHTS).read_bytes() == weights
    assert result.version == "sha256:" + _sha256(f"{WEIGHTS}\0{_sha256(weights)}\n".encode())

    with pytest.raises(ChecksumMismatch) as caught:
        mirror_model(f"file:{path}", tmp_path / "bad", _fetcher(), sha256="0" * 64)
    assert str(path) in str(caught.value)
    assert _tree(tmp_path / "bad") == []  # neither the file nor its .part


def test_a_model_without_a_licence_is_mirrored_with_licence_none_and_a_warning(
    tmp_path: Path,
) -> None:
    files = _model(card="# Tiny model\nNo metadata, no licence.\n")
    _publish(tmp_path / "hub", files)
    out = tmp_path / "mirror"
    with file_server(tmp_path / "hub", tmp_path / "server.log", hub=True) as server:
        result = mirror_model(f"hf:{REPO}@{COMMIT}", out, _fetcher(), server.url, allow=ALLOW)
    assert result.licence.spdx is None
    assert {a.licence for a in result.artifacts} == {None}
    [warning] = result.warnings
    assert warning.startswith(f"{REPO}: no licence found")
    assert "NOASSERTION" in warning
    manifest = json.loads((out / DIRECTORY / "model.json").read_text())
    assert manifest["licence"]["spdx"] is None
    assert manifest["card"] == "README.md"  # kept, though it names no licence
