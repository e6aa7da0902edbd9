"""USB install media: a node image with its bundle beside it, and a guarded raw write.

`build_media` copies the image's disk.raw whole rather than re-creating its partitions, so
their types, GUIDs, names and attributes are the image's own bytes and the kernel's
root=PARTUUID= still finds root. It drops the old backup GPT, grows the disk, moves the
backup header to the new end and adds one ext4 partition that `mkfs.ext4 -d` fills from
the bundle directory, in place at its offset, so the result stays sparse.

`write_media` refuses any disk it cannot show to be a spare removable one (see
`refusals`), writes every byte of the image, holes as zeros, so nothing of the stick's
old contents survives, then reads the range back and compares sha256.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign.bundle.layout import FORMAT as BUNDLE_FORMAT
from sovereign.bundle.layout import MANIFEST_FILE as BUNDLE_MANIFEST
from sovereign.image.boot import BootError
from sovereign.image.disk import LINUX_DATA_TYPE, MIB, SECTOR, DiskError, run
from sovereign.image.node import BuiltImage, read_image
from sovereign.tools import sha256_file

BUNDLE_LABEL = "SOVEREIGN-BUNDLE"  # the ext4 label: 16 characters, ext4's limit
BUNDLE_PARTITION = "sovereign-bundle"
BLOCK = 4096
# A fixed journal: mkfs's default grows to 1 GiB on large file systems, and this one is
# written once, by mkfs, then read.
JOURNAL = 16 * MIB
CHUNK = 4 * MIB
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi")
TOOLS = ("sgdisk", "sfdisk", "mkfs.ext4", "debugfs")
# <linux/fs.h>: _IO(0x12, 127) zeroes a byte range of a block device, _IO(0x12, 95)
# re-reads its partition table.
BLKZEROOUT = 0x127F
BLKRRPART = 0x125F

Progress = Callable[[str, int], None]  # phase ("write", "verify"), bytes done


class MediaError(Exception):
    """Building or writing the media failed; a build leaves nothing at --out."""


class MediaInputError(MediaError):
    """The request is wrong (an input, the output, the target disk); nothing was written."""


# --- build --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptEntry:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    uuid: str
    name: str
    attrs: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class MediaPlan:
    """Checked inputs for `build_media`: nothing is written until it runs."""

    image: BuiltImage
    table: list[GptEntry]
    bundle: Path
    bundle_manifest: dict[str, Any]
    bundle_digest: str  # sha256 of bundle.json, which the bundle partition's GUID derives from
    out: Path


@dataclass(frozen=True)
class Media:
    path: Path
    size: int
    allocated: int
    sha256: str
    partitions: list[GptEntry]
    bundle_bytes: int


def partition_table(disk: Path) -> list[GptEntry]:
    """The GPT of `disk` as sfdisk reads it; MediaInputError if it holds none."""
    try:
        table = json.loads(run(["sfdisk", "--json", str(disk)]))["partitiontable"]
    except (DiskError, ValueError, KeyError) as error:
        raise MediaInputError(f"{disk}: no readable partition table: {error}") from None
    if table.get("label") != "gpt":
        raise MediaInputError(f"{disk}: a {table.get('label')} partition table, not GPT")
    entries: list[GptEntry] = []
    for item in table.get("partitions", []):
        number = re.search(r"(\d+)$", item["node"])
        entries.append(
            GptEntry(
                int(number.group(1)) if number else len(entries) + 1,
                item["start"], item["size"], item["type"].upper(), item["uuid"].upper(),
                item.get("name", ""), item.get("attrs", ""),
            )
        )  # fmt: skip
    return entries


def plan_media(profile: str, image_dir: Path, bundle: Path, out: Path, force: bool) -> MediaPlan:
    """Check every input against `profile` (a profile's name) before anything is written."""
    try:
        image = read_image(image_dir)
    except BootError as error:
        raise MediaInputError(f"--image: {error}") from None
    built_for = image.manifest.get("profile")
    if built_for != profile:
        raise MediaInputError(
            f"--image {image_dir}: manifest.json profile is {built_for!r}, not {profile!r}"
        )
    table = partition_table(image.disk)
    if not table:
        raise MediaInputError(f"--image {image.disk}: its GPT has no partitions")
    root = re.search(r"root=PARTUUID=([0-9A-Fa-f-]+)", str(image.manifest.get("kernel_cmdline")))
    if root and root.group(1).upper() not in {entry.uuid for entry in table}:
        raise MediaInputError(
            f"--image {image_dir}: manifest.json kernel_cmdline boots root=PARTUUID="
            f"{root.group(1)}, but {image.disk.name} has no such partition"
        )
    manifest, digest = _read_bundle(bundle)
    named = (manifest.get("profile") or {}).get("name")
    if named != profile:
        raise MediaInputError(
            f"--bundle {bundle}: {BUNDLE_MANIFEST} profile.name is {named!r}, not {profile!r}"
        )
    if manifest.get("base"):
        raise MediaInputError(
            f"--bundle {bundle}: {BUNDLE_MANIFEST} names a base "
            f"({manifest['base'].get('bundle')}): a differential bundle needs its base, and a "
            "USB stick must carry everything; make a full bundle (without --base)"
        )
    _check_out(out, force, image.directory, bundle)
    return MediaPlan(image, table, bundle, manifest, digest, out)


def _read_bundle(bundle: Path) -> tuple[dict[str, Any], str]:
    path = bundle / BUNDLE_MANIFEST
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) else error
        raise MediaInputError(f"--bundle {bundle}: not a bundle: {path}: {reason}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise MediaInputError(f"--bundle {bundle}: {path} is not a {BUNDLE_FORMAT} manifest")
    return manifest, hashlib.sha256(data).hexdigest()


def _check_out(out: Path, force: bool, image_dir: Path, bundle: Path) -> None:
    if out.is_dir():
        raise MediaInputError(f"--out {out} is a directory; give the disk image's file name")
    if out.exists() and not force:
        raise MediaInputError(f"--out {out} exists; pass --force to replace it")
    where = out.resolve()
    for source, option in ((bundle, "--bundle"), (image_dir, "--image")):
        if where.is_relative_to(source.resolve()):
            raise MediaInputError(f"--out {out} is inside {option} {source}")


def build_media(plan: MediaPlan) -> Media:
    """Write the media to a temporary file beside --out and rename it into place."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise MediaError(f"{tool} is not installed; run `sovereign tools install`")
    out = plan.out
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(plan.image.disk), str(temporary)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        start = _align(max(entry.end for entry in plan.table) * SECTOR, MIB)
        fs_uuid = _stable_uuid(plan.bundle_digest, "fs")
        size = _make_bundle_fs(temporary, start, plan.bundle, fs_uuid)
        number = max(entry.number for entry in plan.table) + 1
        run(
            [
                "sgdisk", "--move-second-header",
                f"--new={number}:{start // SECTOR}:+{size // SECTOR}",
                f"--typecode={number}:{LINUX_DATA_TYPE}",
                f"--change-name={number}:{BUNDLE_PARTITION}",
                f"--partition-guid={number}:{_stable_uuid(plan.bundle_digest, 'partition')}",
                str(temporary),
            ]
        )  # fmt: skip
        partitions = partition_table(temporary)
        if partitions[: len(plan.table)] != plan.table:
            raise MediaError(
                f"the image's partitions did not carry over unchanged: {plan.table} became "
                f"{partitions[: len(plan.table)]}"
            )
        temporary.chmod(0o644)
        digest = sha256_file(temporary)
        os.replace(temporary, out)
    except (DiskError, subprocess.CalledProcessError, OSError, MediaInputError) as error:
        temporary.unlink(missing_ok=True)
        detail = error.stderr if isinstance(error, subprocess.CalledProcessError) else error
        raise MediaError(f"building {out}: {detail}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    info = out.stat()
    return Media(out, info.st_size, info.st_blocks * 512, digest, partitions, size)


def bundle_fs_estimate(bundle: Path) -> tuple[int, int]:
    """Bytes and inodes for an ext4 that holds `bundle`: its 4 KiB blocks, a block of
    metadata for each file (directory entries, extent tree), the journal, and headroom."""
    data = entries = 0
    for path in bundle.rglob("*"):
        entries += 1
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            data += _align(info.st_size, BLOCK)
    inodes = entries + 64
    size = data + data // 32 + inodes * BLOCK + JOURNAL + 16 * MIB
    return _align(size, MIB), inodes


def _make_bundle_fs(disk: Path, start: int, bundle: Path, fs_uuid: str) -> int:
    """mkfs.ext4 -d at `start` inside `disk`; grows the estimate if mkfs ran out of room."""
    size, inodes = bundle_fs_estimate(bundle)
    for attempt in range(3):
        # Truncating drops the old backup GPT and anything a failed try left past `start`.
        os.truncate(disk, start)
        os.truncate(disk, start + size + MIB)  # the last MiB holds the new backup GPT
        try:
            run(
                [
                    "mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-m", "0", "-N", str(inodes),
                    "-J", f"size={JOURNAL // MIB}", "-L", BUNDLE_LABEL, "-U", fs_uuid,
                    "-E", f"offset={start},root_owner=0:0", "-d", str(bundle),
                    str(disk), f"{size // 1024}k",
                ]
            )  # fmt: skip
            break
        except DiskError as error:
            if attempt == 2 or not re.search(r"(?i)no space|could not allocate", str(error)):
                raise
            size, inodes = _align(size + size // 2, MIB), inodes * 2
    # `bundle verify` refuses any directory the bundle does not list, lost+found included;
    # e2fsck needs it only to reconnect orphans, and recreates it then.
    run(["debugfs", "-w", "-R", "rmdir /lost+found", f"{disk}?offset={start}"])
    return size


def _stable_uuid(bundle_digest: str, name: str) -> str:
    """Media made from the same bundle get the same GUIDs, so two builds compare equal."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sovereign-media:{bundle_digest}:{name}")).upper()


def _align(value: int, unit: int) -> int:
    return -(-value // unit) * unit


# --- the target disk ----------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDevice:
    path: Path
    name: str  # the kernel's name: sdb, loop3, nvme0n1p2
    size: int  # bytes
    removable: bool
    usb: bool
    read_only: bool
    disk: str | None  # the whole disk, when `path` is one of its partitions
    mounted: tuple[str, ...]  # "sdb1 on /media/x", "sdb2 as swap"
    holders: tuple[str, ...]  # "dm-0 holds sdb1"
    system: tuple[str, ...]  # which of /, /boot, /boot/efi this disk backs
    model: str  # vendor and model, or a loop device's backing file

    @property
    def is_partition(self) -> bool:
        return self.disk is not None


def inspect_device(
    path: Path, sysfs: Path = Path("/sys"), proc: Path = Path("/proc")
) -> BlockDevice:
    """What sysfs and /proc say about the block device at `path`; reads nothing of it."""
    try:
        info = path.stat()
    except OSError as error:
        raise MediaInputError(f"{path}: {error.strerror}") from None
    if not stat.S_ISBLK(info.st_mode):
        raise MediaInputError(f"{path} is not a block device")
    node = _sysfs_node(sysfs, _devno(info.st_rdev))
    if node is None:
        raise MediaInputError(f"{path}: sysfs has no block device {_devno(info.st_rdev)}")
    is_partition = (node / "partition").exists()
    disk = node.parent if is_partition else node
    parts = [disk, *sorted(p for p in disk.iterdir() if (p / "partition").exists())]
    numbers = {_read(p / "dev"): p.name for p in parts}
    return BlockDevice(
        path=path,
        name=node.name,
        size=int(_read(node / "size") or 0) * SECTOR,
        removable=_read(disk / "removable") == "1",
        usb=_on_usb(sysfs, disk),
        read_only=_read(node / "ro") == "1" or _read(disk / "ro") == "1",
        disk=disk.name if is_partition else None,
        mounted=tuple(_mounted(proc, numbers)),
        holders=tuple(
            f"{holder.name} holds {part.name}"
            for part in parts
            for holder in sorted((part / "holders").glob("*"))
        ),
        system=tuple(
            mount for mount, disks in system_disks(sysfs, proc).items() if disk.name in disks
        ),
        model=_model(disk),
    )


def refusals(device: BlockDevice, image_size: int, allow_non_removable: bool) -> list[str]:
    """Every reason not to overwrite `device` with an image of `image_size` bytes."""
    if device.is_partition:
        return [f"it is a partition of {device.disk}; give the whole disk, /dev/{device.disk}"]
    reasons = []
    if device.system:
        reasons.append(f"it is the system disk (it backs {', '.join(device.system)})")
    if device.mounted:
        reasons.append(f"it is in use: {', '.join(device.mounted)}")
    if device.holders:
        reasons.append(
            f"it is held by device-mapper, LVM or md: {', '.join(device.holders)}; stop those first"
        )
    if not (device.removable or device.usb or allow_non_removable):
        reasons.append(
            "it is neither removable nor on a USB bus (pass --allow-non-removable "
            "if you really mean this disk)"
        )
    if device.read_only:
        reasons.append("it is read-only")
    if device.size < image_size:
        reasons.append(
            f"it is {human_size(device.size)} ({device.size} bytes), smaller than the image's "
            f"{human_size(image_size)} ({image_size} bytes)"
        )
    return reasons


def system_disks(sysfs: Path = Path("/sys"), proc: Path = Path("/proc")) -> dict[str, set[str]]:
    """The whole disks under each of /, /boot and /boot/efi, through dm and md to their
    slaves, so a root on LVM on LUKS on sda2 still names sda."""
    found: dict[str, set[str]] = {}
    for mount in _mountinfo(proc):
        if mount.point in SYSTEM_MOUNTS:
            # A later line for the same point shadows an earlier one.
            found[mount.point] = {d for n in mount.numbers for d in _disks_under(sysfs, n)}
    return {point: disks for point, disks in found.items() if disks}


@dataclass(frozen=True)
class _Mount:
    point: str
    numbers: tuple[str, ...]  # major:minor; more than one when the source names a device


def _mountinfo(proc: Path) -> Iterator[_Mount]:
    for line in _read(proc / "self/mountinfo").splitlines():
        fields, _, tail = line.partition(" - ")
        left, right = fields.split(), tail.split()
        if len(left) < 5 or len(right) < 2:
            continue
        numbers = [left[2]]
        # btrfs, zfs and overlay show an anonymous 0:N; their source names the device.
        source = _devno_of(_unescape(right[1]))
        if source is not None:
            numbers.append(source)
        yield _Mount(_unescape(left[4]), tuple(numbers))


def _mounted(proc: Path, numbers: dict[str, str]) -> Iterator[str]:
    for mount in _mountinfo(proc):
        for number in mount.numbers:
            if number in numbers:
                yield f"{numbers[number]} on {mount.point}"
                break
    for line in _read(proc / "swaps").splitlines()[1:]:
        if not line.split():
            continue
        swap = _devno_of(_unescape(line.split()[0]), of_file=True)
        if swap in numbers:
            yield f"{numbers[swap]} as swap"


def _disks_under(sysfs: Path, number: str) -> set[str]:
    node = _sysfs_node(sysfs, number)
    return _disks_of(node) if node is not None else set()


def _disks_of(node: Path) -> set[str]:
    disk = node.parent if (node / "partition").exists() else node
    # slaves/ links to the sysfs node of each device a dm or md device is made from.
    slaves = sorted((node / "slaves").glob("*")) + sorted((disk / "slaves").glob("*"))
    if not slaves:
        return {disk.name}
    return {name for slave in slaves for name in _disks_of(slave.resolve())}


def _sysfs_node(sysfs: Path, number: str) -> Path | None:
    link = sysfs / "dev/block" / number
    return link.resolve() if number and link.exists() else None


def _on_usb(sysfs: Path, disk: Path) -> bool:
    device = disk / "device"
    resolved = (device if device.exists() else disk).resolve()
    try:
        parts = resolved.relative_to(sysfs.resolve()).parts
    except ValueError:
        parts = resolved.parts
    return any(part.startswith("usb") for part in parts)


def _model(disk: Path) -> str:
    named = " ".join(
        text for text in (_read(disk / "device/vendor"), _read(disk / "device/model")) if text
    )
    backing = _read(disk / "loop/backing_file")
    return named or (f"loop device backed by {backing}" if backing else "unknown model")


def _devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _devno_of(path: str, of_file: bool = False) -> str | None:
    """major:minor of a device node; with `of_file`, of the file system holding a file."""
    if not path.startswith("/"):
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(info.st_mode):
        return _devno(info.st_rdev)
    return _devno(info.st_dev) if of_file else None


def _unescape(text: str) -> str:
    """/proc writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def human_size(size: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def describe(device: BlockDevice) -> str:
    return f"{device.path} ({device.name}: {device.model}, {human_size(device.size)})"


# --- write --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str
    zeroed: int  # bytes of holes and zero blocks, written as zeros by BLKZEROOUT or plainly
    write_seconds: float
    verify_seconds: float


def write_media(
    image: Path, device: BlockDevice, progress: Progress = lambda _phase, _done: None
) -> Written:
    """Write `image` to the start of `device`, fsync, read it back and compare sha256."""
    size = image.stat().st_size
    started = time.monotonic()
    try:
        # O_EXCL on a block device fails with EBUSY while anything has it mounted or
        # claimed: it closes the window between `inspect_device` and this open.
        fd = os.open(device.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.EBUSY:
            raise MediaInputError(
                f"{device.path} is in use (mounted or claimed since it was checked); "
                "nothing written"
            ) from None
        raise MediaError(f"opening {device.path}: {error.strerror}") from None
    try:
        if os.lseek(fd, 0, os.SEEK_END) < size:
            raise MediaInputError(f"{device.path} is smaller than {image}; nothing written")
        digest, zeroed = _copy(image, fd, size, progress)
        os.fsync(fd)
    except OSError as error:
        raise MediaError(f"writing {device.path}: {error.strerror}") from None
    finally:
        os.close(fd)
    written = time.monotonic()
    back = _device_sha256(device.path, size, progress)
    if back != digest:
        offset = _first_difference(image, device.path, size)
        where = f"; the first differing MiB starts at byte {offset}" if offset is not None else ""
        raise MediaError(
            f"{device.path} reads back sha256 {back}, but {image} is {digest}{where}; "
            "the stick may be failing or counterfeit"
        )
    _reread_partitions(device.path)
    return Written(size, digest, zeroed, written - started, time.monotonic() - written)


def _copy(image: Path, fd: int, size: int, progress: Progress) -> tuple[str, int]:
    digest = hashlib.sha256()
    zero_start = zeroed = offset = 0
    with image.open("rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            if chunk.count(0) != len(chunk):
                _zero(fd, zero_start, offset - zero_start)
                zeroed += offset - zero_start
                _pwrite_all(fd, chunk, offset)
                zero_start = offset + len(chunk)
            offset += len(chunk)
            progress("write", offset)
    _zero(fd, zero_start, size - zero_start)
    return digest.hexdigest(), zeroed + size - zero_start


def _zero(fd: int, start: int, length: int) -> None:
    """Zero a range: BLKZEROOUT where the device offers it (a loop device punches holes in
    its backing file; a stick may unmap), else plain writes of zeros."""
    if length <= 0:
        return
    if start % SECTOR == 0 and length % SECTOR == 0:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", start, length))
            return
        except OSError:
            pass
    zeros = bytes(CHUNK)
    for offset in range(start, start + length, CHUNK):
        _pwrite_all(fd, zeros[: min(CHUNK, start + length - offset)], offset)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _device_sha256(path: Path, size: int, progress: Progress) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Drop the cached pages just written, so this reads what the device holds.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        offset = 0
        while offset < size and (chunk := os.pread(fd, min(CHUNK, size - offset), offset)):
            digest.update(chunk)
            offset += len(chunk)
            progress("verify", offset)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _first_difference(image: Path, device: Path, size: int) -> int | None:
    """The offset of the first MiB that differs; only run once the sha256 disagreed."""
    try:
        with image.open("rb") as left, device.open("rb") as right:
            for offset in range(0, size, MIB):
                if left.read(MIB) != right.read(MIB):
                    return offset
    except OSError:
        return None
    return None


def _reread_partitions(path: Path) -> None:
    """Ask the kernel to read the new partition table, so the bundle partition shows up
    without replugging; best effort, the media is already written and checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, BLKRRPART)
    except OSError:
        pass
    finally:
        os.close(fd)
