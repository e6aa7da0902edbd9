"""The installed OPA evaluates a small Rego v1 policy: admin allowed, guest and no input denied.

Takes the cached `opa` binary and a policy in tmp_path; gives pass or fail.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sovereign import tools

POLICY = """\
package smoke

default allow := false

allow if input.role == "admin"
"""


def _allow(tmp_path: Path, input_doc: dict[str, str] | None) -> object:
    policy = tmp_path / "policy.rego"
    policy.write_text(POLICY)
    cmd = [str(tools.opa_binary()), "eval", "--format", "json", "-d", str(policy)]
    if input_doc is not None:
        input_file = tmp_path / "input.json"
        input_file.write_text(json.dumps(input_doc))
        cmd += ["-i", str(input_file)]
    proc = subprocess.run(
        [*cmd, "data.smoke.allow"], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(proc.stdout)["result"][0]["expressions"][0]["value"]


@pytest.mark.slow
def test_admin_is_allowed(tmp_path: Path) -> None:
    assert _allow(tmp_path, {"role": "admin"}) is True


@pytest.mark.slow
def test_guest_is_denied(tmp_path: Path) -> None:
    assert _allow(tmp_path, {"role": "guest"}) is False


@pytest.mark.slow
def test_missing_input_fails_closed(tmp_path: Path) -> None:
    assert _allow(tmp_path, None) is False
