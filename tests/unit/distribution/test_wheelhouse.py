"""What the wheelhouse pins, for which nodes, and what this machine can build from source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from sovereign.distribution.builds import sdist_wheel
from sovereign.distribution.wheelhouse import GATEWAY_LOCK, requirements, wheelhouse_spec
from sovereign.mirror.artifact import Artifact
from sovereign.mirror.fetch import MirrorError
from sovereign.mirror.pypi import Pin, Target
from sovereign.profile.loader import load_profile

ROOT = Path(__file__).resolve().parents[3]


def _wheel(name: str, version: str, digest: str) -> Artifact:
    return Artifact("wheel", name, version, f"{name}-{version}.whl", digest, 1, "test", None)


def test_each_distribution_is_pinned_once_with_every_file_hash_and_the_gateway_extra() -> None:
    wheels = [
        _wheel("numpy", "2.4.6", "a" * 64),
        _wheel("numpy", "2.4.6", "b" * 64),  # the same release for another platform
        _wheel("llama-cpp-python", "0.3.36", "c" * 64),
        _wheel("sovereign-gateway", "0.1.0", "d" * 64),
    ]
    text = requirements(wheels, [Target.parse("3.11", "manylinux_2_36_x86_64")])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "llama-cpp-python==0.3.36 \\",
        f"    --hash=sha256:{'c' * 64}",
        "numpy==2.4.6 \\",
        f"    --hash=sha256:{'a' * 64} \\",
        f"    --hash=sha256:{'b' * 64}",
        "sovereign-gateway[llamacpp]==0.1.0 \\",
        f"    --hash=sha256:{'d' * 64}",
    ]
    assert "pip install --no-index --require-hashes" in text


def test_a_profile_without_bundle_wheels_gets_the_gateway_lock_for_its_nodes() -> None:
    edge = wheelhouse_spec(load_profile(ROOT / "profiles/edge.yaml"), ROOT / "edge.yaml", None)
    assert edge.lock == GATEWAY_LOCK
    assert edge.index == "https://pypi.org/simple/"
    assert [str(target) for target in edge.targets] == ["cp311-manylinux_2_36_aarch64"]
    ward = ROOT / "profiles/air-gapped.yaml"
    spec = wheelhouse_spec(load_profile(ward), ward, "http://127.0.0.1:9/simple/")
    assert spec.lock == ROOT / "profiles/locks/gateway.txt"
    assert spec.index == "http://127.0.0.1:9/simple/"


def test_an_sdist_for_another_platform_is_refused_before_any_build(tmp_path: Path) -> None:
    pin = Pin(canonicalize_name("llama-cpp-python"), Version("0.3.36"), frozenset(), None,
              "gateway.txt:674")  # fmt: skip
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"not built")

    class Unused:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"the builder was used ({name})")

    arm = Target.parse("3.11", "manylinux_2_36_aarch64")
    with pytest.raises(MirrorError, match="can build its sdist only for itself"):
        sdist_wheel(pin, sdist, arm, Unused())  # type: ignore[arg-type]
    older = Target.parse("3.10", "manylinux_2_36_x86_64")
    with pytest.raises(MirrorError, match=re.escape("gateway.txt:674: llama-cpp-python==0.3.36")):
        sdist_wheel(pin, sdist, older, Unused())  # type: ignore[arg-type]
