"""`sovereign-gateway --config FILE`: a bad or missing config exits 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.gateway.tests.configs import config_document


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sovereign_gateway", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_invalid_config_exits_2_with_the_field_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    document = config_document(tmp_path)
    document["listen"]["port"] = "8000"
    path.write_text(json.dumps(document))

    proc = _run(path)

    assert proc.returncode == 2
    assert "listen.port: Input should be a valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_exits_2(tmp_path: Path) -> None:
    proc = _run(tmp_path / "absent.json")

    assert proc.returncode == 2
    assert "cannot read" in proc.stderr


def test_a_config_of_another_schema_version_exits_2_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    document = config_document(tmp_path)
    document["schema_version"] = 1
    path.write_text(json.dumps(document))

    proc = _run(path)

    assert proc.returncode == 2
    assert "this gateway reads config schema_version 2, not 1" in proc.stderr
    assert "Traceback" not in proc.stderr
