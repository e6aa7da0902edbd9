"""Run `sovereign-gateway admin` in this process, as its console script would, for the tests."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from sovereign_gateway import admin


@dataclass(frozen=True)
class Ran:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_admin(*args: str | Path) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = admin.main([str(arg) for arg in args])
        except SystemExit as exit:  # argparse's usage errors
            code = int(exit.code or 0)
    return Ran(code, out.getvalue(), err.getvalue())
