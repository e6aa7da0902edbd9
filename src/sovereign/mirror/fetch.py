"""Downloads for every mirror: resumed with HTTP Range, retried with backoff, run
concurrently, checked against their sha256, shown as progress bars and summed up.

A file is written as `<name>.part` and renamed into place only once its digest matches,
so a mirror directory never holds a file that was not checked. A `.part` left by an
interrupted run is resumed, not refetched.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from urllib3.util.retry import Retry

from sovereign.tools import sha256_file

CHUNK = 1 << 20
# Small reads keep what a dropped connection loses, and the progress bars, fine-grained.
NETWORK_CHUNK = 1 << 16
USER_AGENT = "sovereign-mirror/1"
# Statuses worth another try: the server or a proxy in front of it is briefly unwell.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class MirrorError(Exception):
    """A download or an index that cannot be used; the message names the URL or file."""


class HttpStatusError(MirrorError):
    """The server answered, with a status that is not success; `status` says which."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"{url}: HTTP {status} {reason}")
        self.status = status


class GaveUp(MirrorError):
    """The server stayed unreachable through every retry; what arrived is kept to resume."""


class ChecksumMismatch(MirrorError):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(f"{url}: sha256 is {actual}, expected {expected}; the file was rejected")
        self.url = url
        self.expected = expected
        self.actual = actual


class DownloadsFailed(MirrorError):
    """Some downloads failed after their retries; every other download was finished."""

    def __init__(self, failures: Mapping[str, Exception]) -> None:
        lines = "\n".join(f"  {label}: {error}" for label, error in failures.items())
        super().__init__(f"{len(failures)} download(s) failed:\n{lines}")
        self.failures = dict(failures)


@dataclass(frozen=True)
class Download:
    url: str
    dest: Path
    sha256: str | None = None  # None: computed and returned, for sources that publish none
    size: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: requests.auth.AuthBase | None = None

    @property
    def label(self) -> str:
        return self.dest.name


@dataclass(frozen=True)
class Fetched:
    download: Download
    sha256: str
    size: int
    reused: bool  # already in place with the right digest; nothing was fetched
    resumed: bool  # bytes were kept from before: a `.part` or a dropped connection


@dataclass
class Summary:
    fetched: int = 0
    reused: int = 0
    resumed: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self, what: str) -> str:
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (
            f"{what}: {self.fetched} fetched ({self.bytes / 1e6:.1f} MB, {rate:.1f} MB/s), "
            f"{self.reused} already present, {self.resumed} resumed, in {self.seconds:.1f} s"
        )


def session(retries: int = 5, backoff: float = 0.5) -> requests.Session:
    """A session that retries connects and transient statuses itself; a body cut off
    mid-stream is resumed by `Fetcher`, which urllib3 cannot do."""
    retry = Retry(
        total=retries,
        backoff_factor=backoff,
        status_forcelist=sorted(RETRY_STATUSES),
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    http = requests.Session()
    http.headers["User-Agent"] = USER_AGENT
    adapter = HTTPAdapter(max_retries=retry, pool_connections=8, pool_maxsize=16)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return http


class Fetcher:
    def __init__(
        self,
        http: requests.Session | None = None,
        *,
        workers: int = 4,
        attempts: int = 6,
        backoff: float = 0.5,
        timeout: tuple[float, float] = (10.0, 60.0),
        console: Console | None = None,
    ) -> None:
        self.http = http or session(backoff=backoff)
        self.workers = workers
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the pooled connections now, not whenever the session is collected."""
        self.http.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def get(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        auth: requests.auth.AuthBase | None = None,
    ) -> requests.Response:
        """A small document (an index, a manifest), read whole; any non-2xx is an error."""
        try:
            response = self.http.get(url, headers=headers, auth=auth, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise GaveUp(f"{url}: {_reason(error)}") from None
        except requests.RequestException as error:
            raise MirrorError(f"{url}: {_reason(error)}") from None
        if not response.ok:
            raise HttpStatusError(url, response.status_code, response.reason)
        return response

    def download(self, item: Download) -> Fetched:
        item.dest.parent.mkdir(parents=True, exist_ok=True)
        if (
            item.sha256 is not None
            and item.dest.is_file()
            and sha256_file(item.dest) == item.sha256
        ):
            return Fetched(item, item.sha256, item.dest.stat().st_size, True, False)
        part = item.dest.with_name(item.dest.name + ".part")
        task = self._task(item)
        try:
            resumed = self._fetch_part(item, part, task)
        except GaveUp:
            raise  # the part stays, for the next run to resume
        except MirrorError:
            part.unlink(missing_ok=True)
            raise
        actual = sha256_file(part)
        if resumed and item.sha256 is not None and actual != item.sha256:
            # A part left by an earlier run may be of another version of the file.
            part.unlink()
            resumed = self._fetch_part(item, part, task)
            actual = sha256_file(part)
        if item.size is not None and part.stat().st_size != item.size:
            size = part.stat().st_size
            part.unlink()
            raise MirrorError(f"{item.url}: {size} bytes, expected {item.size}; rejected")
        if item.sha256 is not None and actual != item.sha256:
            part.unlink()
            raise ChecksumMismatch(item.url, item.sha256, actual)
        os.replace(part, item.dest)
        return Fetched(item, actual, item.dest.stat().st_size, False, resumed)

    def _fetch_part(self, item: Download, part: Path, task: TaskID | None) -> bool:
        """Fill `part`, resuming it after dropped connections; True if any bytes were kept
        from before (a server that honoured Range)."""
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 10.0))
            offset = part.stat().st_size if part.exists() else 0
            try:
                return self._stream(item, part, offset, task)
            except _Transient as error:
                last = error.__cause__ or error
        raise GaveUp(f"{item.url}: gave up after {self.attempts} attempts: {_reason(last)}")

    def _stream(self, item: Download, part: Path, offset: int, task: TaskID | None) -> bool:
        headers = dict(item.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with self.http.get(
                item.url, headers=headers, auth=item.auth, stream=True, timeout=self.timeout
            ) as response:
                if response.status_code == 416 and offset:
                    return True  # the part is already whole; the digest decides
                if response.status_code in RETRY_STATUSES:
                    raise _Transient(f"HTTP {response.status_code}")
                if not response.ok:
                    raise HttpStatusError(item.url, response.status_code, response.reason)
                # A server that ignores Range sends the whole file again.
                append = offset > 0 and response.status_code == 206
                if append and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {offset}-"
                ):
                    raise MirrorError(
                        f"{item.url}: asked for bytes {offset}- and got "
                        f"{response.headers.get('Content-Range')!r}; not resuming from it"
                    )
                written = offset if append else 0
                self._advance(task, written, total=item.size, reset=True)
                with part.open("ab" if append else "wb") as out:
                    for chunk in response.iter_content(NETWORK_CHUNK):
                        written += len(chunk)
                        if item.size is not None and written > item.size:
                            # Stop a server that sends more than the index said, before
                            # it fills the disk.
                            raise MirrorError(
                                f"{item.url}: more than the expected {item.size} bytes; rejected"
                            )
                        out.write(chunk)
                        self._advance(task, len(chunk))
                return append
        except (requests.ConnectionError, requests.Timeout) as error:
            raise _Transient(_reason(error)) from error
        except requests.exceptions.ChunkedEncodingError as error:
            raise _Transient(_reason(error)) from error
        except requests.RequestException as error:
            # Redirect loops, undecodable bodies, URLs of a scheme we do not fetch.
            raise MirrorError(f"{item.url}: {_reason(error)}") from None

    def download_all(self, items: Iterable[Download], what: str) -> list[Fetched]:
        """Every item, `workers` at a time. A failure does not stop the others; all
        failures are raised together once the rest are done."""
        pending = _unique(items)
        results: list[Fetched] = []
        failures: dict[str, Exception] = {}
        summary = Summary()
        started = time.monotonic()
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        with progress:
            self._progress = progress
            try:
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    futures = {pool.submit(self.download, item): item for item in pending}
                    for future in as_completed(futures):
                        item = futures[future]
                        try:
                            fetched = future.result()
                        except (MirrorError, OSError) as error:
                            failures[item.url] = error
                            continue
                        results.append(fetched)
                        if fetched.reused:
                            summary.reused += 1
                        else:
                            summary.fetched += 1
                            summary.bytes += fetched.size
                            summary.resumed += fetched.resumed
            finally:
                self._progress = None
        summary.seconds = time.monotonic() - started
        self.console.print(summary.line(what), markup=False, highlight=False)
        if failures:
            raise DownloadsFailed(failures)
        return results

    def _task(self, item: Download) -> TaskID | None:
        with self._lock:
            if self._progress is None:
                return None
            return self._progress.add_task(item.label, total=item.size)

    def _advance(
        self, task: TaskID | None, amount: int, total: int | None = None, reset: bool = False
    ) -> None:
        if task is None or self._progress is None:
            return
        with self._lock:
            if reset:
                self._progress.update(task, completed=amount, total=total)
            else:
                self._progress.advance(task, amount)


def _unique(items: Iterable[Download]) -> list[Download]:
    """One download per destination: two writers of one `.part` would corrupt it."""
    by_dest: dict[Path, Download] = {}
    for item in items:
        seen = by_dest.setdefault(item.dest, item)
        if seen.sha256 != item.sha256:
            raise MirrorError(
                f"{item.dest}: wanted with sha256 {seen.sha256} ({seen.url}) and "
                f"{item.sha256} ({item.url})"
            )
    return list(by_dest.values())


class _Transient(Exception):
    """A dropped connection or a transient status: resume after a pause."""


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = str(error)
    # requests nests urllib3's errors; the innermost reason is the readable one.
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1].rstrip(")'\"")
    return text or type(error).__name__


def json_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise MirrorError(f"{response.url}: not JSON") from None
