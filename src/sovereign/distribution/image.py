"""`sovereign gateway image`: the gateway as an OCI image, built without a Docker daemon.

A Debian base from mmdebstrap (cached by recipe hash) and the venv the image's own pip
installs from a wheelhouse, as reproducible layers with a CycloneDX SBOM.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign.bundle.layout import (
    MEDIA_MANIFEST,
    REF_NAME,
    Descriptor,
    LayoutWriter,
    dumps,
    move_into_place,
    new_staging,
    remove_staging,
)
from sovereign.bundle.sbom import sbom_json
from sovereign.distribution.layers import layer_from_directory, layer_from_tar
from sovereign.distribution.wheelhouse import INSTALLER, REQUIREMENTS
from sovereign.image.build import cache_root
from sovereign.image.recipe import IMAGES
from sovereign.mirror.artifact import Artifact
from sovereign.mirror.pypi import MANIFEST as WHEELS_MANIFEST
from sovereign.tools import locked

REPOSITORY_NAME = "sovereign/gateway"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
SBOM = "sbom.cdx.json"
DESCRIPTION = "image.json"
# What the output directory holds: the layout, and the SBOM and description beside it.
IMAGE_FILES = frozenset({"oci-layout", "index.json", "blobs", SBOM, DESCRIPTION})
MACHINES = {"x86_64": "amd64", "aarch64": "arm64"}
# Bumped when the builder lays out the base differently, so old cache entries are not reused.
BUILDER_VERSION = "1"
MMDEBSTRAP_TIMEOUT_S = 1800
STEP_TIMEOUT_S = 900
WHEELHOUSE_INSIDE = "/.sovereign-wheelhouse"

Log = Callable[[str], None]


class ImageError(Exception):
    """The image could not be built; nothing was left half-made. The message says why."""


class User(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z_][a-z0-9_-]*$")
    uid: int = Field(ge=1000, le=65534)


class ContainerRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(pattern=r"^[a-z]+$")
    sources: list[str] = Field(min_length=1)
    variant: str
    packages: list[str] = Field(min_length=1)
    exclude: list[str]
    keep: list[str]
    user: User
    venv: str = Field(pattern=r"^/[a-z0-9/_-]+$")
    entrypoint: list[str] = Field(min_length=1)
    command: list[str]
    epoch: int = Field(gt=0)


@dataclass(frozen=True)
class BuiltImage:
    path: Path
    digest: str  # of the manifest, as a registry and `cluster.images` name it
    reference: str
    size: int
    packages: int
    wheels: int
    base_cached: bool
    seconds: float


def load_container_recipe(root: Path = IMAGES / "gateway") -> tuple[ContainerRecipe, str]:
    """The recipe and its hash (of the file and this builder's version)."""
    path = root / "recipe.yaml"
    try:
        text = path.read_text()
        recipe = ContainerRecipe.model_validate(YAML(typ="safe", pure=True).load(text))
    except OSError as error:
        raise ImageError(f"{path}: {error.strerror}") from None
    except YAMLError as error:
        raise ImageError(f"{path}: {error}") from None
    except ValidationError as error:
        first = error.errors()[0]
        raise ImageError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    digest = hashlib.sha256(f"{BUILDER_VERSION}\n{text}".encode()).hexdigest()
    return recipe, digest


def build_gateway_image(wheelhouse: Path, out: Path, log: Log) -> BuiltImage:
    started = time.monotonic()
    recipe, recipe_hash = load_container_recipe()
    wheels = _wheels(wheelhouse)
    version = next((w.version for w in wheels if w.name == "sovereign-gateway"), None)
    if version is None:
        raise ImageError(f"{wheelhouse}: no sovereign-gateway wheel; not a gateway wheelhouse")
    architecture = _architecture(wheels, wheelhouse)
    _check_host()
    base, packages, cached = _base(recipe, recipe_hash, log)
    staging = new_staging(out)
    try:
        with tempfile.TemporaryDirectory(prefix="sovereign-image-") as temporary:
            work = Path(temporary)
            rootfs = work / "rootfs"
            _venv(recipe, base / "rootfs.tar", rootfs, wheelhouse, log)
            venv_layer = work / "venv.tar"
            layer_from_directory(rootfs, venv_layer, recipe.epoch, recipe.venv)
            log("writing the image layout")
            reference = f"{REPOSITORY_NAME}:{version}"
            digest, size = _layout(
                staging, recipe, architecture, version, [base / "layer.tar", venv_layer]
            )
        created = datetime.datetime.fromtimestamp(recipe.epoch, datetime.UTC)
        (staging / SBOM).write_text(sbom_json([*packages, *wheels], reference, created))
        description = {
            "reference": reference,
            "digest": digest,
            "architecture": architecture,
            "recipe_hash": recipe_hash,
            "packages": len(packages),
            "wheels": len(wheels),
        }
        (staging / DESCRIPTION).write_bytes(dumps(description))
        move_into_place(staging, out)
    finally:
        remove_staging(staging)
    return BuiltImage(
        out, digest, reference, size, len(packages), len(wheels), cached,
        time.monotonic() - started,
    )  # fmt: skip


def _wheels(wheelhouse: Path) -> list[Artifact]:
    try:
        listed = json.loads((wheelhouse / WHEELS_MANIFEST).read_text())
        if not (wheelhouse / REQUIREMENTS).is_file():
            raise OSError(f"no {REQUIREMENTS}")
        if not list((wheelhouse / INSTALLER).glob("pip-*.whl")):
            raise OSError(f"no pip wheel in {INSTALLER}/")
        return [Artifact.from_json(entry) for entry in listed]
    except (OSError, ValueError, TypeError) as error:
        raise ImageError(
            f"--wheelhouse {wheelhouse}: not a `sovereign gateway wheels` output: {error}"
        ) from None


def _architecture(wheels: list[Artifact], wheelhouse: Path) -> str:
    """One image is one architecture: that of the wheelhouse's platform wheels."""
    found = {
        machine
        for wheel in wheels
        for machine in MACHINES
        if re.search(rf"_{machine}\.whl$", wheel.path)
    }
    if len(found) != 1:
        raise ImageError(
            f"--wheelhouse {wheelhouse} holds wheels for {sorted(found) or 'no platform'}; "
            "an image is built from the wheels of one architecture"
        )
    machine = found.pop()
    here = platform.machine()
    if machine != here:
        raise ImageError(
            f"the wheelhouse is for {machine}, and this {here} machine runs the image's own "
            "Python to install it; build the image on a machine of its architecture"
        )
    return MACHINES[machine]


def _check_host() -> None:
    if os.geteuid() != 0:
        raise ImageError("image build needs root: mmdebstrap makes device nodes and chroot(2)")
    for tool in ("mmdebstrap", "tar", "chroot"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is not installed; run `sovereign tools install`")


def _base(recipe: ContainerRecipe, recipe_hash: str, log: Log) -> tuple[Path, list[Artifact], bool]:
    """The Debian base, from the cache or made now: rootfs.tar as mmdebstrap wrote it,
    layer.tar normalised, and packages.json (each installed package with its .deb's sha256)."""
    entry = cache_root() / f"gateway-base-{recipe_hash[:16]}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with locked(entry.parent, on_wait=lambda: log("waiting for another build of this base")):
        cached = (entry / "packages.json").is_file()
        if cached:
            log(f"base {recipe_hash[:12]} is cached: {entry}")
        else:
            _build_base(recipe, entry, log)
    packages = [
        Artifact.from_json(item) for item in json.loads((entry / "packages.json").read_text())
    ]
    return entry, packages, cached


def _build_base(recipe: ContainerRecipe, entry: Path, log: Log) -> None:
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    try:
        log(f"mmdebstrap {recipe.suite} ({recipe.variant}): {', '.join(recipe.packages)}")
        user = recipe.user
        hooks = [
            # No host's resolver or name in the image; the runtime gives its own.
            'rm -f "$1/etc/resolv.conf" && echo gateway > "$1/etc/hostname"',
            f'echo "{user.name}:x:{user.uid}:{user.uid}:{user.name}:/nonexistent:'
            f'/usr/sbin/nologin" >> "$1/etc/passwd"',
            f'echo "{user.name}:x:{user.uid}:" >> "$1/etc/group"',
            'rm -f "$1/etc/passwd-" "$1/etc/group-" "$1/etc/shadow-" "$1/etc/gshadow-"',
            # apt's lists are gone once mmdebstrap cleans up: take each .deb's sha256 now.
            "chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\n' > "
            + shlex.quote(str(work / "installed.tsv")),
            'chroot "$1" sh -c \'apt-cache show --no-all-versions '
            '$(dpkg-query -W -f="\\${Package}=\\${Version} ")\' > '
            + shlex.quote(str(work / "apt-show.txt")),
        ]
        argv = [
            "mmdebstrap",
            "--mode=root",
            f"--variant={recipe.variant}",
            f"--include={','.join(recipe.packages)}",
            # Without it bookworm pulls usrmerge, and with it all of perl.
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.exclude),
            *(f"--dpkgopt=path-include={pattern}" for pattern in recipe.keep),
            *(f"--customize-hook={hook}" for hook in hooks),
            recipe.suite,
            str(work / "rootfs.tar"),
            *recipe.sources,
        ]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.epoch)}
        _run(argv, work / "mmdebstrap.log", MMDEBSTRAP_TIMEOUT_S, env)
        packages = _packages(work, recipe.suite)
        (work / "packages.json").write_text(
            json.dumps([package.to_json() for package in packages], indent=2) + "\n"
        )
        layer_from_tar(work / "rootfs.tar", work / "layer.tar", recipe.epoch)
        # One rename: the cache entry appears whole, or not at all.
        work.rename(entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _packages(work: Path, suite: str) -> list[Artifact]:
    """Each installed package with the sha256 of its .deb, from `apt-cache show` (whose
    stanzas from dpkg's status, with no file, are passed over)."""
    archive: dict[tuple[str, str], dict[str, str]] = {}
    for stanza in (work / "apt-show.txt").read_text().split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in stanza.splitlines()
            if re.match(r"^[A-Za-z0-9-]+: ", line)
        )
        if "Package" in fields and "SHA256" in fields:
            archive[(fields["Package"], fields["Version"])] = fields
    packages = []
    for line in (work / "installed.tsv").read_text().splitlines():
        name, version = line.split("\t")
        if (name, version) not in archive:
            raise ImageError(f"{name} {version} is installed but in no archive the recipe names")
        fields = archive[(name, version)]
        packages.append(
            Artifact(
                kind="deb",
                name=name,
                version=version,
                path=fields["Filename"],
                sha256=fields["SHA256"],
                size=int(fields["Size"]),
                source=f"Debian {suite}: {fields['Filename']}",
                licence=None,  # Debian states it in each package's copyright file
                purl=f"pkg:deb/debian/{name}@{version}?arch={fields['Architecture']}"
                "&distro=debian-12",
            )
        )
    if not packages:
        raise ImageError(f"{work / 'installed.tsv'}: no packages; the base build left no record")
    return sorted(packages, key=lambda package: package.name)


def _venv(
    recipe: ContainerRecipe, base_tar: Path, rootfs: Path, wheelhouse: Path, log: Log
) -> None:
    """The venv, made by the image's own Python and installed by pip run from its wheel,
    which so never lands in the venv; bytecode compiled with hashes, not timestamps."""
    rootfs.mkdir()
    _run(["tar", "--numeric-owner", "-xpf", str(base_tar), "-C", str(rootfs)], None)
    # Copied in for the install only; the layer holds the venv's subtree, not this.
    inside = rootfs / WHEELHOUSE_INSIDE.lstrip("/")
    shutil.copytree(wheelhouse, inside)
    pip = next((inside / INSTALLER).glob("pip-*.whl")).relative_to(rootfs)
    venv = recipe.venv
    chroot = [
        "chroot", str(rootfs), "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/nonexistent", "LC_ALL=C.UTF-8", f"SOURCE_DATE_EPOCH={recipe.epoch}",
        "PYTHONHASHSEED=0", "PYTHONDONTWRITEBYTECODE=1",
    ]  # fmt: skip
    log(f"installing the wheelhouse into {venv} with the image's python3")
    _run([*chroot, "/usr/bin/python3", "-m", "venv", "--without-pip", venv], None)
    _run(
        [*chroot, f"{venv}/bin/python", f"/{pip}/pip", "install", "--no-index", "--no-compile",
         "--no-cache-dir", "--disable-pip-version-check", "--require-hashes",
         "--find-links", WHEELHOUSE_INSIDE, "-r", f"{WHEELHOUSE_INSIDE}/{REQUIREMENTS}"],
        None,
    )  # fmt: skip
    _run(
        [*chroot, f"{venv}/bin/python", "-m", "compileall", "-q",
         "--invalidation-mode", "unchecked-hash", f"{venv}/lib"],
        None,
    )  # fmt: skip
    shutil.rmtree(inside)


def _layout(
    root: Path, recipe: ContainerRecipe, architecture: str, version: str, layers: list[Path]
) -> tuple[str, int]:
    writer = LayoutWriter(root)
    created = datetime.datetime.fromtimestamp(recipe.epoch, datetime.UTC).isoformat()
    created = created.replace("+00:00", "Z")
    descriptors = []
    for layer in layers:
        digest = writer.add_file(layer)
        descriptors.append(
            {"mediaType": MEDIA_LAYER, "digest": digest, "size": layer.stat().st_size}
        )
    labels = {
        "org.opencontainers.image.title": "sovereign-gateway",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.description": "The SovereignStack gateway",
    }
    config: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "config": {
            "User": f"{recipe.user.uid}:{recipe.user.uid}",
            "Env": [
                f"PATH={recipe.venv}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONDONTWRITEBYTECODE=1",
                "PYTHONUNBUFFERED=1",
            ],
            "Entrypoint": recipe.entrypoint,
            "Cmd": recipe.command,
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        "history": [
            {"created": created, "created_by": "mmdebstrap (images/gateway/recipe.yaml)"},
            {"created": created, "created_by": "pip install the gateway wheelhouse"},
        ],
    }
    config_bytes = dumps(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": writer.add_bytes(config_bytes),
            "size": len(config_bytes),
        },
        "layers": descriptors,
        "annotations": labels,
    }
    manifest_bytes = dumps(manifest)
    digest = writer.add_bytes(manifest_bytes)
    writer.manifests.append(
        Descriptor(MEDIA_MANIFEST, digest, len(manifest_bytes), {REF_NAME: version})
    )
    writer.write_layout()
    size = sum(writer.sizes.values())
    return digest, size


def _run(
    argv: list[str],
    log: Path | None,
    timeout: float = STEP_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"`{argv[0]}` ran past {timeout:.0f} s") from None
    said = done.stdout + done.stderr
    if log is not None:
        log.write_text(said)
    if done.returncode != 0:
        tail = "\n".join(said.strip().splitlines()[-30:])
        raise ImageError(f"`{shlex.join(argv[:6])} ...` failed ({done.returncode}):\n{tail}")
