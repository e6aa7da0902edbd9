"""`sovereign media build` and `sovereign media write`: a bootable USB stick that carries
the node image and its bundle.

Exit codes: 0 done; 1 the build or the write failed, the bundle did not verify, or the
write was not confirmed; 2 bad input or a target disk refused. Nothing is written on 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress as Bar
from sovereign_gateway.contract import KeyFileError, load_public_key

from sovereign.bundle.manifest import verify
from sovereign.cli import app
from sovereign.cli.output import EXIT_FAILED, console, errors, fail
from sovereign.cli.profile import load_or_exit
from sovereign.image.disk import ESP_TYPE, LINUX_DATA_TYPE, MIB, ROOT_X86_64_TYPE, SECTOR
from sovereign.media import (
    BUNDLE_PARTITION,
    Media,
    MediaError,
    MediaInputError,
    Progress,
    build_media,
    describe,
    human_size,
    inspect_device,
    plan_media,
    refusals,
    write_media,
)

media_app = typer.Typer(
    help="Make USB install media (node image + bundle) and write them to a stick.",
    no_args_is_help=True,
)
app.add_typer(media_app, name="media")

TYPE_NAMES = {ESP_TYPE: "EFI system", ROOT_X86_64_TYPE: "root x86-64", LINUX_DATA_TYPE: "data"}


@media_app.command("build")
def build(
    profile: Annotated[Path, typer.Argument(help="the node profile (YAML)")],
    image: Annotated[Path, typer.Option("--image", help="a `sovereign image build` directory")],
    bundle: Annotated[Path, typer.Option("--bundle", help="a full `sovereign bundle` directory")],
    out: Annotated[Path, typer.Option("--out", help="the disk image to write (e.g. usb.img)")],
    trust: Annotated[
        Path | None,
        typer.Option("--trust", help="verify the bundle against this Ed25519 public key first"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace --out if it exists")] = False,
) -> None:
    """Write a GPT disk image: the node image's partitions, then the bundle's (ext4)."""
    loaded = load_or_exit(profile)
    try:
        trusted = load_public_key(trust) if trust is not None else None
    except KeyFileError as error:
        raise fail(f"--trust: {error}") from None
    try:
        plan = plan_media(loaded.name, image, bundle, out, force)
    except MediaInputError as error:
        raise fail(str(error)) from None
    if trusted is not None:
        result = verify(bundle, trusted)
        for finding in result.findings:
            errors.print(f"✗ {finding}", markup=False)
        if not result.ok:
            raise fail(
                f"--bundle {bundle} did not verify ({len(result.findings)} problem(s)); "
                "nothing written",
                EXIT_FAILED,
            )
        console.print(
            f"✓ bundle {bundle} verified: {result.blobs_checked} blobs, signed by {result.signer}",
            markup=False,
        )
    try:
        media = build_media(plan)
    except MediaInputError as error:
        raise fail(str(error)) from None
    except MediaError as error:
        raise fail(str(error), EXIT_FAILED) from None
    _summary(media, loaded.name, plan.bundle_digest)


def _summary(media: Media, profile: str, bundle_digest: str) -> None:
    console.print(
        f"✓ media {media.path} for {profile}: {len(media.partitions)} partitions, "
        f"{human_size(media.size)} ({human_size(media.allocated)} allocated)",
        markup=False,
    )
    for entry in media.partitions:
        kind = (
            f"bundle, bundle.json sha256:{bundle_digest[:12]}…"
            if entry.name == BUNDLE_PARTITION
            else TYPE_NAMES.get(entry.type, entry.type)
        )
        console.print(
            f"  {entry.number}  {entry.name:<18} {entry.size * SECTOR / MIB:>9.1f} MiB  "
            f"at {entry.start * SECTOR // MIB:>6} MiB  {entry.uuid}  {kind}",
            markup=False,
        )
    console.print(f"  sha256 {media.sha256}", markup=False)
    console.print(f"  write it with: sovereign media write {media.path} /dev/sdX", markup=False)


@media_app.command("write")
def write(
    image: Annotated[Path, typer.Argument(help="a `sovereign media build --out` disk image")],
    device: Annotated[Path, typer.Argument(help="the whole USB disk, e.g. /dev/sdb")],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="do not ask before erasing the disk")
    ] = False,
    allow_non_removable: Annotated[
        bool,
        typer.Option(
            "--allow-non-removable", help="also write to a disk that is neither removable nor USB"
        ),
    ] = False,
) -> None:
    """Write the image to a whole disk, then read it back and compare sha256."""
    if not image.is_file():
        raise fail(f"{image}: no such file")
    size = image.stat().st_size
    try:
        target = inspect_device(device)
    except MediaInputError as error:
        raise fail(f"refusing to write to {device}: {error}; nothing written") from None
    reasons = refusals(target, size, allow_non_removable)
    if reasons:
        raise fail(f"refusing to write to {device}: {'; '.join(reasons)}; nothing written")
    if not yes:
        console.print(
            f"{image} ({human_size(size)}) will replace everything on {describe(target)}",
            markup=False,
        )
        if not typer.confirm(f"Erase {device} ({target.model})?", default=False):
            raise fail(f"not confirmed; nothing written to {device}", EXIT_FAILED)
    try:
        with _progress(size) as progress:
            written = write_media(image, target, progress)
    except MediaInputError as error:
        raise fail(str(error)) from None
    except MediaError as error:
        raise fail(str(error), EXIT_FAILED) from None
    console.print(
        f"✓ wrote {image} to {device}: {human_size(written.size)} in "
        f"{written.write_seconds:.1f} s ({_rate(written.size, written.write_seconds)}, "
        f"{human_size(written.zeroed)} of it zeros)",
        markup=False,
    )
    console.print(
        f"  read back in {written.verify_seconds:.1f} s "
        f"({_rate(written.size, written.verify_seconds)}): sha256 {written.sha256} matches",
        markup=False,
    )


def _rate(size: int, seconds: float) -> str:
    return f"{size / max(seconds, 1e-6) / 1e6:.0f} MB/s"


@contextmanager
def _progress(size: int) -> Iterator[Progress]:
    """A bar on a terminal; nothing in a log, where the final line says it all."""
    if not errors.is_terminal:
        yield lambda _phase, _done: None
        return
    with Bar(console=errors, transient=True) as bar:
        tasks = {phase: bar.add_task(phase, total=size) for phase in ("write", "verify")}
        yield lambda phase, done: bar.update(tasks[phase], completed=done)
