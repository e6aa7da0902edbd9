"""Run the `sovereign` command as a user does: a process of its own, its exit code and output.

Commands that delegate to `sovereign-gateway admin` print from that child process, which
an in-process runner would not capture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.gateway.tests.commands import Ran

SOVEREIGN = Path(sys.executable).with_name("sovereign")


def sovereign(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> Ran:
    done = subprocess.run(
        [str(SOVEREIGN), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    return Ran(done.returncode, done.stdout, done.stderr)
