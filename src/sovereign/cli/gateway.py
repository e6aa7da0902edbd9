"""`sovereign gateway wheels|image`: the gateway as a node installs it, or a cluster runs it;
exit 0 written whole, 1 a fetch or build failed (nothing written), 2 bad input.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.bundle import mirror_cache
from sovereign.cli.output import EXIT_FAILED, console, errors, fail
from sovereign.cli.profile import load_or_exit
from sovereign.distribution.image import SBOM, ImageError, build_gateway_image
from sovereign.distribution.wheelhouse import build_wheelhouse, wheelhouse_spec
from sovereign.mirror.fetch import DownloadsFailed, Fetcher, GaveUp, HttpStatusError, MirrorError
from sovereign.profile.model import Profile

gateway_app = typer.Typer(
    help="Build the gateway for nodes (a wheelhouse) and clusters (an OCI image).",
    no_args_is_help=True,
)
app.add_typer(gateway_app, name="gateway")

IndexOption = Annotated[
    str | None,
    typer.Option(
        "--index",
        help="a PEP 691 or PEP 503 index; default the profile's bundle.wheels.index, or PyPI",
    ),
]


def _log(line: str) -> None:
    errors.print(line, markup=False)


def _cache(profile: Profile) -> Path:
    """Where the wheels are kept between runs: the profile's PyPI mirror, as for bundles."""
    return mirror_cache() / profile.name / "pypi"


def _new_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"--out {out} exists and is not an empty directory")


@gateway_app.command("wheels")
def wheels(
    profile: Annotated[Path, typer.Argument(help="the node profile (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="a new directory for the wheelhouse")],
    index: IndexOption = None,
) -> None:
    """Every wheel the gateway needs on the profile's nodes, with a hash-locked
    requirements.txt for `pip install --no-index --require-hashes`."""
    loaded = load_or_exit(profile)
    _new_directory(out)
    spec = wheelhouse_spec(loaded, profile, index)
    try:
        with Fetcher(console=errors) as fetcher:
            built = build_wheelhouse(spec, out, _cache(loaded), fetcher, _log)
    except (DownloadsFailed, GaveUp, HttpStatusError) as error:
        raise fail(str(error), EXIT_FAILED) from None
    except MirrorError as error:
        raise fail(str(error), EXIT_FAILED) from None
    size = sum(wheel.size for wheel in built.wheels) / 1e6
    console.print(
        f"✓ wheelhouse {out}: {len(built.wheels)} wheels, {size:.1f} MB, for "
        f"{', '.join(map(str, spec.targets))}",
        markup=False,
    )
    console.print(
        f"  on the node: pip install --no-index --require-hashes --find-links {out} "
        f"-r {out / 'requirements.txt'}",
        markup=False,
    )


@gateway_app.command("image")
def image(
    profile: Annotated[Path, typer.Argument(help="the node profile (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="a new directory for the OCI image layout")],
    wheelhouse: Annotated[
        Path | None,
        typer.Option("--wheelhouse", help="a `sovereign gateway wheels` output to install"),
    ] = None,
    index: IndexOption = None,
) -> None:
    """The gateway as an OCI image layout (Debian bookworm, the wheelhouse in a venv, a
    non-root user, `sovereign-gateway` as the entrypoint) with a CycloneDX SBOM."""
    loaded = load_or_exit(profile)
    _new_directory(out)
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise fail(f"--wheelhouse {wheelhouse} is not a directory")
    try:
        with tempfile.TemporaryDirectory(prefix="sovereign-image-wheels-") as work:
            if wheelhouse is None:
                wheelhouse = Path(work) / "wheelhouse"
                with Fetcher(console=errors) as fetcher:
                    spec = wheelhouse_spec(loaded, profile, index)
                    build_wheelhouse(spec, wheelhouse, _cache(loaded), fetcher, _log)
            built = build_gateway_image(wheelhouse, out, _log)
    except (DownloadsFailed, GaveUp, HttpStatusError) as error:
        raise fail(str(error), EXIT_FAILED) from None
    except (MirrorError, ImageError) as error:
        raise fail(str(error), EXIT_FAILED) from None
    console.print(
        f"✓ image {out}: {built.reference}@{built.digest}, {built.size / 1e6:.1f} MB, "
        f"{built.packages} Debian packages and {built.wheels} wheels (SBOM {out / SBOM})",
        markup=False,
    )
    console.print(f"  skopeo copy oci:{out}:{built.reference.rsplit(':', 1)[1]} ...", markup=False)
