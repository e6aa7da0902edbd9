"""`sovereign image build` and `sovereign image boot`: make a node image and run it.

Exit codes: 0 done; 1 the build, boot or first-boot roles failed; 2 bad input.
"""

from __future__ import annotations

import signal
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.output import EXIT_FAILED, console, errors, fail
from sovereign.cli.profile import load_or_exit
from sovereign.image.boot import BootedNode, BootError
from sovereign.image.build import DISK, BuildError, BuildInputError, BuildOptions, build_image
from sovereign.image.node import BuiltImage, booted, exports, read_image
from sovereign.image.provision import PlaybookRun, ProvisionError
from sovereign.image.recipe import RecipeError

image_app = typer.Typer(help="Build node images and boot them under QEMU.", no_args_is_help=True)
app.add_typer(image_app, name="image")


class Accel(StrEnum):
    auto = "auto"
    tcg = "tcg"
    kvm = "kvm"


@image_app.command("build")
def build(
    profile: Annotated[Path, typer.Argument(help="the node profile (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="where the image and its manifest go")],
    node: Annotated[
        str | None, typer.Option("--node", help="the profile node to build for (default: first)")
    ] = None,
    without_role: Annotated[
        list[str] | None,
        typer.Option("--without-role", help="leave a role out (recorded in the manifest)"),
    ] = None,
    admin_key: Annotated[
        list[Path] | None,
        typer.Option("--admin-key", help="an extra OpenSSH public key file for the admin user"),
    ] = None,
    qcow2: Annotated[bool, typer.Option("--qcow2", help="also write disk.qcow2")] = False,
) -> None:
    """Build the profile's Debian node image (cached by recipe hash)."""
    loaded = load_or_exit(profile)
    keys = tuple(_public_key(path) for path in admin_key or [])
    options = BuildOptions(
        node=node, disabled_roles=tuple(without_role or []), admin_keys=keys, qcow2=qcow2
    )
    try:
        result = build_image(
            loaded, out, options, log=lambda line: errors.print(line, markup=False)
        )
    except (BuildInputError, RecipeError) as error:
        raise fail(str(error)) from None
    except BuildError as error:
        raise fail(str(error), EXIT_FAILED) from None
    manifest = result.manifest
    source = "from the cache" if result.cached else "built"
    console.print(
        f"[green]✓[/green] image for {manifest['profile']} ({manifest['node']}) {source} in "
        f"{result.seconds:.0f} s: {out / DISK}"
    )
    console.print(f"  sha256 {manifest['image']['sha256']}")
    console.print(f"  recipe {manifest['recipe_hash']}")
    roles = manifest["roles"]
    console.print(
        f"  {len(manifest['packages'])} packages; roles applied: {', '.join(roles['applied'])}; "
        f"at first boot: {', '.join(roles['at_first_boot']) or 'none'}"
        + (f"; left out: {', '.join(roles['disabled'])}" if roles["disabled"] else "")
    )


def _public_key(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as error:
        raise fail(f"--admin-key {path}: {error.strerror}") from None
    if not text.startswith(("ssh-", "ecdsa-", "sk-")) or "\n" in text:
        raise fail(f"--admin-key {path}: not one OpenSSH public key line")
    return text


@image_app.command("boot")
def boot_command(
    image: Annotated[Path, typer.Argument(help="an image build directory (or its disk.raw)")],
    identity: Annotated[
        Path, typer.Option("--identity", help="the ssh private key of an admin key in the image")
    ],
    state: Annotated[
        Path | None,
        typer.Option("--state", help="an empty directory for this boot (default: a new temp dir)"),
    ] = None,
    accel: Annotated[Accel, typer.Option("--accel", help="QEMU accelerator")] = Accel.auto,
    provision: Annotated[
        bool, typer.Option("--provision/--no-provision", help="run the first-boot roles")
    ] = True,
) -> None:
    """Boot an image under QEMU with a fresh swtpm, OVMF and two egress canaries; runs until
    Ctrl-C or SIGTERM."""
    if not identity.is_file():
        raise fail(f"--identity {identity}: no such file")
    try:
        built = read_image(image)
    except BootError as error:
        raise fail(str(error)) from None
    directory = state or Path(tempfile.mkdtemp(prefix="sovereign-boot-"))
    try:
        with booted(built, directory, identity, accel.value, provision) as (node, run):
            _describe(node, built, run)
            _wait_for_stop()
    except BootError as error:
        raise fail(str(error), EXIT_FAILED) from None
    except ProvisionError as error:
        raise fail(f"first-boot roles: {error}", EXIT_FAILED) from None
    console.print("node stopped")


def _describe(node: BootedNode, image: BuiltImage, run: PlaybookRun | None) -> None:
    config = node.write_ssh_config()
    console.print(
        f"[green]✓[/green] {image.manifest['node']} is up under {node.accelerator.upper()}: "
        f"ssh after {node.boot_seconds:.0f} s"
        + (f", first-boot roles in {node.provision_seconds:.0f} s" if run else "")
    )
    console.print(f"  ssh -F {config} node")
    for name, canary in sorted(node.canaries.items()):
        console.print(f"  {name} canary: 127.0.0.1:{canary.port}, connections in {canary.log}")
    if run:
        console.print(f"  operator exports (recovery key, AK, EK certificate): {exports(node)}")
    console.print(f"  state: {node.state}; Ctrl-C stops the node")


def _wait_for_stop() -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return
