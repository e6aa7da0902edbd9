"""`sovereign gateway wheels`: every wheel the gateway needs on a profile's nodes, hash-locked.

The lock's wheels for the nodes' Python and platforms (sdist-only ones built here), the
gateway's own wheel, pip to install them, and `requirements.txt` pinning each by sha256.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sovereign.bundle.layout import move_into_place, new_staging, remove_staging
from sovereign.distribution.builds import (
    BUILD_LOCK,
    GATEWAY_SOURCE,
    BuildEnvironment,
    sdist_wheel,
)
from sovereign.image.recipe import REPOSITORY
from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import Fetcher, MirrorError
from sovereign.mirror.pypi import (
    MANIFEST,
    Pin,
    Target,
    built_wheel,
    mirror_wheels,
    read_requirements,
)
from sovereign.profile.model import Profile

GATEWAY_LOCK = REPOSITORY / "profiles" / "locks" / "gateway.txt"
DEFAULT_INDEX = "https://pypi.org/simple/"
# A node's Python and C library: Debian 12 (bookworm), which every node image is.
NODE_PYTHON = "3.11"
NODE_GLIBC = "2_36"
NODE_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
REQUIREMENTS = "requirements.txt"
# pip's own wheel, run from the file (`python3 installer/pip-*.whl/pip install ...`), so
# that a node or an image without pip installs the wheelhouse and keeps no pip afterwards.
INSTALLER = "installer"
GATEWAY = "sovereign-gateway"
# The extra that brings the embedded llama.cpp engine, installed whenever its lock has it.
LLAMACPP_EXTRA = ("llamacpp", "llama-cpp-python")

Log = Callable[[str], None]


@dataclass(frozen=True)
class WheelhouseSpec:
    """What to fetch from where, for which Python and platforms."""

    lock: Path
    index: str
    targets: list[Target]


def wheelhouse_spec(profile: Profile, profile_path: Path, index: str | None) -> WheelhouseSpec:
    """The profile's `bundle.wheels` when it has one; else the gateway's own lock from PyPI
    for the Python and platform of each of its nodes."""
    wheels = None if profile.bundle is None else profile.bundle.wheels
    if wheels is not None:
        lock = Path(wheels.requirements)
        return WheelhouseSpec(
            lock if lock.is_absolute() else profile_path.parent / lock,
            index or str(wheels.index),
            [Target.parse(python, tag) for python in wheels.python for tag in wheels.platforms],
        )
    platforms = sorted({NODE_MACHINES[node.arch] for node in profile.nodes})
    return WheelhouseSpec(
        GATEWAY_LOCK,
        index or DEFAULT_INDEX,
        [Target.parse(NODE_PYTHON, f"manylinux_{NODE_GLIBC}_{machine}") for machine in platforms],
    )


@dataclass(frozen=True)
class Collected:
    """What a wheelhouse holds, in the directory it was collected into."""

    directory: Path
    wheels: list[Artifact]  # every wheel requirements.txt pins, the gateway's own last
    installer: Artifact  # pip's wheel, which installs them and is not pinned with them


def collect_wheels(spec: WheelhouseSpec, directory: Path, fetcher: Fetcher, log: Log) -> Collected:
    """Fetch (or build) every wheel into `directory`, which keeps what it already holds, so
    a second run fetches only what changed."""
    with tempfile.TemporaryDirectory(prefix="sovereign-wheelhouse-") as work:
        builder = BuildEnvironment(spec.index, Path(work), log)

        def build(pin: Pin, sdist: Path, target: Target) -> Path:
            return sdist_wheel(pin, sdist, target, builder)

        wheels = mirror_wheels(spec.lock, spec.index, directory, fetcher, spec.targets, build)
        log(f"{len(wheels)} wheel(s) for {', '.join(map(str, spec.targets))}")
        pip = Path(work) / "pip.txt"
        pip.write_text(_pinned(BUILD_LOCK, "pip"))
        [installer] = mirror_wheels(
            pip, spec.index, directory / INSTALLER, fetcher, spec.targets[:1]
        )
        gateway = builder.wheel(GATEWAY_SOURCE, Path(work) / "gateway")
        shutil.copyfile(gateway, directory / gateway.name)
    source = f"built from {GATEWAY_SOURCE.relative_to(REPOSITORY)}"
    return Collected(directory, [*wheels, built_wheel(directory / gateway.name, source)], installer)


def build_wheelhouse(
    spec: WheelhouseSpec, out: Path, cache: Path, fetcher: Fetcher, log: Log
) -> Collected:
    """The wheelhouse at `out`, whole or not at all; what was fetched stays in `cache`."""
    collected = collect_wheels(spec, cache, fetcher, log)
    staging = new_staging(out)
    try:
        for wheel in collected.wheels:
            shutil.copyfile(cache / wheel.path, staging / wheel.path)
        (staging / INSTALLER).mkdir()
        installer = collected.installer.path
        shutil.copyfile(cache / INSTALLER / installer, staging / INSTALLER / installer)
        (staging / MANIFEST).write_text(
            json.dumps([wheel.to_json() for wheel in collected.wheels], indent=2) + "\n"
        )
        (staging / REQUIREMENTS).write_text(requirements(collected.wheels, spec.targets))
        move_into_place(staging, out)
    finally:
        remove_staging(staging)
    return Collected(out, collected.wheels, collected.installer)


def requirements(wheels: list[Artifact], targets: list[Target]) -> str:
    """One line per distribution, pinned, with the sha256 of each of its files here."""
    hashes: dict[tuple[str, str], list[str]] = {}
    for wheel in wheels:
        hashes.setdefault((wheel.name, wheel.version), []).append(wheel.sha256)
    names = {name for name, _ in hashes}
    extra, needs = LLAMACPP_EXTRA
    lines = [
        f"# The gateway's wheels for {', '.join(map(str, targets))}, each pinned by the sha256",
        "# of its file beside this one. On the node, with no index:",
        "#   pip install --no-index --require-hashes --find-links DIR -r DIR/requirements.txt",
    ]
    for (name, version), digests in sorted(hashes.items()):
        shown = f"{name}[{extra}]" if name == GATEWAY and needs in names else name
        pins = " \\\n".join(f"    --hash=sha256:{digest}" for digest in sorted(set(digests)))
        lines.append(f"{shown}=={version} \\\n{pins}")
    return "\n".join(lines) + "\n"


def _pinned(lock: Path, name: str) -> str:
    """The one requirement of `lock` named `name`, as a requirements file of its own."""
    for pin in read_requirements(lock):
        if pin.name == name:
            hashes = " ".join(f"--hash=sha256:{digest}" for digest in sorted(pin.hashes))
            return f"{pin.name}=={pin.version} {hashes}\n"
    raise MirrorError(f"{lock}: pins no {name}")
