"""OCI image layers whose bytes the same files always give: entries in tree order, mtimes
clamped to the build's epoch, numeric owners, no pax extras, hard links kept; uncompressed,
because gzip's bytes depend on the zlib that wrote them.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from sovereign.tools import sha256_file


def tree_order(path: str) -> list[str]:
    # "a", "a/x", "a-b": a directory's entries follow it at once, which GNU tar and umoci
    # need to stamp the directory's own mtime last (plain string order puts "a-b" first).
    return path.split("/")


def _normalised(info: tarfile.TarInfo, name: str, epoch: int) -> tarfile.TarInfo:
    info.name = name.rstrip("/")
    info.mtime = min(int(info.mtime), epoch)
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def layer_from_directory(root: Path, out: Path, epoch: int, subtree: str = "") -> str:
    """A layer of `root/subtree` (its parent directories included), as it will sit at `/`;
    gives the layer's sha256."""
    with _writer(out) as archive:
        first_of: dict[tuple[int, int], str] = {}
        for relative in _paths(root, subtree):
            full = root / relative
            info = _normalised(archive.gettarinfo(str(full), arcname=relative), relative, epoch)
            status = full.lstat()
            if stat.S_ISREG(status.st_mode) and status.st_nlink > 1:
                inode = (status.st_dev, status.st_ino)
                if inode in first_of:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, first_of[inode], 0
                    archive.addfile(info)
                    continue
                first_of[inode] = relative
            if info.isreg():
                with full.open("rb") as data:
                    archive.addfile(info, data)
            else:
                archive.addfile(info)
    return sha256_file(out)


def layer_from_tar(source: Path, out: Path, epoch: int) -> str:
    """`source` (a root file system as mmdebstrap writes it) normalised; gives its sha256."""
    with tarfile.open(source) as original, _writer(out) as archive:
        members = []
        for member in original.getmembers():
            name = member.name.removeprefix("./").lstrip("/")
            if name in ("", "."):
                continue
            if member.islnk():
                member.linkname = member.linkname.removeprefix("./").lstrip("/")
            members.append((name, member))
        for name, member in sorted(members, key=lambda item: tree_order(item[0])):
            data = original.extractfile(member) if member.isreg() else None
            archive.addfile(_normalised(member, name, epoch), data)
    return sha256_file(out)


def _paths(root: Path, subtree: str) -> Iterator[str]:
    parts = [part for part in subtree.strip("/").split("/") if part]
    found = {"/".join(parts[:end]) for end in range(1, len(parts) + 1)}
    for directory, names, files in os.walk(root.joinpath(*parts)):
        for name in (*names, *files):
            found.add(os.path.relpath(os.path.join(directory, name), root))
    yield from sorted(found, key=tree_order)


def _writer(out: Path) -> tarfile.TarFile:
    return tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT)
