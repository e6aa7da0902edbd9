"""The toolkit's audit, keys rotate, memory, lock and token commands run the gateway's own
`sovereign-gateway admin` (one implementation, which a node has too), with `--render DIR`
turned into the config it holds, and exit as it does.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import typer
from sovereign_gateway.contract import CONFIG_PATH

from sovereign.cli.output import EXIT_FAILED, fail

GATEWAY_PACKAGE = "sovereign_gateway"


def admin(*arguments: str | Path) -> NoReturn:
    """Run `sovereign-gateway admin ARGUMENTS` with this terminal, and exit as it did."""
    raise typer.Exit(subprocess.run(_command(arguments), check=False).returncode)


def admin_output(*arguments: str | Path) -> str:
    """What `sovereign-gateway admin ARGUMENTS` prints; its `error:` line if it fails."""
    done = subprocess.run(_command(arguments), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AdminFailed(done.stderr.strip() or f"exit {done.returncode}")
    return done.stdout


class AdminFailed(Exception):
    """An admin command run for its output failed; the message is what it said."""


def _command(arguments: tuple[str | Path, ...]) -> list[str]:
    if importlib.util.find_spec(GATEWAY_PACKAGE) is None:
        raise fail(
            "the gateway package (sovereign-gateway) is not installed beside the toolkit; "
            "its admin commands do this work",
            EXIT_FAILED,
        )
    return [sys.executable, "-m", GATEWAY_PACKAGE, "admin", *map(str, arguments)]


def render_config(render: Path) -> Path:
    """The gateway config inside a `sovereign render` output directory."""
    return render / CONFIG_PATH
