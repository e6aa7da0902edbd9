"""The download engine against a real HTTP server process on loopback: resume after the
server goes down mid-transfer, retries, digest refusal, concurrency and the summary."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from sovereign.mirror.fetch import (
    ChecksumMismatch,
    Download,
    DownloadsFailed,
    Fetched,
    Fetcher,
    MirrorError,
)
from tests.integration.airgap.servers import file_server, new_fetcher

pytestmark = pytest.mark.timeout(120)


def _blob(root: Path, name: str, size: int) -> tuple[Path, str]:
    data = hashlib.shake_256(name.encode()).digest(size)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _fetcher() -> Fetcher:
    return new_fetcher(workers=3)


def test_a_download_cut_off_by_a_server_restart_resumes_with_a_range_request(
    tmp_path: Path,
) -> None:
    root = tmp_path / "served"
    _, digest = _blob(root, "weights.bin", 600_000)
    out = tmp_path / "out" / "weights.bin"
    with file_server(root, tmp_path / "server.log", rate=200_000) as server:
        fetcher = _fetcher()
        result: list[object] = []
        worker = threading.Thread(
            target=lambda: result.append(
                fetcher.download(Download(f"{server.url}/weights.bin", out, digest, 600_000))
            )
        )
        worker.start()
        part = out.with_name("weights.bin.part")
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size > 100_000):
            assert time.monotonic() < deadline, "the transfer never started"
            time.sleep(0.05)
        server.stop()  # mid-transfer: the client sees the connection drop
        partial = part.stat().st_size
        assert 0 < partial < 600_000
        time.sleep(0.5)
        server.restart(rate=0)
        worker.join(60)
    assert not worker.is_alive()
    fetched = result[0]
    assert isinstance(fetched, Fetched)
    assert fetched.resumed
    assert not fetched.reused
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert not part.exists()


def test_a_partial_file_from_an_earlier_run_is_continued_not_refetched(tmp_path: Path) -> None:
    root = tmp_path / "served"
    source, digest = _blob(root, "layer.tar", 300_000)
    out = tmp_path / "out" / "layer.tar"
    out.parent.mkdir()
    out.with_name("layer.tar.part").write_bytes(source.read_bytes()[:123_456])
    with file_server(root, tmp_path / "server.log") as server:
        fetched = _fetcher().download(Download(f"{server.url}/layer.tar", out, digest))
        again = _fetcher().download(Download(f"{server.url}/layer.tar", out, digest))
    assert fetched.resumed
    assert out.read_bytes() == source.read_bytes()
    assert again.reused  # already in place with the right digest: nothing fetched


def test_a_digest_mismatch_rejects_the_file_and_names_it(tmp_path: Path) -> None:
    root = tmp_path / "served"
    _blob(root, "model.gguf", 50_000)
    out = tmp_path / "out" / "model.gguf"
    with file_server(root, tmp_path / "server.log") as server:
        url = f"{server.url}/model.gguf"
        with pytest.raises(ChecksumMismatch) as caught:
            _fetcher().download(Download(url, out, "0" * 64))
    assert url in str(caught.value)
    assert "0" * 64 in str(caught.value)
    assert list(out.parent.iterdir()) == []  # neither the file nor its .part


def test_one_failed_download_does_not_stop_the_others_and_all_failures_are_named(
    tmp_path: Path,
) -> None:
    root = tmp_path / "served"
    good = [_blob(root, f"good-{n}.bin", 40_000) for n in range(4)]
    _blob(root, "bad.bin", 40_000)
    out = tmp_path / "out"
    console = Console(record=True, width=200, force_terminal=False)
    with file_server(root, tmp_path / "server.log") as server:
        items = [Download(f"{server.url}/{p.name}", out / p.name, d) for p, d in good]
        items.append(Download(f"{server.url}/bad.bin", out / "bad.bin", "f" * 64))
        items.append(Download(f"{server.url}/absent.bin", out / "absent.bin", "e" * 64))
        with pytest.raises(DownloadsFailed) as caught:
            new_fetcher(workers=3, console=console).download_all(items, "blobs")
    assert set(caught.value.failures) == {f"{server.url}/bad.bin", f"{server.url}/absent.bin"}
    assert "HTTP 404" in str(caught.value.failures[f"{server.url}/absent.bin"])
    assert sorted(p.name for p in out.iterdir()) == [f"good-{n}.bin" for n in range(4)]
    assert "blobs: 4 fetched" in console.export_text()


def test_a_server_that_never_comes_back_is_given_up_on_with_the_url(tmp_path: Path) -> None:
    root = tmp_path / "served"
    _, digest = _blob(root, "x.bin", 1000)
    with file_server(root, tmp_path / "server.log") as server:
        url = f"{server.url}/x.bin"
    fetcher = new_fetcher(attempts=2, backoff=0.1)
    with pytest.raises(MirrorError, match="gave up after 2 attempts") as caught:
        fetcher.download(Download(url, tmp_path / "x.bin", digest))
    assert url in str(caught.value)


def test_a_stale_partial_file_of_another_version_is_fetched_again_from_the_start(
    tmp_path: Path,
) -> None:
    root = tmp_path / "served"
    source, digest = _blob(root, "index.xz", 200_000)
    out = tmp_path / "out" / "index.xz"
    out.parent.mkdir()
    out.with_name("index.xz.part").write_bytes(b"an older release of this file")
    with file_server(root, tmp_path / "server.log") as server:
        fetched = _fetcher().download(Download(f"{server.url}/index.xz", out, digest))
    assert out.read_bytes() == source.read_bytes()
    assert not fetched.resumed  # the stale bytes were thrown away, not kept


def test_a_body_longer_than_the_index_said_is_cut_off_and_rejected(tmp_path: Path) -> None:
    root = tmp_path / "served"
    _, digest = _blob(root, "layer.tar", 500_000)
    out = tmp_path / "out" / "layer.tar"
    with file_server(root, tmp_path / "server.log") as server:
        url = f"{server.url}/layer.tar"
        with pytest.raises(MirrorError, match="more than the expected 1000 bytes") as caught:
            _fetcher().download(Download(url, out, digest, size=1000))
    assert url in str(caught.value)
    assert list(out.parent.iterdir()) == []
