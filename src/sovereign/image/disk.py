"""A GPT disk image from partition images, with no loop devices and no mounts.

Each file system is made as a file of its own (`mkfs.ext4 -d` from the rootfs directory,
`mkfs.vfat -C` filled with mtools), then copied into a sparse disk image at the offsets
sgdisk wrote into the partition table. The host needs neither loop devices nor
device-mapper for any of it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
SECTOR = 512
# GPT partition type GUIDs: the UEFI system partition, the discoverable-partitions type of
# an x86-64 root, and plain Linux data (nothing mounts it by type).
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX_DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


class DiskError(Exception):
    """A tool that makes a file system or the partition table failed."""


@dataclass(frozen=True)
class Partition:
    label: str
    type_guid: str
    uuid: str
    size: int
    source: Path | None = None  # the file system image to copy in; None leaves it zeroed


def run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DiskError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def make_ext4(path: Path, tree: Path, size: int, label: str, uuid: str) -> None:
    run(
        [
            "mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid,
            "-d", str(tree), "-E", "root_owner=0:0", str(path), f"{size // 1024}k",
        ]
    )  # fmt: skip


def make_esp(path: Path, size: int, files: dict[str, Path], volume_id: str) -> None:
    """A FAT32 EFI system partition holding `files` (path in the ESP -> source file)."""
    path.unlink(missing_ok=True)
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", volume_id, "-C", str(path), str(size // 1024)])
    made: set[str] = set()
    for target in sorted(files):
        parts = target.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in made:
                run(["mmd", "-i", str(path), f"::/{directory}"])
                made.add(directory)
        run(["mcopy", "-i", str(path), str(files[target]), f"::/{target}"])


def assemble(path: Path, partitions: list[Partition], disk_guid: str) -> list[dict[str, object]]:
    """Write a GPT disk image at `path`; gives each partition's placement for the manifest."""
    start = MIB
    layout: list[tuple[Partition, int]] = []
    for partition in partitions:
        layout.append((partition, start))
        start += -(-partition.size // MIB) * MIB
    total = start + MIB  # room for the backup GPT
    path.unlink(missing_ok=True)
    with path.open("wb") as disk:
        disk.truncate(total)
    argv = ["sgdisk", "--clear", f"--disk-guid={disk_guid}"]
    for number, (partition, offset) in enumerate(layout, start=1):
        argv += [
            f"--new={number}:{offset // SECTOR}:+{partition.size // SECTOR}",
            f"--typecode={number}:{partition.type_guid}",
            f"--change-name={number}:{partition.label}",
            f"--partition-guid={number}:{partition.uuid}",
        ]
    run([*argv, str(path)])
    for partition, offset in layout:
        if partition.source is not None:
            _copy_sparse(partition.source, path, offset, partition.size)
    return [
        {
            "number": number,
            "label": partition.label,
            "type": partition.type_guid,
            "uuid": partition.uuid,
            "offset": offset,
            "size": partition.size,
        }
        for number, (partition, offset) in enumerate(layout, start=1)
    ]


def _copy_sparse(source: Path, disk_path: Path, offset: int, limit: int) -> None:
    """Copy `source` into the disk at `offset`, leaving all-zero blocks as holes."""
    if source.stat().st_size > limit:
        raise DiskError(
            f"{source.name} is {source.stat().st_size} bytes; its partition holds {limit}"
        )
    zero = bytes(MIB)
    with source.open("rb") as src, disk_path.open("r+b") as disk:
        position = offset
        while block := src.read(MIB):
            if block != zero[: len(block)]:
                disk.seek(position)
                disk.write(block)
            position += len(block)
