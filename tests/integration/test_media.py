"""`sovereign media build|write` with real tools and real block devices.

A small but real node image (a FAT32 ESP and an ext4 root laid out by sgdisk, with a
manifest like a build's) and a real signed bundle become USB media; the media's table is
read back with sfdisk and its bundle partition mounted from a loop device and verified.
`media write` is pointed at this machine's own root disk, at loop devices (whole, a
partition, one with a partition mounted, one too small) and at a plain file, and must
refuse each with nothing written; then it writes a loop device and the device must hold
the image exactly. Needs root (loop devices, mount). Every loop device and mount made
here is undone in a `finally`, and the last check is that `losetup` lists none of ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from typer.testing import CliRunner

from sovereign import media
from sovereign.bundle.create import CreateOptions, create_bundle
from sovereign.bundle.manifest import verify
from sovereign.cli import app
from sovereign.image.disk import (
    ESP_TYPE,
    LINUX_DATA_TYPE,
    MIB,
    ROOT_X86_64_TYPE,
    Partition,
    assemble,
    make_esp,
    make_ext4,
)
from sovereign.media import inspect_device, system_disks
from sovereign.mirror.fetch import Fetcher
from sovereign.profile.loader import load_profile
from tests.unit.bundle.test_bundle import _profile as bundle_profile

PROFILE = "radiology-ward"
ROOT_UUID = "4B3C7F5E-1D2A-4C3B-9E8F-0A1B2C3D4E5F"
DISK_GUID = "ABCDEF01-2345-6789-ABCD-EF0123456789"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts need root")


@dataclass(frozen=True)
class Ward:
    root: Path
    profile: Path
    image: Path
    bundle: Path
    key: Ed25519PrivateKey
    public: Path
    media: Path


def invoke(*argv: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(argv), input=input)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stdout, result.stderr


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def sha256(path: Path, size: int | None = None) -> str:
    """Of the whole file, or of a device's first `size` bytes."""
    digest = hashlib.sha256()
    remaining = size
    with path.open("rb") as stream:
        while chunk := stream.read(MIB if remaining is None else min(MIB, remaining)):
            digest.update(chunk)
            remaining = None if remaining is None else remaining - len(chunk)
    return digest.hexdigest()


def table(disk: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(sh("sfdisk", "--json", str(disk)))["partitiontable"]
    return data


def _profile(root: Path, name: str = PROFILE) -> Path:
    """The bundle tests' profile (the air-gapped example, its models from local files so
    nothing is fetched), renamed to `name`."""
    work = root / f"profile-{name}"
    work.mkdir(exist_ok=True)
    path = bundle_profile(work)
    renamed = root / f"{name}.yaml"
    renamed.write_text(path.read_text().replace(f"\nname: {PROFILE}\n", f"\nname: {name}\n"))
    return renamed


def _node_image(root: Path, profile: str) -> Path:
    """A node image directory as `image build` leaves it: disk.raw and manifest.json."""
    work = root / "parts"
    (work / "rootfs/etc").mkdir(parents=True)
    (work / "rootfs/etc/hostname").write_text("ward-gpu-01\n")
    kernel = work / "vmlinuz"
    kernel.write_bytes(b"kernel" * 1000)
    make_esp(work / "esp.img", 40 * MIB, {"EFI/BOOT/BOOTX64.EFI": kernel, "vmlinuz": kernel},
             "1234abcd")  # fmt: skip
    make_ext4(work / "root.img", work / "rootfs", 16 * MIB, "sovereign-root",
              "0E5D2B9A-0A56-4B8F-8F7E-6C3F1D2E4A5B")  # fmt: skip
    image = root / "image"
    image.mkdir()
    partitions = assemble(
        image / "disk.raw",
        [
            Partition("esp", ESP_TYPE, "11111111-2222-3333-4444-555555555555", 40 * MIB,
                      work / "esp.img"),
            Partition("sovereign-root", ROOT_X86_64_TYPE, ROOT_UUID, 16 * MIB, work / "root.img"),
            Partition("sovereign-data", LINUX_DATA_TYPE, "66666666-7777-8888-9999-AAAAAAAAAAAA",
                      8 * MIB),
        ],
        DISK_GUID,
    )  # fmt: skip
    # Attribute bits must carry over too: required (0) on the ESP, grow-file-system (59)
    # on root.
    sh("sgdisk", "--attributes=1:set:0", "--attributes=2:set:59", str(image / "disk.raw"))
    manifest = {
        "format": "sovereign-image/1",
        "profile": profile,
        "kind": "air-gapped",
        "node": "ward-gpu-01",
        "recipe_hash": "ab" * 32,
        "image": {"file": "disk.raw", "sha256": sha256(image / "disk.raw"),
                  "bytes": (image / "disk.raw").stat().st_size},
        "kernel_cmdline": f"root=PARTUUID={ROOT_UUID.lower()} ro quiet",
        "partitions": partitions,
        "variables": "ansible-vars.yml",
    }  # fmt: skip
    (image / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)
    return image


def _bundle(root: Path, profile: Path, key: Ed25519PrivateKey, out: str, base: Path | None) -> Path:
    options = CreateOptions(root / out, key, root / "cache", None, base)
    fetcher = Fetcher(console=Console(force_terminal=False))
    create_bundle(load_profile(profile), profile, options, fetcher, lambda _: None)
    return root / out


@pytest.fixture(scope="module")
def ward(tmp_path_factory: pytest.TempPathFactory) -> Ward:
    root = tmp_path_factory.mktemp("media")
    key = Ed25519PrivateKey.generate()
    public = root / "bundle.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    profile = _profile(root)
    image = _node_image(root, PROFILE)
    bundle = _bundle(root, profile, key, "bundle", None)
    usb = root / "usb.img"
    code, said, complaint = invoke(
        "media", "build", str(profile), "--image", str(image), "--bundle", str(bundle),
        "--out", str(usb), "--trust", str(public),
    )  # fmt: skip
    assert code == 0, complaint
    assert f"✓ bundle {bundle} verified" in said
    assert f"✓ media {usb} for {PROFILE}: 4 partitions" in said
    assert f"sha256 {sha256(usb)}" in said
    return Ward(root, profile, image, bundle, key, public, usb)


@pytest.fixture(scope="module", autouse=True)
def no_loop_device_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    base = str(tmp_path_factory.getbasetemp())
    left = [line for line in sh("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").splitlines()
            if base in line]  # fmt: skip
    assert not left, f"loop devices left attached: {left}"


@contextmanager
def loop(backing: Path, partitions: bool = False) -> Iterator[Path]:
    """A loop device over `backing`, detached afterwards whatever happened."""
    argv = ["losetup", "--find", "--show", *(["--partscan"] if partitions else []), str(backing)]
    device = Path(sh(*argv).strip())
    try:
        if partitions and not list(Path("/sys/block", device.name).glob(f"{device.name}p*")):
            # A kernel without GPT support finds no partitions; partx reads the table itself.
            sh("partx", "--add", str(device))
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)
    assert not sh("losetup", "--associated", str(backing)).strip()


@contextmanager
def mounted(device: Path, at: Path) -> Iterator[Path]:
    at.mkdir(exist_ok=True)
    sh("mount", "-o", "ro", str(device), str(at))
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=False)


def spare(root: Path, name: str, size: int, garbage_at: tuple[int, ...] = ()) -> Path:
    """A sparse backing file, with a MiB of 0xA5 at each offset standing for old contents."""
    path = root / name
    path.unlink(missing_ok=True)
    with path.open("wb") as stream:
        stream.truncate(size)
        for offset in garbage_at:
            stream.seek(offset)
            stream.write(b"\xa5" * MIB)
    return path


# --- media build ----------------------------------------------------------------------------


def test_the_media_carries_the_image_partitions_unchanged(ward: Ward) -> None:
    source, usb = table(ward.image / "disk.raw"), table(ward.media)
    carried = [{k: v for k, v in p.items() if k != "node"} for p in usb["partitions"][:3]]
    assert carried == [{k: v for k, v in p.items() if k != "node"} for p in source["partitions"]]
    assert usb["id"] == DISK_GUID
    assert [p.get("attrs") for p in usb["partitions"][:2]] == ["RequiredPartition", "GUID:59"]
    # The kernel command line's root=PARTUUID= still names the root partition.
    assert usb["partitions"][1]["uuid"] == ROOT_UUID
    assert usb["partitions"][1]["type"] == ROOT_X86_64_TYPE
    bundle = usb["partitions"][3]
    assert bundle["name"] == "sovereign-bundle"
    assert bundle["type"] == LINUX_DATA_TYPE
    assert bundle["start"] % 2048 == 0
    assert usb["lastlba"] >= bundle["start"] + bundle["size"] - 1
    assert "No problems found" in sh("sgdisk", "--verify", str(ward.media))
    assert ward.media.stat().st_blocks * 512 < ward.media.stat().st_size / 2  # still sparse
    assert not list(ward.root.glob(".usb.img.*"))  # no temporary left beside it
    # The root file system is readable where the table says it is.
    root_fs = f"{ward.media}?offset={usb['partitions'][1]['start'] * 512}"
    assert sh("debugfs", "-R", "cat /etc/hostname", root_fs) == "ward-gpu-01\n"


def test_the_bundle_partition_mounts_and_verifies(ward: Ward) -> None:
    with loop(ward.media, partitions=True) as device:
        part = Path(f"{device}p4")
        assert sh("blkid", "-s", "LABEL", "-o", "value", str(part)).strip() == "SOVEREIGN-BUNDLE"
        assert sh("blkid", "-s", "TYPE", "-o", "value", str(part)).strip() == "ext4"
        with mounted(part, ward.root / "stick") as stick:
            # The bundle sits at the root, with nothing beside it (no lost+found).
            assert sorted(p.name for p in stick.iterdir()) == sorted(
                p.name for p in ward.bundle.iterdir()
            )
            result = verify(stick, ward.key.public_key())
            assert result.ok, result.findings
            assert result.blobs_checked == len(list((ward.bundle / "blobs/sha256").iterdir()))


def _build(
    ward: Ward,
    out: Path,
    *extra: str,
    profile: Path | None = None,
    image: Path | None = None,
    bundle: Path | None = None,
) -> tuple[int, str, str]:
    return invoke(
        "media", "build", str(profile or ward.profile), "--image", str(image or ward.image),
        "--bundle", str(bundle or ward.bundle), "--out", str(out), *extra,
    )  # fmt: skip


def _other_image(ward: Ward, profile: str) -> Path:
    other = ward.root / f"image-{profile}"
    if not other.exists():
        other.mkdir()
        sh("cp", "--sparse=always", str(ward.image / "disk.raw"), str(other / "disk.raw"))
        manifest = json.loads((ward.image / "manifest.json").read_text())
        (other / "manifest.json").write_text(json.dumps({**manifest, "profile": profile}))
    return other


def test_build_refuses_an_image_or_bundle_of_another_profile(ward: Ward) -> None:
    out = ward.root / "refused.img"
    code, _, said = _build(ward, out, image=_other_image(ward, "edge-box"))
    assert code == 2
    assert "manifest.json profile is 'edge-box', not 'radiology-ward'" in said

    other = _profile(ward.root, "other-ward")
    code, _, said = _build(ward, out, profile=other, image=_other_image(ward, "other-ward"))
    assert code == 2
    assert (
        f"--bundle {ward.bundle}: bundle.json profile.name is 'radiology-ward', not 'other-ward'"
        in said
    )

    code, _, said = _build(ward, out, image=ward.root)
    assert code == 2
    assert "--image: " in said
    assert "is not a `sovereign image build` output" in said
    assert not out.exists()
    assert not list(ward.root.glob(".refused.img.*"))


def test_build_refuses_a_differential_bundle(ward: Ward) -> None:
    update = _bundle(ward.root, ward.profile, ward.key, "update", ward.bundle)
    assert json.loads((update / "bundle.json").read_text())["base"]["bundle"]
    out = ward.root / "refused.img"
    code, _, said = _build(ward, out, bundle=update)
    assert code == 2
    assert f"--bundle {update}: bundle.json names a base" in said
    assert "a USB stick must carry everything" in said
    assert not out.exists()


def test_build_refuses_an_existing_out_unless_forced(ward: Ward) -> None:
    out = ward.root / "mine.img"
    out.write_text("mine")
    code, _, said = _build(ward, out)
    assert code == 2
    assert f"--out {out} exists; pass --force to replace it" in said
    assert out.read_text() == "mine"
    code, _, said = _build(ward, out, "--force")
    assert code == 0, said
    assert table(out)["partitions"][3]["name"] == "sovereign-bundle"
    out.unlink()


def test_build_refuses_a_bundle_that_does_not_verify(ward: Ward) -> None:
    tampered = ward.root / "tampered"
    shutil.copytree(ward.bundle, tampered)
    (tampered / "stray.txt").write_text("smuggled")
    out = ward.root / "tampered.img"
    code, _, said = _build(ward, out, "--trust", str(ward.public), bundle=tampered)
    assert code == 1
    assert "✗ stray.txt: not listed in bundle.json" in said
    assert "did not verify (1 problem(s)); nothing written" in said
    assert not out.exists()


# --- media write: refusals on real devices --------------------------------------------------


def _system_disk() -> Path:
    source = sh("findmnt", "-n", "-o", "SOURCE", "/").strip()
    if not source.startswith("/dev/"):
        pytest.skip(f"/ is on {source}, not a block device")
    for line in sh("lsblk", "-s", "-r", "-n", "-o", "PATH,TYPE", source).splitlines():
        path, kind = line.split()
        if kind == "disk":
            return Path(path)
    pytest.skip(f"no disk under {source}")


def _first_mib(device: Path) -> bytes | None:
    try:
        with device.open("rb") as stream:
            return stream.read(MIB)
    except PermissionError:
        return None  # a sandbox's device policy may forbid opening it at all


def test_write_refuses_the_system_disk_and_never_opens_it(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = _system_disk()
    before = _first_mib(disk)
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    code, _, said = invoke(
        "media", "write", str(ward.media), str(disk), "--yes", "--allow-non-removable"
    )
    monkeypatch.undo()
    assert code == 2
    assert f"refusing to write to {disk}: it is the system disk (it backs /" in said
    assert "nothing written" in said
    assert str(disk) not in opened
    assert _first_mib(disk) == before


def test_write_refuses_a_regular_file(ward: Ward) -> None:
    target = spare(ward.root, "file.img", 256 * MIB)
    code, _, said = invoke("media", "write", str(ward.media), str(target), "--yes")
    assert code == 2
    assert f"refusing to write to {target}: {target} is not a block device" in said
    assert target.stat().st_blocks == 0


def test_write_refuses_a_disk_that_is_neither_removable_nor_usb(ward: Ward) -> None:
    backing = spare(ward.root, "fixed.img", 256 * MIB, garbage_at=(0,))
    before = sha256(backing)
    with loop(backing) as device:
        facts = inspect_device(device)
        assert (facts.removable, facts.usb, facts.is_partition) == (False, False, False)
        assert facts.model == f"loop device backed by {backing}"
        code, _, said = invoke("media", "write", str(ward.media), str(device), "--yes")
    assert code == 2
    assert f"refusing to write to {device}: it is neither removable nor on a USB bus" in said
    assert "--allow-non-removable" in said
    assert sha256(backing) == before


def test_write_refuses_a_partition_and_a_disk_with_a_partition_mounted(ward: Ward) -> None:
    backing = ward.root / "partitioned.img"
    sh("cp", "--sparse=always", str(ward.media), str(backing))
    before = sha256(backing)
    with loop(backing, partitions=True) as device:
        code, _, said = invoke(
            "media", "write", str(ward.media), f"{device}p1", "--yes", "--allow-non-removable"
        )
        assert code == 2
        assert f"it is a partition of {device.name}; give the whole disk, {device}" in said

        with mounted(Path(f"{device}p2"), ward.root / "mnt") as at:
            code, _, said = invoke(
                "media", "write", str(ward.media), str(device), "--yes", "--allow-non-removable"
            )
            assert code == 2
            assert f"it is in use: {device.name}p2 on {at}" in said
            assert inspect_device(device).mounted == (f"{device.name}p2 on {at}",)
    assert sha256(backing) == before


def test_write_refuses_a_disk_smaller_than_the_image(ward: Ward) -> None:
    backing = spare(ward.root, "small.img", 8 * MIB)
    with loop(backing) as device:
        code, _, said = invoke(
            "media", "write", str(ward.media), str(device), "--yes", "--allow-non-removable"
        )
    assert code == 2
    assert "smaller than the image's" in said
    assert f"({ward.media.stat().st_size} bytes)" in said
    assert backing.stat().st_blocks == 0


def test_write_refuses_a_read_only_disk(ward: Ward) -> None:
    backing = spare(ward.root, "ro.img", 256 * MIB)
    device = Path(sh("losetup", "--find", "--show", "--read-only", str(backing)).strip())
    try:
        code, _, said = invoke(
            "media", "write", str(ward.media), str(device), "--yes", "--allow-non-removable"
        )
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)
    assert code == 2
    assert "it is read-only" in said
    assert backing.stat().st_blocks == 0


# --- media write: confirmation and the write itself -----------------------------------------


def test_write_asks_first_and_no_leaves_the_disk_alone(ward: Ward) -> None:
    backing = spare(ward.root, "ask.img", 256 * MIB, garbage_at=(0, 60 * MIB))
    before = sha256(backing)
    with loop(backing) as device:
        code, said, complaint = invoke(
            "media", "write", str(ward.media), str(device), "--allow-non-removable", input="n\n"
        )
    assert code == 1
    assert f"will replace everything on {device} ({device.name}: loop device backed by" in said
    assert "268.4 MB" in said
    assert f"Erase {device}" in said
    assert f"not confirmed; nothing written to {device}" in complaint
    assert sha256(backing) == before


def test_write_puts_the_image_on_the_disk_exactly(ward: Ward) -> None:
    size = ward.media.stat().st_size
    # Old contents inside the image's holes (the empty data partition) must not survive;
    # past the image's end, the disk is not the image's to touch.
    stale, beyond = 60 * MIB, 200 * MIB
    backing = spare(ward.root, "stick.img", 256 * MIB, garbage_at=(0, stale, beyond))
    with loop(backing) as device:
        code, said, complaint = invoke(
            "media", "write", str(ward.media), str(device), "--yes", "--allow-non-removable"
        )
        assert code == 0, complaint
        assert sha256(device, size) == sha256(ward.media)
        assert [p["name"] for p in table(device)["partitions"]] == [
            "esp", "sovereign-root", "sovereign-data", "sovereign-bundle",
        ]  # fmt: skip
    assert f"✓ wrote {ward.media} to {device}" in said
    assert "MB/s" in said
    assert f"sha256 {sha256(ward.media)} matches" in said
    with backing.open("rb") as stream:
        stream.seek(stale)
        assert stream.read(MIB) == bytes(MIB)
        stream.seek(beyond)
        assert stream.read(MIB) == b"\xa5" * MIB


def test_a_disk_that_reads_back_wrong_is_named_with_the_offset(
    ward: Ward, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing or counterfeit stick stands in as a byte changed on the real device
    between the write and the read-back."""
    real_copy = media._copy

    def copy_then_corrupt(image: Path, fd: int, size: int, progress: Any) -> tuple[str, int]:
        written = real_copy(image, fd, size, progress)
        os.pwrite(fd, b"\xff", 70 * MIB + 5)
        return written

    monkeypatch.setattr(media, "_copy", copy_then_corrupt)
    backing = spare(ward.root, "failing.img", 256 * MIB)
    with loop(backing) as device:
        code, _, said = invoke(
            "media", "write", str(ward.media), str(device), "--yes", "--allow-non-removable"
        )
    assert code == 1
    assert f"{device} reads back sha256 " in said
    assert f"but {ward.media} is {sha256(ward.media)}" in said
    assert f"the first differing MiB starts at byte {70 * MIB}" in said


# --- inspection through sysfs links no real device here has --------------------------------


def _link(at: Path, target: str) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target)


def test_usb_and_system_disks_are_found_through_sysfs_links(tmp_path: Path) -> None:
    """This machine has no USB disk and no root on device-mapper; a sysfs laid out as the
    kernel does for both stands in, around a real loop device's number."""
    fake = tmp_path / "fake"
    sysfs, proc = fake / "sys", fake / "proc"
    usb_disk = "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0"
    backing = spare(tmp_path, "usb.img", 16 * MIB)
    with loop(backing) as device:
        number = f"{os.major(device.stat().st_rdev)}:{os.minor(device.stat().st_rdev)}"
        node = sysfs / usb_disk / "block/sdb"
        for name, value in (("dev", number), ("size", "31260672"), ("removable", "0"),
                            ("ro", "0")):  # fmt: skip
            (node / name).parent.mkdir(parents=True, exist_ok=True)
            (node / name).write_text(value + "\n")
        (node / "holders").mkdir()
        _link(node / "device", "../..")
        (sysfs / usb_disk / "vendor").write_text("SanDisk \n")
        (sysfs / usb_disk / "model").write_text("Ultra Fit       \n")
        _link(sysfs / "dev/block" / number, f"../../{usb_disk}/block/sdb")
        # / on dm-0 (LUKS) over sda2.
        sda = sysfs / "devices/pci0000:00/0000:00:17.0/ata1/host0/block/sda"
        (sda / "sda2").mkdir(parents=True)
        (sda / "sda2/partition").write_text("2\n")
        (sda / "sda2/dev").write_text("8:2\n")
        dm = sysfs / "devices/virtual/block/dm-0"
        (dm / "slaves").mkdir(parents=True)
        _link(dm / "slaves/sda2", "../../../../pci0000:00/0000:00:17.0/ata1/host0/block/sda/sda2")
        _link(sysfs / "dev/block/253:0", "../../devices/virtual/block/dm-0")
        (proc / "self").mkdir(parents=True)
        (proc / "self/mountinfo").write_text(
            "27 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n"
            "28 27 8:2 / /boot\\040old rw - ext4 /dev/sda2 rw\n"
        )
        (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")

        facts = inspect_device(device, sysfs, proc)
        assert system_disks(sysfs, proc) == {"/": {"sda"}}
    assert (facts.name, facts.usb, facts.removable) == ("sdb", True, False)
    assert facts.model == "SanDisk Ultra Fit"
    assert facts.size == 31260672 * 512
    assert facts.system == ()
