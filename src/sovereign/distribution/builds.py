"""Wheels built here from source: the gateway's own, and sdists the index has no wheel of.

Built by pip without isolation in a throwaway venv holding the pinned build lock; an
sdist's wheel is cached by its sha256, its flags and the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from sovereign.image.recipe import REPOSITORY
from sovereign.mirror.fetch import MirrorError
from sovereign.mirror.pypi import Pin, Target

BUILD_LOCK = REPOSITORY / "profiles" / "locks" / "gateway-build.txt"
GATEWAY_SOURCE = REPOSITORY / "services" / "gateway"
# llama-cpp-python's native build enables AMX and segfaults on the first generation on
# CPUs without it (COMPONENTS.md); the portable build runs on any x86-64 or arm64 node.
BUILD_FLAGS: dict[str, dict[str, str]] = {"llama-cpp-python": {"CMAKE_ARGS": "-DGGML_NATIVE=OFF"}}
# Bumped when wheels are built differently, so older cache entries are not reused.
BUILDER_VERSION = "1"
BUILD_TIMEOUT_S = 3600
MACHINES = {"x86_64": "x86_64", "aarch64": "aarch64", "amd64": "x86_64", "arm64": "aarch64"}

Log = Callable[[str], None]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("SOVEREIGN_WHEEL_CACHE", f"{base}/sovereign/wheels"))


class BuildEnvironment:
    """A venv with the build lock installed from `index`; made on first use, then reused."""

    def __init__(self, index: str, work: Path, log: Log) -> None:
        self.index = index
        self.root = work / "build-env"
        self.log = log

    def python(self) -> Path:
        """The venv's interpreter, the venv made first if this is the first build."""
        if not (self.root / "bin" / "python").exists():
            self.log(f"build environment: {BUILD_LOCK.name} from {self.index}")
            _run([sys.executable, "-m", "venv", str(self.root)], "making the build venv")
            _run(
                [str(self.root / "bin" / "python"), "-m", "pip", "install", "--quiet",
                 "--no-cache-dir", "--disable-pip-version-check", "--require-hashes",
                 "--index-url", self.index, "-r", str(BUILD_LOCK)],
                "installing the build lock",
            )  # fmt: skip
        return self.root / "bin" / "python"

    def wheel(self, source: Path, out: Path, env: dict[str, str] | None = None) -> Path:
        """pip wheel of `source` (an sdist or a project directory) into the empty `out`."""
        # Without isolation pip puts no build environment on PATH; the backends look for
        # their tools there (uv_build for its `uv-build` binary).
        path = f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
        _run(
            [str(self.python()), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-cache-dir", "--disable-pip-version-check", "--wheel-dir", str(out),
             str(source)],
            f"building {source.name}",
            {**(env or {}), "PATH": path},
        )  # fmt: skip
        wheels = list(out.glob("*.whl"))
        if len(wheels) != 1:
            raise MirrorError(f"building {source.name} left {len(wheels)} wheels, not one")
        return wheels[0]


def sdist_wheel(pin: Pin, sdist: Path, target: Target, builder: BuildEnvironment) -> Path:
    """The wheel of a hash-checked sdist for `target`: from the cache, else built here."""
    _check_host(pin, target)
    flags = BUILD_FLAGS.get(pin.name, {})
    sdist_sha256 = hashlib.sha256(sdist.read_bytes()).hexdigest()
    key = hashlib.sha256(
        json.dumps([BUILDER_VERSION, sdist_sha256, flags, str(target)], sort_keys=True).encode()
    ).hexdigest()[:16]
    entry = cache_root() / f"{pin.name}-{pin.version}-{key}"
    cached = sorted(entry.glob("*.whl"))
    if cached:
        builder.log(f"{pin.name} {pin.version}: the wheel built earlier ({entry.name})")
        return cached[0]
    builder.log(f"{pin.name} {pin.version}: building from its sdist with {flags or 'no flags'}")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    try:
        wheel = builder.wheel(sdist, staging, flags)
        (staging / "build.json").write_text(
            json.dumps(
                {"sdist": sdist.name, "sdist_sha256": sdist_sha256, "flags": flags,
                 "target": str(target), "python": platform.python_version()},
                indent=2,
            )
            + "\n"
        )  # fmt: skip
        try:
            staging.rename(entry)
        except OSError:
            # Another build of the same inputs finished first; its wheel is as good.
            shutil.rmtree(staging)
        return entry / wheel.name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_host(pin: Pin, target: Target) -> None:
    """An sdist is built by this machine's compiler for this machine's Python: the target
    must be what runs here, with a glibc no older than this machine's."""
    here_python = sys.version_info[:2]
    machine = MACHINES.get(platform.machine(), platform.machine())
    libc, version = platform.libc_ver()
    wanted = target.platform
    glibc = tuple(int(part) for part in version.split(".")[:2]) if libc == "glibc" else None
    manylinux = wanted.split("_")
    target_glibc = (
        (int(manylinux[1]), int(manylinux[2]))
        if wanted.startswith("manylinux_") and len(manylinux) > 3
        else None
    )
    if (
        target.python != here_python
        or not wanted.endswith(f"_{machine}")
        or glibc is None
        or (target_glibc is not None and target_glibc < glibc)
    ):
        raise MirrorError(
            f"{pin.where}: {pin.name}=={pin.version} has no wheel for {target}, and this "
            f"machine (cp{here_python[0]}{here_python[1]}, {machine}, {libc} {version}) can "
            "build its sdist only for itself; build the wheelhouse on a machine like the node"
        )


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    environment = {
        **os.environ,
        # The lock and the given index are all pip may use: no user or site config.
        "PIP_CONFIG_FILE": os.devnull,
        "PYTHONNOUSERSITE": "1",
        **(env or {}),
    }
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=environment,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MirrorError(f"{what} ran past {BUILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise MirrorError(f"{what} failed ({done.returncode}):\n{tail}")
