"""The gateway as a node installs it and a cluster runs it: times cold and cached.

- The wheelhouse (`sovereign gateway wheels`) from a loopback index over the locked
  packages, with an empty mirror cache, then again; with `--sdist-build`, llama-cpp-python
  built from its sdist first (an empty wheel cache), which is minutes.
- Its offline install into a fresh venv by pip (`--no-index --require-hashes`), with the
  page cache dropped and then warm, beside `uv pip install` of the same wheelhouse.
- The OCI image (`sovereign gateway image`) with no base cache (mmdebstrap), then cached.

Run as root (mmdebstrap, chroot, drop_caches): `uv run python bench/gateway_dist.py`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway_overhead import free_port, machine, process

from sovereign import tools

ROOT = Path(__file__).resolve().parents[1]
SOVEREIGN = Path(sys.executable).with_name("sovereign")
PROFILE = ROOT / "profiles" / "personal.yaml"


@contextmanager
def index(work: Path) -> Iterator[str]:
    """pypiserver over the gateway's locked packages, on loopback."""
    port = free_port()
    packages = str(tools.gateway_packages())
    command = [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port),
               "--disable-fallback", "-a", ".", "-P", ".", packages]  # fmt: skip
    url = f"http://127.0.0.1:{port}/simple/"
    with process(command, work / "pypiserver.log", url):
        yield url


def timed(argv: list[str | Path], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [str(part) for part in argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}")
    return seconds


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def install(wheelhouse: Path, venv: Path, with_uv: bool, cold: bool) -> float:
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if cold:
        drop_caches()
    requirements = wheelhouse / "requirements.txt"
    offline = {"PIP_CONFIG_FILE": os.devnull, "UV_NO_CONFIG": "1", "UV_OFFLINE": "1"}
    if with_uv:
        uv = os.environ.get("UV") or shutil.which("uv") or "uv"
        argv: list[str | Path] = [uv, "pip", "install", "--python", venv / "bin" / "python",
                                  "--no-index", "--require-hashes", "--no-cache",
                                  "--find-links", wheelhouse, "-r", requirements]  # fmt: skip
    else:
        argv = [venv / "bin" / "pip", "install", "--no-index", "--require-hashes",
                "--no-cache-dir", "--disable-pip-version-check", "--find-links", wheelhouse,
                "-r", requirements]  # fmt: skip
    seconds = timed(argv, offline)
    check = [str(venv / "bin" / "sovereign-gateway"), "admin", "--help"]
    subprocess.run(check, capture_output=True, check=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist-build", action="store_true", help="time llama-cpp-python's build")
    parser.add_argument("--no-image", action="store_true", help="leave the image out")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the image build and drop_caches need it")
    work = Path(tempfile.mkdtemp(prefix="gateway-dist-"))
    print(f"{machine()}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; {work}")
    rows: list[tuple[str, float]] = []
    try:
        with index(work) as url:
            wheels = work / "wheels"
            env = {"XDG_CACHE_HOME": str(work / "cache")}
            if not args.sdist_build:
                # The sdist's wheel from the usual cache: the cold run fetches the rest.
                env["SOVEREIGN_WHEEL_CACHE"] = str(Path.home() / ".cache" / "sovereign" / "wheels")
            command: list[str | Path] = [SOVEREIGN, "gateway", "wheels", PROFILE, "--index", url]
            label = "sdist built" if args.sdist_build else "sdist's wheel cached"
            rows.append(
                (
                    f"wheelhouse, empty mirror cache ({label})",
                    timed([*command, "--out", wheels], env),
                )
            )
            rows.append(
                ("wheelhouse, cached", timed([*command, "--out", work / "wheels-again"], env))
            )
        for cold in (True, False):
            state = "page cache dropped" if cold else "page cache warm"
            rows.append(
                (
                    f"pip install, offline, fresh venv ({state})",
                    install(wheels, work / "venv", False, cold),
                )
            )
            rows.append(
                (
                    f"uv pip install, same wheelhouse ({state})",
                    install(wheels, work / "venv", True, cold),
                )
            )
        if not args.no_image:
            image = [SOVEREIGN, "gateway", "image", PROFILE, "--wheelhouse", wheels]
            images = {"SOVEREIGN_IMAGE_CACHE": str(work / "images")}
            rows.append(
                ("image, no base cache (mmdebstrap)", timed([*image, "--out", work / "i1"], images))
            )
            rows.append(("image, base cached", timed([*image, "--out", work / "i2"], images)))
            same = (work / "i1" / "index.json").read_bytes() == (
                work / "i2" / "index.json"
            ).read_bytes()
            rows.append(
                ("  (the two images' digests are equal)" if same else "  DIGESTS DIFFER", 0.0)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.1f} s" if seconds else name)


if __name__ == "__main__":
    main()
