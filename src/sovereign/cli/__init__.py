"""The `sovereign` command line: one Typer app with a sub-app per noun.

Each sub-module registers its commands on `app`; `main` is the console entry point.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sovereign",
    help="Render, build, ship and verify sovereign AI nodes from one node profile.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    app()


# Imported last, for their side effect of registering commands on `app`.
from sovereign.cli import (  # noqa: E402, F401
    audit,
    bundle,
    bundle_volumes,
    gateway,
    image,
    lock,
    media,
    memory,
    profile,
    stack,
    token,
    tools,
    up,
    verify,
)
