"""`sovereign bundle split|join`: a bundle as volumes that each fit the media at hand.

`split` exits 0 with the volumes written, 2 on bad input. `join` exits 0 with the bundle
rebuilt and verified, 1 when a volume or the bundle is refused, 2 on bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sovereign_gateway.contract import KeyFileError, load_public_key

from sovereign.bundle.layout import BundleError
from sovereign.bundle.manifest import verify
from sovereign.bundle.volumes import join, parse_size, split
from sovereign.cli.bundle import KeyOption, bundle_app, signing_key
from sovereign.cli.output import EXIT_FAILED, console, errors, fail


@bundle_app.command("split")
def split_command(
    bundle: Annotated[Path, typer.Argument(help="the bundle directory")],
    volume_size: Annotated[
        str, typer.Option("--volume-size", help="the largest volume, such as 4G or 700M")
    ],
    out: Annotated[Path, typer.Option("--out", help="a new directory for the volumes")],
    key: KeyOption = None,
) -> None:
    """Cut a bundle into signed volumes of at most --volume-size each."""
    if out.exists():
        raise fail(f"--out {out} exists; give a new directory")
    try:
        limit = parse_size(volume_size)
        volumes, digest = split(bundle, out, limit, signing_key(key))
    except BundleError as error:
        raise fail(str(error)) from None
    for volume in volumes:
        console.print(f"  {volume.name}  {volume.size:>14,} bytes  {volume.sha256}", markup=False)
    console.print(f"✓ {len(volumes)} volume(s) in {out}, carrying bundle {digest}", markup=False)


@bundle_app.command("join")
def join_command(
    volumes: Annotated[Path, typer.Argument(help="the directory holding the volumes")],
    out: Annotated[Path, typer.Option("--out", help="a new directory for the bundle")],
    trust: Annotated[
        Path, typer.Option("--trust", help="the signer's Ed25519 public key (PEM) you trust")
    ],
) -> None:
    """Check every volume, rebuild the bundle from them, and verify it."""
    if not volumes.is_dir():
        raise fail(f"{volumes} is not a directory")
    if out.exists():
        raise fail(f"--out {out} exists; give a new directory")
    try:
        trusted = load_public_key(trust)
    except KeyFileError as error:
        raise fail(f"--trust: {error}") from None
    try:
        digest = join(volumes, out, trusted)
    except BundleError as error:
        errors.print(f"✗ {error}", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    result = verify(out, trusted)
    for finding in result.findings:
        errors.print(f"✗ {finding}", markup=False)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)
    console.print(f"✓ bundle {out} rebuilt and verified ({digest})", markup=False)
