"""Plaintext stays in RAM, and a SIGKILL during ingest leaves all of a document or none.

A canary string is planted in documents of every format; after ingest, and again after
the gateway is killed mid-ingest, no file in the data dir, in /tmp, or open in the
gateway's process (deleted temporary files included) may hold it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integration import documents
from tests.integration.conftest import GatewayFactory, RunningGateway, http
from tests.integration.test_memory import ingest, memory_gateway, query

MAX_SCANNED_BYTES = 256 * 1024 * 1024
SOVEREIGN = str(Path(sys.executable).with_name("sovereign"))


def files_since(root: Path, since: float) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            try:
                stat = path.lstat()
            except OSError:
                continue
            recent = stat.st_mtime >= since and stat.st_size <= MAX_SCANNED_BYTES
            if recent and path.is_file() and not path.is_symlink():
                yield path


def open_files(pid: int) -> Iterator[Path]:
    """The regular files a process holds open, read through /proc even once unlinked."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            yield fd


def holders(canary: str, paths: Iterator[Path]) -> list[str]:
    needles = [canary.encode(), canary.encode("utf-16-le"), canary.lower().encode()]
    found = []
    for path in paths:
        try:
            content = path.read_bytes()
        except OSError:
            continue
        if any(needle in content for needle in needles):
            found.append(str(path))
    return found


def assert_nowhere_on_disk(
    canary: str, gateway: RunningGateway, since: float, pid: int | None
) -> None:
    found = holders(canary, files_since(gateway.home, 0))
    found += holders(canary, files_since(Path("/tmp"), since))
    if pid is not None:
        found += holders(canary, open_files(pid))
    assert found == [], f"plaintext canary found in {found}"


def big_document(canary: str, paragraphs: int) -> str:
    return "\n\n".join(
        f"Paragraph {n}: ward inventory line {n * 7919 % 10007} lists item {canary} "
        f"with lot number {n * 104729 % 99991} and a note about storage conditions."
        for n in range(paragraphs)
    )


def test_no_plaintext_on_disk_after_ingest_or_a_crash(gateway_factory: GatewayFactory) -> None:
    since = time.time() - 1
    canary = documents.canary()
    gateway = memory_gateway(gateway_factory)
    token = gateway.token("ada", ("admin",))
    sources = [
        ("note.txt", "text/plain", f"Canary note: {canary}".encode()),
        ("page.html", "text/html", documents.html("Canary", canary)),
        ("report.pdf", "application/pdf", documents.pdf(f"Canary {canary}")),
        ("memo.docx", "", documents.docx_bytes(f"Canary {canary}", table=[[canary, "x"]])),
    ]
    for filename, _media_type, content in sources:
        status, answer = ingest(gateway, token, content=documents.b64(content), filename=filename)
        assert status == 201, answer
    # Over 1 MiB as multipart: where a stock form parser would spool the file to disk.
    large = documents.pdf(f"Scanned ward inventory {canary}", padding=1536 * 1024)
    raw, content_type = documents.multipart(
        {"title": "big"}, ("scan.pdf", "application/pdf", large)
    )
    status, _, body = gateway.call(
        "POST", "/ingest", raw=raw, headers={"content-type": content_type}, token=token, timeout=300
    )
    assert status == 201, body
    status, found = query(gateway, token, "scanned ward inventory", top_k=1)
    assert status == 200
    assert canary in found["data"][0]["text"]
    assert_nowhere_on_disk(canary, gateway, since, gateway.process.pid)

    # Kill the gateway in the middle of another large ingest.
    crash_canary = documents.canary()
    started = threading.Event()

    def send() -> None:
        started.set()
        # The connection dies with the gateway.
        with contextlib.suppress(OSError):
            ingest(gateway, token, text=big_document(crash_canary, 200))

    sender = threading.Thread(target=send)
    sender.start()
    started.wait()
    time.sleep(1.0)
    gateway.stop(signal.SIGKILL)
    sender.join()
    for leaked in (canary, crash_canary):
        assert_nowhere_on_disk(leaked, gateway, since, None)
    assert canary not in gateway.log.read_text()


def check_report(gateway: RunningGateway) -> dict[str, Any]:
    result = subprocess.run(
        [SOVEREIGN, "memory", "check", "--render", str(gateway.render_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_sigkill_during_ingest_leaves_the_whole_document_or_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    text = big_document("crash-safety", 120)
    outcomes = []
    # Embedding takes most of an ingest here; the later delays land in or after the writes.
    for delay in (0.3, 1.2, 2.5, 6.0):
        gateway = memory_gateway(gateway_factory, name=f"kill-{delay}")
        token = gateway.token("ada", ("admin",))
        url = f"{gateway.url}/ingest"
        sender = threading.Thread(
            target=lambda url=url, token=token: _send_ignoring_errors(url, token, text)
        )
        sender.start()
        time.sleep(delay)
        gateway.stop(signal.SIGKILL)
        sender.join()
        # The state exactly as the kill left it (check without --repair changes nothing):
        # a committed document always has its vectors, since commit follows durable upsert.
        before = check_report(gateway)
        assert before["unindexed"] == [], before
        restarted = memory_gateway(gateway_factory, name=f"kill-{delay}")
        token = restarted.token("ada", ("admin",))
        status, again = ingest(restarted, token, text=text)
        assert status in (200, 201), again
        committed_before = status == 200
        outcomes.append((delay, before, committed_before))
        health = json.loads(restarted.call("GET", "/health")[2])["components"]["memory"]
        assert health["detail"].startswith(f"1 document(s), {again['chunks']} chunk(s)")
        status, found = query(
            restarted, token, "ward inventory", top_k=100, filter={"documents": [again["id"]]}
        )
        assert len(found["data"]) == min(100, again["chunks"])
        restarted.stop()
        after = check_report(restarted)
        assert after["clean"], after
        if committed_before:
            # Visible before the restart means every chunk was: nothing was left to repair.
            assert before["clean"], before
    # Kills landed both before the commit and after it, or the test proved too little.
    assert {committed for _, _, committed in outcomes} == {True, False}, outcomes


def _send_ignoring_errors(url: str, token: str, text: str) -> None:
    with contextlib.suppress(OSError):
        http("POST", url, {"text": text}, token=token, timeout=120)
