"""A static HTTP file server with Range support, run as its own process by the air-gap tests.

It serves `--root` as plain files (a Debian repository; a PEP 503 tree, whose directories
answer with their `index.html`) and, with `--hub`,
also the parts of the Hugging Face Hub's file API that model mirrors use:

- `GET /api/models/<org>/<repo>/revision/<rev>`: the commit, its files (`siblings`, with
  `size`, `blobId` and, for LFS files, `lfs.sha256` when `?blobs=true`; an LFS file's
  `blobId` is its pointer's, since git holds the pointer) and `cardData.license`;
- `GET /<org>/<repo>/resolve/<rev>/<file>`: a plain file's content, with the hub's
  `X-Repo-Commit` and `ETag` (its git blob id); for an LFS file, as the hub does, a 302
  to its object on a CDN (`/cdn-lfs/<org>/<repo>/<commit>/<file>` here, which sends no
  hub headers) with `X-Repo-Commit`, `X-Linked-Etag` (the sha256) and `X-Linked-Size`;
- `GET /<org>/<repo>/raw/<rev>/<file>`: what git holds, so an LFS file's pointer.

A hub repository is the directory `<root>/<org>/<repo>/<commit>/`; a file there whose
name is in `<commit>/.lfs` (one name per line) is served as an LFS file. `refs/<name>`
files in `<root>/<org>/<repo>/` map branch names to commits. A file at
`<commit>/.served/<file>` is served in place of `<file>`, whose listing, pointer and
headers stay those of the committed file: a CDN or proxy that hands out other bytes.

`--rate BYTES` slows every body to about that many bytes a second, so a test can stop the
server mid-transfer. Runs on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_SPEC = "https://git-lfs.github.com/spec/v1"
BODY_CHUNK = 16 * 1024


class Handler(BaseHTTPRequestHandler):
    root: Path
    hub: bool
    rate: int

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        if self.hub:
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
            if api:
                self._revision(api.group(1), api.group(2), "blobs=true" in parts.query)
                return
            file = re.fullmatch(r"/([^/]+/[^/]+)/(resolve|raw)/([^/]+)/(.+)", path)
            if file:
                self._hub_file(*file.groups(), head=head)
                return
            cdn = re.fullmatch(r"/cdn-lfs/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path)
            if cdn:
                self._cdn_file(*cdn.groups(), head=head)
                return
        target = (self.root / path.lstrip("/")).resolve()
        if path.endswith("/") and target.is_dir():
            target = target / "index.html"  # a static PEP 503 tree's project pages
        if not target.is_relative_to(self.root) or not target.is_file():
            self._error(HTTPStatus.NOT_FOUND)
            return
        self._send_file(target, head, {})

    def _commit(self, repo: str, revision: str) -> Path | None:
        base = self.root / repo
        ref = base / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        folder = base / commit
        return folder if re.fullmatch(r"[0-9a-f]{40}", commit) and folder.is_dir() else None

    def _revision(self, repo: str, revision: str, blobs: bool) -> None:
        folder = self._commit(repo, revision)
        if folder is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"Revision Not Found: {revision}"})
            return
        lfs = _lfs_names(folder)
        siblings = []
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = file.relative_to(folder).as_posix()
            if name == ".lfs" or name.startswith(".served/"):
                continue
            entry: dict[str, object] = {"rfilename": name}
            if blobs:
                entry["size"] = file.stat().st_size
                entry["blobId"] = _git_blob_id(file.read_bytes())
                if name in lfs:
                    digest = _sha256(file)
                    pointer = _pointer(digest, file.stat().st_size)
                    # git holds the pointer, so the hub's blob id is the pointer's
                    entry["blobId"] = _git_blob_id(pointer.encode())
                    entry["lfs"] = {
                        "sha256": digest,
                        "size": file.stat().st_size,
                        "pointerSize": len(pointer),
                    }
            siblings.append(entry)
        card = folder / "README.md"
        licence = _card_licence(card.read_text()) if card.is_file() else None
        self._json(
            HTTPStatus.OK,
            {
                "id": repo,
                "sha": folder.name,
                "siblings": siblings,
                "cardData": {"license": licence} if licence else {},
            },
        )

    def _hub_file(self, repo: str, kind: str, revision: str, name: str, head: bool) -> None:
        folder = self._commit(repo, revision)
        file = (folder / name).resolve() if folder else None
        if folder is None or file is None or not file.is_relative_to(folder) or not file.is_file():
            self._error(HTTPStatus.NOT_FOUND)
            return
        headers = {"X-Repo-Commit": folder.name}
        if name in _lfs_names(folder):
            digest = _sha256(file)
            if kind == "raw":
                body = _pointer(digest, file.stat().st_size).encode()
                self._send_bytes(body, head, headers)
                return
            headers["X-Linked-Etag"] = f'"{digest}"'
            headers["X-Linked-Size"] = str(file.stat().st_size)
            headers["ETag"] = f'"{digest}"'
            headers["Location"] = f"/cdn-lfs/{repo}/{folder.name}/{quote(name)}"
            self._send_bytes(b"", head, headers, HTTPStatus.FOUND)
            return
        headers["ETag"] = f'"{_git_blob_id(file.read_bytes())}"'
        self._send_file(_served(folder, name, file), head, headers)

    def _cdn_file(self, repo: str, commit: str, name: str, head: bool) -> None:
        folder = self.root / repo / commit
        file = (folder / name).resolve()
        if not file.is_relative_to(folder) or not file.is_file() or name not in _lfs_names(folder):
            self._error(HTTPStatus.NOT_FOUND)
            return
        self._send_file(_served(folder, name, file), head, {})

    def _send_file(self, file: Path, head: bool, headers: dict[str, str]) -> None:
        size = file.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        wanted = self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if not match or int(match.group(1)) >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Accept-Ranges", "bytes")
        if file.suffix == ".html":
            self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(end - start + 1))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        with file.open("rb") as stream:
            stream.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = stream.read(min(BODY_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
                if self.rate:
                    time.sleep(len(chunk) / self.rate)

    def _send_bytes(
        self, body: bytes, head: bool, headers: dict[str, str], status: HTTPStatus = HTTPStatus.OK
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus) -> None:
        self._json(status, {"error": status.phrase})


def _served(folder: Path, name: str, committed: Path) -> Path:
    override = folder / ".served" / name
    return override if override.is_file() else committed


def _lfs_names(folder: Path) -> set[str]:
    listing = folder / ".lfs"
    return set(listing.read_text().split()) if listing.is_file() else set()


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _pointer(digest: str, size: int) -> str:
    return f"version {LFS_SPEC}\noid sha256:{digest}\nsize {size}\n"


def _card_licence(card: str) -> str | None:
    front = re.match(r"---\n(.*?)\n---", card, re.S)
    if not front:
        return None
    found = re.search(r"^license:\s*(\S+)", front.group(1), re.M)
    return found.group(1) if found else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hub", action="store_true")
    parser.add_argument("--rate", type=int, default=0)
    args = parser.parse_args()
    Handler.root = args.root.resolve()
    Handler.hub = args.hub
    Handler.rate = args.rate
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
