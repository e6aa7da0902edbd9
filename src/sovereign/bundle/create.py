"""`sovereign bundle create`: everything one node profile needs, fetched, signed, listed.

Mirrors fetch into a cache directory per profile (so an interrupted run resumes), then
every file is copied into a staging bundle, hashed again on the way in, and the finished
bundle is signed and moved to `--out` in one rename: a failed run leaves no bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sovereign.bundle.layout import (
    FORMAT,
    INDEX_FILE,
    LAYOUT_FILE,
    REF_NAME,
    SBOM_FILE,
    BundleError,
    LayoutWriter,
    blob_path,
    move_into_place,
    new_staging,
    remove_staging,
)
from sovereign.bundle.manifest import file_digest, manifest_digest, read_signed, sign
from sovereign.bundle.sbom import sbom_json
from sovereign.distribution.image import DESCRIPTION as IMAGE_DESCRIPTION
from sovereign.distribution.wheelhouse import (
    INSTALLER,
    collect_wheels,
    requirements,
    wheelhouse_spec,
)
from sovereign.image.build import IMAGE_FILES
from sovereign.image.build import MANIFEST as IMAGE_MANIFEST
from sovereign.image.recipe import ROLES, load_recipe
from sovereign.mirror.artifact import Artifact, ArtifactKind
from sovereign.mirror.debian import mirror_sources, parse_source
from sovereign.mirror.fetch import Fetcher
from sovereign.mirror.models import mirror_model
from sovereign.mirror.oci import SOURCE, mirror_images, parse_reference
from sovereign.profile.derived import BUNDLE_ROOT
from sovereign.profile.loader import locate
from sovereign.profile.model import BundleDebian, BundleModels, BundleSpec, Profile
from sovereign.render import render_files
from sovereign.render.artifacts import weights_path
from sovereign.render.policy import bundle_dir
from sovereign.tools import sha256_file

PLAYBOOKS = ROLES.parent / "playbooks"
# In the bundle's config artifact; the import puts it under DIR/config/<profile>/.
WHEELHOUSE_REQUIREMENTS = "wheelhouse/requirements.txt"
DEBIAN_ARCH = {"amd64": "amd64", "arm64": "arm64"}
# Kinds whose licence comes from upstream; a deb's is in its copyright file, ours is the repo's.
THIRD_PARTY = ("wheel", "model", "oci-image")

Log = Callable[[str], None]


@dataclass(frozen=True)
class CreateOptions:
    out: Path
    signing_key: Ed25519PrivateKey
    cache: Path  # where the mirrors keep what they fetched, per profile
    image: Path | None = None  # a `sovereign image build --out` directory
    base: Path | None = None  # an earlier bundle: only blobs it lacks are carried
    gateway_image: Path | None = None  # a `sovereign gateway image --out` directory
    created: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    )


@dataclass(frozen=True)
class Created:
    path: Path
    digest: str  # of bundle.json
    artifacts: int
    blobs: int
    carried_bytes: int
    from_base: int
    unlicensed: list[str]


# A group of artifacts that shares one manifest: one wheel, one deb, one model's files.
Group = list[tuple[Artifact, Path]]


def create_bundle(
    profile: Profile, profile_path: Path, options: CreateOptions, fetcher: Fetcher, log: Log
) -> Created:
    spec = profile.bundle
    if spec is None:
        raise BundleError(
            f"{profile_path}: the profile has no bundle: section saying what to fetch and from "
            "where (see profiles/air-gapped.yaml)"
        )
    mirror = options.cache / profile.name
    groups: list[Group] = []
    images: list[tuple[Artifact, Path, str]] = []
    _check_paths(profile_path, spec)
    # The options are checked before anything is fetched.
    image = _node_image(profile, options.image) if options.image is not None else []
    if options.gateway_image is not None:
        images.append(_gateway_image(profile, profile_path, options.gateway_image))
    base_digest, omit = _base(options)
    extra_configs: dict[str, bytes] = {}
    if spec.wheels is None and profile.kind != "datacenter":
        log(
            f"warning: {profile_path}: no bundle.wheels, so the bundle carries no gateway "
            "wheelhouse, and the node cannot install the gateway from it"
        )
    if spec.wheels is not None:
        # The gateway's wheelhouse: what the node installs it from, offline, by hash.
        wheelhouse = wheelhouse_spec(profile, profile_path, None)
        collected = collect_wheels(wheelhouse, mirror / "pypi", fetcher, log)
        groups += [[(w, mirror / "pypi" / w.path)] for w in collected.wheels]
        installer = collected.installer
        groups.append([(installer, mirror / "pypi" / INSTALLER / installer.path)])
        extra_configs[WHEELHOUSE_REQUIREMENTS] = requirements(
            collected.wheels, wheelhouse.targets
        ).encode()
    if spec.images:
        layout = mirror / "oci"
        mirrored = mirror_images(spec.images, layout, fetcher, spec.platforms)
        refs = _ref_names(layout)
        images += [(a, layout, refs.get(a.source) or a.source) for a in mirrored]
    if spec.debian is not None:
        groups += _debian(profile, spec.debian, mirror / "debian", fetcher)
    models = _models(profile, profile_path, spec.models, mirror / "models", fetcher, log)
    groups += _local_groups(profile, mirror, extra_configs)
    groups.append(image)
    staging = new_staging(options.out)
    try:
        created = _assemble(
            profile, staging, groups, models, images, options, base_digest, omit, log
        )
        move_into_place(staging, options.out)
    finally:
        remove_staging(staging)
    return Created(options.out, *created)


def _check_paths(profile_path: Path, spec: BundleSpec) -> None:
    """The files the bundle: section names, before anything is fetched."""
    named: list[tuple[tuple[str | int, ...], Path]] = []
    if spec.wheels is not None:
        wheels = _beside(profile_path, spec.wheels.requirements)
        named.append((("bundle", "wheels", "requirements"), wheels))
    if spec.debian is not None:
        named.append((("bundle", "debian", "keyring"), Path(spec.debian.keyring)))
    for name, origin in spec.models.sources.items():
        if origin.startswith("file:"):
            named.append((("bundle", "models", "sources", name), Path(origin[5:])))
    for loc, path in named:
        if not path.exists():
            raise locate(profile_path, loc, f"{path} does not exist")


def _beside(profile_path: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else profile_path.parent / path


def _ref_names(layout: Path) -> dict[str, str]:
    """Each mirrored reference's ref name in the layout, by the reference it came from:
    two references may share one image, so the manifest digest cannot tell them apart."""
    try:
        index = json.loads((layout / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return {}
    names = {}
    for entry in index.get("manifests", []):
        annotations = entry.get("annotations", {})
        if SOURCE in annotations and REF_NAME in annotations:
            names[annotations[SOURCE]] = annotations[REF_NAME]
    return names


def _debian(profile: Profile, spec: BundleDebian, out: Path, fetcher: Fetcher) -> list[Group]:
    recipe = load_recipe(profile.host.os)
    lines = spec.sources or recipe.spec.sources
    packages = sorted({*recipe.spec.packages_for(profile.kind), *spec.packages})
    architectures = sorted({DEBIAN_ARCH[node.arch] for node in profile.nodes})
    debs = mirror_sources(
        [parse_source(line) for line in lines],
        architectures,
        packages,
        Path(spec.keyring),
        out,
        fetcher,
        include_priority_required=True,
    )
    return [[(deb, out / deb.path)] for deb in debs]


@dataclass(frozen=True)
class BundledModel:
    """A model's files, and where the import puts them under the node's bundle root: its
    `bundle:` path; hf/<org>/<repo>/<commit> for hf: (where the renderer points the node);
    models/<name> for pkg: and file: sources, whose node paths lie outside the bundle."""

    target: str
    group: Group


def model_digest(files: list[tuple[str, str]]) -> str:
    """What a profile's models[].sha256 pins: a single file's own sha256; for a directory
    (vLLM weights), the sha256 of its listing in `sha256sum` form, sorted by path."""
    if len(files) == 1:
        return files[0][1]
    listing = "".join(f"{digest}  {path}\n" for path, digest in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def _models(
    profile: Profile,
    profile_path: Path,
    spec: BundleModels,
    out: Path,
    fetcher: Fetcher,
    log: Log,
) -> list[BundledModel]:
    endpoint = str(spec.endpoint)
    bundled = []
    for index, model in enumerate(profile.models):
        scheme, _, rest = model.source.partition(":")
        if scheme == "bundle":
            origin, target = spec.sources[model.name], rest
        elif scheme == "pkg":
            origin, target = f"file:{weights_path(model.source)}", f"models/{model.name}"
        elif scheme == "hf":
            # Where the node looks for it: bundle root/hf/<org>/<repo>/<commit>/<file>.
            node_path = PurePosixPath(weights_path(model.source))
            origin, target = model.source, node_path.parent.relative_to(BUNDLE_ROOT).as_posix()
        elif scheme == "file":
            origin, target = model.source, f"models/{model.name}"
        else:
            continue  # an upstream server's URL: nothing to carry
        mirrored = mirror_model(origin, out, fetcher, endpoint, name=model.name)
        digest = model_digest([(f.path, f.sha256) for f in mirrored.files])
        if model.sha256 is not None and model.sha256 != digest:
            raise locate(
                profile_path,
                ("models", index, "sha256"),
                f"pins {model.sha256}, but {origin} is {digest}; the model changed, or the "
                "pin is of something else",
            )
        log(f"model {model.name}: {len(mirrored.files)} file(s), sha256 {digest}")
        for warning in mirrored.warnings:
            log(warning)
        group = [
            (replace(a, path=f.path), mirrored.directory / f.path)
            for a, f in zip(mirrored.artifacts, mirrored.files, strict=True)
        ]
        bundled.append(BundledModel(target, group))
    return bundled


def _local_groups(profile: Profile, mirror: Path, extra: dict[str, bytes]) -> list[Group]:
    """What comes from this checkout rather than a server: policies, roles, configs (the
    rendered ones and `extra`, such as the wheelhouse's requirements)."""
    groups = [
        _tree("policy", "policies", bundle_dir(profile)),
        _tree("roles", "ansible", ROLES.parent, ("roles", "playbooks")),
    ]
    configs = mirror / "rendered"
    rendered = {**render_files(profile), **extra}
    for relative, content in rendered.items():
        target = configs / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    groups.append(_tree("config", profile.name, configs, tuple(sorted(rendered))))
    return groups


def _tree(kind: ArtifactKind, name: str, root: Path, only: Iterable[str] | None = None) -> Group:
    """Files from this checkout as one artifact, versioned by the digest of their listing."""
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; nothing to put in the {kind} artifact")
    starts = [root / part for part in only] if only is not None else [root]
    files = sorted(
        f
        for start in starts
        for f in ([start] if start.is_file() else start.rglob("*"))
        if f.is_file() and "__pycache__" not in f.parts
    )
    return _local_group(kind, name, root, files)


def _local_group(
    kind: ArtifactKind, name: str, root: Path, files: list[Path], version: str | None = None
) -> Group:
    digests = [(f.relative_to(root).as_posix(), sha256_file(f)) for f in files]
    listing = "".join(f"{digest}  {path}\n" for path, digest in digests).encode()
    version = version or hashlib.sha256(listing).hexdigest()[:12]
    return [
        (Artifact(kind, name, version, path, digest, f.stat().st_size, str(f), None), f)
        for (path, digest), f in zip(digests, files, strict=True)
    ]


def _node_image(profile: Profile, directory: Path) -> Group:
    try:
        manifest = json.loads((directory / IMAGE_MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise BundleError(
            f"--image {directory}: not a `sovereign image build` output: {error}"
        ) from None
    if manifest.get("profile") != profile.name:
        raise BundleError(
            f"--image {directory} was built for profile {manifest.get('profile')!r}, "
            f"not {profile.name!r}"
        )
    files = sorted(p for p in directory.iterdir() if p.name in IMAGE_FILES and p.is_file())
    return _local_group("node-image", profile.name, directory, files, manifest.get("recipe_hash"))


def _gateway_image(
    profile: Profile, profile_path: Path, directory: Path
) -> tuple[Artifact, Path, str]:
    """The built gateway image, by the digest the cluster pulls it by: a profile that pins
    another digest in cluster.images.gateway is refused, naming that line."""
    try:
        description = json.loads((directory / IMAGE_DESCRIPTION).read_text())
        digest, reference = str(description["digest"]), str(description["reference"])
        manifest = blob_path(directory, digest)
        size = manifest.stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(
            f"--gateway-image {directory}: not a `sovereign gateway image` output: {error}"
        ) from None
    if profile.cluster is not None:
        pinned = parse_reference(profile.cluster.images.gateway).digest
        if pinned != digest:
            raise locate(
                profile_path,
                ("cluster", "images", "gateway"),
                f"pins {pinned}, but --gateway-image {directory} is {digest}: name the image "
                "the cluster is to run",
            )
    registry = profile.cluster.registry if profile.cluster is not None else "localhost"
    ref = parse_reference(f"{registry}/{reference}")
    hex_digest = digest.removeprefix("sha256:")
    artifact = Artifact(
        kind="oci-image",
        name=ref.repository,
        version=ref.tag or digest,
        path=f"blobs/sha256/{hex_digest}",
        sha256=hex_digest,
        size=size,
        source=str(ref),
        licence="Apache-2.0",
        purl=f"pkg:oci/{ref.repository.rsplit('/', 1)[-1]}@sha256%3A{hex_digest}"
        f"?repository_url={ref.name}",
    )
    return artifact, directory, ref.ref_name


def _base(options: CreateOptions) -> tuple[str | None, set[str]]:
    if options.base is None:
        return None, set()
    try:
        manifest, data, _ = read_signed(options.base, options.signing_key.public_key())
    except BundleError as error:
        raise BundleError(f"--base {options.base}: {error}") from None
    return manifest_digest(data), set(manifest["blobs"])


def _assemble(
    profile: Profile,
    staging: Path,
    groups: list[Group],
    models: list[BundledModel],
    images: list[tuple[Artifact, Path, str]],
    options: CreateOptions,
    base_digest: str | None,
    omit: set[str],
    log: Log,
) -> tuple[str, int, int, int, int, list[str]]:
    writer = LayoutWriter(staging, omit)
    listed: list[dict[str, Any]] = []
    everything: list[Artifact] = []
    targets = {id(m.group): m.target for m in models}
    for group in [g for g in groups if g] + [m.group for m in models if m.group]:
        artifacts = [a for a, _ in group]
        descriptor = writer.add_artifact(artifacts, [p for _, p in group])
        first = artifacts[0]
        entry = {
            "kind": first.kind,
            "name": first.name,
            "version": first.version,
            "source": first.source if len(group) == 1 else first.source.rsplit("/", 1)[0],
            "licence": first.licence,
            "purl": first.purl,
            "manifest": descriptor.digest,
            "files": [
                {"path": a.path, "digest": f"sha256:{a.sha256}", "size": a.size} for a in artifacts
            ],
        }
        if id(group) in targets:
            entry["target"] = targets[id(group)]
        listed.append(entry)
        everything += artifacts
    for artifact, layout, ref_name in images:
        descriptor = writer.add_image(layout, f"sha256:{artifact.sha256}", ref_name)
        listed.append({**artifact.to_json(), "manifest": descriptor.digest, "ref": ref_name})
        everything.append(artifact)
    writer.write_layout()
    log(f"{len(listed)} artifacts, {len(writer.sizes)} blobs")
    (staging / SBOM_FILE).write_text(sbom_json(everything, profile.name, options.created))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": options.created.isoformat(),
        "profile": {"name": profile.name, "kind": profile.kind},
        "artifacts": listed,
        "blobs": dict(sorted(writer.sizes.items())),
        "files": {n: file_digest(staging / n) for n in (LAYOUT_FILE, INDEX_FILE, SBOM_FILE)},
    }
    if base_digest is not None:
        manifest["base"] = {"bundle": base_digest, "blobs": sorted(writer.omitted)}
    data = sign(staging, manifest, options.signing_key)
    carried = sum(size for d, size in writer.sizes.items() if d not in writer.omitted)
    unlicensed = sorted(
        {f"{a.kind} {a.name}" for a in everything if a.licence is None and a.kind in THIRD_PARTY}
    )
    return (
        manifest_digest(data),
        len(listed),
        len(writer.sizes),
        carried,
        len(writer.omitted),
        unlicensed,
    )
