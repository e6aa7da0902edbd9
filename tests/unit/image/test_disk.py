"""The GPT disk is laid out from partition images with the real tools (sgdisk, mkfs.ext4,
mkfs.vfat, mtools) and read back with others (sfdisk, debugfs, mtype)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sovereign.image.disk import (
    ESP_TYPE,
    LINUX_DATA_TYPE,
    MIB,
    ROOT_X86_64_TYPE,
    DiskError,
    Partition,
    assemble,
    make_esp,
    make_ext4,
)

ROOT_UUID = "4B3C7F5E-1D2A-4C3B-9E8F-0A1B2C3D4E5F"


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("ward-01\n")
    (tree / "usr/bin").mkdir(parents=True)
    tool = tree / "usr/bin/tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o4755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel" * 1000)
    make_ext4(
        tmp_path / "root.img",
        tree,
        64 * MIB,
        "sovereign-root",
        "0e5d2b9a-0a56-4b8f-8f7e-6c3f1d2e4a5b",
    )
    make_esp(
        tmp_path / "esp.img",
        40 * MIB,
        {"EFI/BOOT/BOOTX64.EFI": kernel, "vmlinuz": kernel},
        "1234abcd",
    )
    esp_uuid = "11111111-2222-3333-4444-555555555555"
    data_uuid = "66666666-7777-8888-9999-AAAAAAAAAAAA"
    layout = assemble(
        tmp_path / "disk.raw",
        [
            Partition("esp", ESP_TYPE, esp_uuid, 40 * MIB, tmp_path / "esp.img"),
            Partition(
                "sovereign-root", ROOT_X86_64_TYPE, ROOT_UUID, 64 * MIB, tmp_path / "root.img"
            ),
            Partition("sovereign-data", LINUX_DATA_TYPE, data_uuid, 16 * MIB),
        ],
        disk_guid="ABCDEF01-2345-6789-ABCD-EF0123456789",
    )
    return tmp_path / "disk.raw", layout


def test_the_partition_table_has_the_labels_types_and_uuids_asked_for(
    disk: tuple[Path, list[dict[str, object]]],
) -> None:
    path, layout = disk
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, check=True).stdout
    )
    partitions = table["partitiontable"]["partitions"]

    assert table["partitiontable"]["label"] == "gpt"
    assert [p["name"] for p in partitions] == ["esp", "sovereign-root", "sovereign-data"]
    assert [p["type"] for p in partitions] == [ESP_TYPE, ROOT_X86_64_TYPE, LINUX_DATA_TYPE]
    assert partitions[1]["uuid"] == ROOT_UUID
    assert [p["start"] * 512 for p in partitions] == [entry["offset"] for entry in layout]
    assert all(int(str(entry["offset"])) % MIB == 0 for entry in layout)


def test_the_file_systems_are_readable_at_their_offsets(
    disk: tuple[Path, list[dict[str, object]]], tmp_path: Path
) -> None:
    path, layout = disk
    esp, root, data = layout
    extracted = tmp_path / "root-back.img"
    with path.open("rb") as source:
        source.seek(int(str(root["offset"])))
        extracted.write_bytes(source.read(int(str(root["size"]))))
    hostname = subprocess.run(
        ["debugfs", "-R", "cat /etc/hostname", str(extracted)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mode = subprocess.run(
        ["debugfs", "-R", "stat /usr/bin/tool", str(extracted)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{path}@@{esp['offset']}", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert hostname == "ward-01\n"
    assert "Mode:  04755" in mode  # setuid bits survive mkfs.ext4 -d, so the audit sees them
    assert "BOOTX64.EFI" in listing
    with path.open("rb") as source:
        source.seek(int(str(data["offset"])))
        assert source.read(MIB) == bytes(MIB)  # the data partition is left empty for LUKS


def test_the_disk_stays_sparse(disk: tuple[Path, list[dict[str, object]]]) -> None:
    path, _ = disk
    assert path.stat().st_blocks * 512 < path.stat().st_size / 2


def test_a_file_system_larger_than_its_partition_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    big.write_bytes(b"x" * (2 * MIB))
    with pytest.raises(DiskError, match=r"big\.img is 2097152 bytes; its partition holds 1048576"):
        assemble(
            tmp_path / "disk.raw",
            [Partition("root", ROOT_X86_64_TYPE, ROOT_UUID, MIB, big)],
            ROOT_UUID,
        )


def test_a_failing_tool_names_itself_and_its_error(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"mkfs.ext4 failed \(\d+\): .*"):
        make_ext4(tmp_path / "root.img", tmp_path / "missing-tree", 16 * MIB, "root", ROOT_UUID)
