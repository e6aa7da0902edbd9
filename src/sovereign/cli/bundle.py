"""`sovereign bundle create|verify|import` and `sovereign keys create|show`: signed air-gap
bundles.

`bundle create` exits 0 with the bundle written whole, 1 when a fetch failed (nothing is
written), 2 on bad input. `bundle verify` exits 0 when every check passed, 1 when the
bundle is refused (each finding names its file), 2 on bad input. `bundle import` exits 0
when everything is in place (or was already), 1 when the bundle is refused (nothing is
imported) or the import stopped midway (what failed is named; what was written before it
is intact), 2 on bad input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.contract import KeyFileError, load_private_key, load_public_key

from sovereign.bundle.create import CreateOptions, create_bundle
from sovereign.bundle.importer import (
    ImportFailed,
    ImportOptions,
    ImportRefused,
    import_bundle,
    valid_registry,
)
from sovereign.bundle.layout import BundleError
from sovereign.bundle.manifest import verify
from sovereign.cli import app
from sovereign.cli.memory import keys_app
from sovereign.cli.output import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    console,
    errors,
    fail,
    report_profile_error,
)
from sovereign.cli.profile import load_or_exit
from sovereign.evidence import EvidenceError, key_id, load_or_create_signing_key
from sovereign.mirror.fetch import DownloadsFailed, Fetcher, GaveUp, HttpStatusError, MirrorError
from sovereign.profile.loader import ProfileError

bundle_app = typer.Typer(help="Make and check signed air-gap bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


def default_signing_key() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sovereign" / "bundle" / "ed25519.pem"


def mirror_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sovereign" / "mirror"


def apt_key_home() -> Path:
    """Where `bundle import` keeps the apt archive keys it makes: beside the signing key,
    never in the import directory, which is served."""
    return default_signing_key().parent / "apt-archive"


KeyOption = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="the Ed25519 signing key (PEM); default ~/.config/sovereign/bundle/ed25519.pem",
    ),
]


def signing_key(path: Path | None) -> Ed25519PrivateKey:
    path = path or default_signing_key()
    if not path.exists():
        raise fail(
            f"signing key {path} does not exist; make one with `sovereign keys create {path}`"
        )
    try:
        return load_private_key(path)
    except KeyFileError as error:
        raise fail(f"signing key: {error}") from None


@bundle_app.command("create")
def create(
    profile: Annotated[Path, typer.Argument(help="the node profile (YAML)")],
    out: Annotated[Path, typer.Option("--out", help="a new directory for the bundle")],
    key: KeyOption = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="a `sovereign image build --out` directory")
    ] = None,
    gateway_image: Annotated[
        Path | None,
        typer.Option(
            "--gateway-image",
            help="a `sovereign gateway image --out` directory: the gateway image a cluster runs",
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="an earlier bundle: carry only the blobs it lacks"),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=32, help="concurrent downloads")] = 4,
) -> None:
    """Fetch what the profile's bundle: section names, and write a signed bundle."""
    loaded = load_or_exit(profile)
    private_key = signing_key(key)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise fail(f"--out {out} exists and is not an empty directory")
    options = CreateOptions(
        out, private_key, mirror_cache(), image, base, gateway_image=gateway_image
    )
    try:
        with Fetcher(workers=workers, console=errors) as fetcher:
            created = create_bundle(
                loaded, profile, options, fetcher, lambda line: errors.print(line, markup=False)
            )
    except (DownloadsFailed, GaveUp, HttpStatusError) as error:
        raise fail(str(error), EXIT_FAILED) from None
    except (BundleError, MirrorError) as error:
        raise fail(str(error)) from None
    except ProfileError as error:
        report_profile_error(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    carried = created.carried_bytes / 1e6
    console.print(
        f"✓ bundle {created.path}: {created.artifacts} artifacts, {created.blobs} blobs, "
        f"{carried:.1f} MB",
        markup=False,
    )
    if created.from_base:
        console.print(
            f"  differential: {created.from_base} blob(s) left to the base bundle", markup=False
        )
    for name in created.unlicensed:
        console.print(f"  licence unknown (NOASSERTION in the SBOM): {name}", markup=False)
    console.print(
        f"  bundle.json {created.digest}, signed by {key_id(private_key.public_key())}",
        markup=False,
    )


@bundle_app.command("verify")
def verify_command(
    bundle: Annotated[Path, typer.Argument(help="the bundle directory")],
    trust: Annotated[
        Path, typer.Option("--trust", help="the signer's Ed25519 public key (PEM) you trust")
    ],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="the bundle a differential bundle was made against"),
    ] = None,
) -> None:
    """Check the signature, every digest, and that no file is missing or unlisted."""
    if not bundle.is_dir():
        raise fail(f"{bundle} is not a directory")
    try:
        trusted = load_public_key(trust)
    except KeyFileError as error:
        raise fail(f"--trust: {error}") from None
    result = verify(bundle, trusted, base)
    if result.manifest is not None:
        kinds: dict[str, int] = {}
        for artifact in result.manifest["artifacts"]:
            kinds[artifact["kind"]] = kinds.get(artifact["kind"], 0) + 1
        listing = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        console.print(
            f"bundle {bundle} ({result.manifest['profile']['name']}): {listing}", markup=False
        )
        console.print(
            f"  signature: Ed25519, key {result.signer}; "
            f"{result.blobs_checked} blobs, {result.bytes_checked / 1e6:.1f} MB checked"
            + (f", {result.from_base} from the base" if result.from_base else ""),
            markup=False,
        )
    for finding in result.findings:
        errors.print(f"✗ {finding}", markup=False)
    if not result.ok:
        errors.print(f"✗ bundle {bundle} refused: {len(result.findings)} problem(s)", markup=False)
        raise typer.Exit(EXIT_FAILED)
    console.print(f"✓ bundle {bundle} verified", markup=False)


@bundle_app.command("import")
def import_command(
    bundle: Annotated[Path, typer.Argument(help="the bundle directory")],
    trust: Annotated[
        Path, typer.Option("--trust", help="the signer's Ed25519 public key (PEM) you trust")
    ],
    into: Annotated[
        Path, typer.Option("--into", help="the mirror directory (made if missing; reused)")
    ],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="the bundle a differential bundle was made against"),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="HOST:PORT of the registry to push images to; default: the profile's oci mirror",
        ),
    ] = None,
    apt_key: Annotated[
        Path | None,
        typer.Option(
            "--apt-key",
            help="a secret OpenPGP key (exported, no passphrase) to sign the apt repository; "
            "default: one made on the first import, kept in "
            "~/.config/sovereign/bundle/apt-archive/<profile>/",
        ),
    ] = None,
) -> None:
    """Verify a bundle, then fill the local mirrors and the node's configs from it."""
    if not bundle.is_dir():
        raise fail(f"{bundle} is not a directory")
    if base is not None and not base.is_dir():
        raise fail(f"--base {base} is not a directory")
    if into.exists() and not into.is_dir():
        raise fail(f"--into {into} exists and is not a directory")
    if apt_key is not None and not apt_key.is_file():
        raise fail(f"--apt-key {apt_key} is not a file")
    if registry is not None and not valid_registry(registry):
        raise fail(f"--registry {registry!r}: expected HOST:PORT, such as 127.0.0.1:5000")
    try:
        trusted = load_public_key(trust)
    except KeyFileError as error:
        raise fail(f"--trust: {error}") from None
    options = ImportOptions(bundle, trusted, into, apt_key_home(), base, registry, apt_key)
    try:
        imported = import_bundle(options, lambda line: errors.print(line, markup=False))
    except ImportRefused as refused:
        for finding in refused.findings:
            errors.print(f"✗ {finding}", markup=False)
        raise fail(f"bundle {bundle} refused: {refused}", EXIT_FAILED) from None
    except ImportFailed as error:
        raise fail(f"import into {into} stopped: {error}", EXIT_FAILED) from None
    except BundleError as error:
        raise fail(str(error)) from None
    except OSError as error:
        # Outside the import's own steps: the directory or the key home cannot be written.
        raise fail(f"{error.filename or into}: {error.strerror}", EXIT_FAILED) from None
    for kind in imported.kinds:
        state = f"{kind.written} written" if kind.written else "unchanged"
        detail = f"; {kind.detail}" if kind.detail else ""
        console.print(f"  {kind.kind}: {kind.count} → {kind.where} ({state}{detail})", markup=False)
    if not imported.changed:
        again = "was already imported" if imported.seen_before else "is already in place"
        console.print(
            f"✓ nothing changed: bundle {imported.digest} {again} in {into}", markup=False
        )
    else:
        console.print(
            f"✓ bundle {imported.digest} ({imported.profile}) imported into {into}", markup=False
        )


@keys_app.command("create")
def create_key(
    path: Annotated[Path, typer.Argument(help="where to write the private key (PEM, 0600)")],
) -> None:
    """Make an Ed25519 signing key for bundles, with its public key beside it (.pub)."""
    for existing in (path, path.with_suffix(".pub")):
        if existing.exists():
            raise fail(f"{existing} exists; refusing to replace a key")
    try:
        private_key = load_or_create_signing_key(path)
    except EvidenceError as error:
        raise fail(str(error)) from None
    console.print(f"✓ {path} (public key {path.with_suffix('.pub')})", markup=False)
    console.print(f"  key id {key_id(private_key.public_key())}", markup=False)


@keys_app.command("show")
def show_key(path: Annotated[Path, typer.Argument(help="a private or public key (PEM)")]) -> None:
    """Print a key's id and its public key, to hand to whoever verifies bundles."""
    try:
        public = load_public_key(path)
    except KeyFileError:
        try:
            public = load_private_key(path).public_key()
        except KeyFileError as error:
            raise fail(str(error)) from None
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    console.print(f"key id {key_id(public)}", markup=False)
    console.print(pem.decode().rstrip(), markup=False)
