"""The PyPI mirror against real indexes on loopback: pypiserver (PEP 503 HTML) and proxpi in
front of it (PEP 691 JSON). What it mirrors is then installed by pip with --require-hashes
from a fresh pypiserver over the mirror, with no other index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sovereign.mirror.fetch import DownloadsFailed, Fetcher, MirrorError
from sovereign.mirror.pypi import Target, mirror_wheels, project_page
from tests.integration.airgap.servers import file_server, new_fetcher, proxpi, pypiserver
from tests.integration.airgap.wheels import make_wheel, sha256

pytestmark = pytest.mark.timeout(180)

TARGETS = [
    Target.parse("3.11", "manylinux_2_36_x86_64"),
    Target.parse("3.12", "manylinux_2_36_x86_64"),
]
CHOSEN = {
    "demo_pkg-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
    "demo_pkg-1.0-cp312-cp312-manylinux_2_17_x86_64.whl",
    "helper-2.0-py3-none-any.whl",
    "classic-3.1-py3-none-any.whl",
}


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[Path, Path]:
    """An index's packages, and a lock pinning some of them with every file's hash."""
    packages = tmp_path / "upstream"
    demo = [
        make_wheel(packages, "demo-pkg", "1.0", tag)
        for tag in (
            "cp311-cp311-manylinux_2_17_x86_64",
            "cp312-cp312-manylinux_2_17_x86_64",
            # Needs glibc 2.38; the targets have 2.36.
            "cp311-cp311-manylinux_2_38_x86_64",
            "cp311-cp311-macosx_11_0_arm64",
        )
    ]
    make_wheel(packages, "demo-pkg", "0.9")  # on the index, not pinned
    helper = make_wheel(packages, "helper", "2.0", licence="Apache-2.0")
    classic = make_wheel(
        packages, "classic", "3.1", classifier="License :: OSI Approved :: MIT License"
    )
    windows = make_wheel(packages, "winonly", "1.0")
    hashes = " \\\n    ".join(f"--hash=sha256:{sha256(w)}" for w in demo)
    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "# uv export --format requirements-txt\n"
        f"demo-pkg==1.0 \\\n    {hashes}\n"
        f"helper==2.0 \\\n    --hash=sha256:{sha256(helper)}\n"
        f"classic==3.1 --hash=sha256:{sha256(classic)}\n"
        f'winonly==1.0 ; sys_platform == "win32" \\\n    --hash=sha256:{sha256(windows)}\n'
    )
    return packages, lock


def _fetcher() -> Fetcher:
    return new_fetcher()


def _pip_install(
    index: str, lock: Path, target: Path, *cross: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--index-url",
            index,
            "--require-hashes",
            "-r",
            str(lock),
            "--target",
            str(target),
            "--only-binary=:all:",
            *cross,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
        check=False,
        timeout=120,
    )


def test_the_pinned_wheels_for_each_target_come_through_pep_503_and_pip_installs_them(
    tmp_path: Path, upstream: tuple[Path, Path]
) -> None:
    packages, lock = upstream
    out = tmp_path / "mirror"
    with pypiserver(packages, tmp_path / "pypiserver.log") as index:
        assert project_page(_fetcher(), index, "demo-pkg").api == "html"
        artifacts = mirror_wheels(lock, index, out, _fetcher(), TARGETS)
    assert {a.path for a in artifacts} == CHOSEN
    assert {p.name for p in out.glob("*.whl")} == CHOSEN
    for artifact in artifacts:
        assert artifact.sha256 == sha256(out / artifact.path)
        assert artifact.source.startswith(index.removesuffix("simple/"))
    licences = {a.name: a.licence for a in artifacts}
    assert licences == {"demo-pkg": None, "helper": "Apache-2.0", "classic": "MIT"}
    assert json.loads((out / "wheels.json").read_text()) == [a.to_json() for a in artifacts]

    with pypiserver(out, tmp_path / "mirror-server.log") as mirror:
        # This machine is a 3.11 target itself; 3.12 is installed as pip's cross-install
        # (whose --platform takes the one tag given, not the older manylinux ones too).
        cross_312 = ("--python-version", "3.12", "--platform", "manylinux_2_17_x86_64")
        for version, cross in (("311", ()), ("312", cross_312)):
            target = tmp_path / f"site-{version}"
            installed = _pip_install(mirror, lock, target, *cross)
            assert installed.returncode == 0, installed.stderr
            init = (target / "demo_pkg" / "__init__.py").read_text()
            assert f"cp{version}-cp{version}-manylinux_2_17_x86_64" in init
            assert (target / "helper").is_dir()
            assert not (target / "winonly").exists()


def test_the_json_api_gives_the_same_wheels(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    packages, lock = upstream
    out = tmp_path / "mirror"
    with (
        pypiserver(packages, tmp_path / "pypiserver.log") as html_index,
        proxpi(html_index, tmp_path / "proxpi-cache", tmp_path / "proxpi.log") as index,
    ):
        assert project_page(_fetcher(), index, "demo-pkg").api == "json"
        artifacts = mirror_wheels(lock, index, out, _fetcher(), TARGETS)
    assert {a.path for a in artifacts} == CHOSEN
    assert all(a.sha256 == sha256(out / a.path) for a in artifacts)


def test_a_wheel_whose_hash_the_lock_does_not_allow_is_refused_naming_the_line(
    tmp_path: Path, upstream: tuple[Path, Path]
) -> None:
    packages, lock = upstream
    # The index now carries a different build of helper 2.0 than the one locked.
    make_wheel(packages, "helper", "2.0", licence="MIT")
    out = tmp_path / "mirror"
    with (
        pypiserver(packages, tmp_path / "pypiserver.log") as index,
        pytest.raises(MirrorError) as caught,
    ):
        mirror_wheels(lock, index, out, _fetcher(), TARGETS)
    message = str(caught.value)
    assert f"{lock}:7: no wheel of helper==2.0" in message
    assert "helper-2.0-py3-none-any.whl" in message
    assert not out.exists() or not list(out.glob("helper*"))


def test_an_index_that_lies_about_a_file_is_caught_by_its_digest(
    tmp_path: Path, upstream: tuple[Path, Path]
) -> None:
    """A static PEP 503 tree whose page states the locked hash while serving other bytes."""
    packages, lock = upstream
    tree = tmp_path / "tree"
    for wheel in packages.glob("*.whl"):
        project = wheel.name.split("-")[0].replace("_", "-")
        folder = tree / "simple" / project
        folder.mkdir(parents=True, exist_ok=True)
        (folder / wheel.name).write_bytes(wheel.read_bytes())
    for folder in (tree / "simple").iterdir():
        links = "".join(
            f'<a href="{w.name}#sha256={sha256(packages / w.name)}">{w.name}</a>\n'
            for w in sorted(folder.glob("*.whl"))
        )
        (folder / "index.html").write_text(f"<!DOCTYPE html><html><body>{links}</body></html>")
    served = tree / "simple" / "classic" / "classic-3.1-py3-none-any.whl"
    served.write_bytes(served.read_bytes() + b"tampered")
    out = tmp_path / "mirror"
    with file_server(tree, tmp_path / "server.log") as server:
        index = f"{server.url}/simple/"
        with pytest.raises(DownloadsFailed) as caught:
            mirror_wheels(lock, index, out, _fetcher(), TARGETS)
    failed = list(caught.value.failures)
    assert failed == [f"{index}classic/classic-3.1-py3-none-any.whl"]
    assert not (out / "classic-3.1-py3-none-any.whl").exists()
    assert not list(out.glob("*.part"))
