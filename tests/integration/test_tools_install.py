"""`sovereign tools install` run twice for real: the second run must change nothing and be quick.

Takes the real tools cache (CI runs `sovereign tools install` first); gives pass or fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sovereign import tools

NAMES = ("opa", "keycloak", "smollm2", "minilm")
SOVEREIGN = Path(sys.executable).parent / "sovereign"


def _install() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SOVEREIGN), "tools", "install", *NAMES],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def _receipt_mtimes() -> dict[str, int]:
    root = tools.tools_dir()
    return {
        name: (root / f"{name}-{tools.REGISTRY[name].version}" / tools.RECEIPT).stat().st_mtime_ns
        for name in NAMES
    }


@pytest.mark.slow
def test_second_install_does_nothing_and_is_quick() -> None:
    first = _install()
    assert first.returncode == 0, first.stdout + first.stderr
    before = _receipt_mtimes()

    start = time.monotonic()
    second = _install()
    elapsed = time.monotonic() - start

    assert second.returncode == 0, second.stdout + second.stderr
    assert "Nothing to do" in second.stdout
    assert _receipt_mtimes() == before
    # A behaviour check, not a benchmark: anything near a rebuild takes minutes.
    assert elapsed < 10, f"second install took {elapsed:.1f} s"
    assert tools.opa_binary().is_file()
    assert (tools.keycloak_home() / "bin" / "kc.sh").is_file()
    assert tools.smollm2_gguf().stat().st_size == 98_362_432
    assert tools.minilm_onnx().stat().st_size == 22_928_619
    assert tools.minilm_tokenizer().is_file()


@pytest.mark.slow
def test_doctor_lists_opa_and_keycloak_with_the_versions_they_report() -> None:
    proc = subprocess.run(
        [str(SOVEREIGN), "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    findings = {f["name"]: f for f in json.loads(proc.stdout)["findings"]}
    # Versions are probed from the installed files (`opa version`, Keycloak's version.txt),
    # not copied from the pins.
    assert (findings["opa"]["present"], findings["opa"]["version"]) == (True, tools.OPA_VERSION)
    keycloak = findings["keycloak"]
    assert (keycloak["present"], keycloak["version"]) == (True, tools.KEYCLOAK_VERSION)
    table = subprocess.run(
        [str(SOVEREIGN), "doctor"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "opa" in table
    assert "1.22.3" in table
    assert "keycloak" in table
    assert "26.5.6" in table
