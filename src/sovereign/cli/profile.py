"""`sovereign profile validate|show|schema` and `sovereign render`."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.output import (
    EXIT_BAD_INPUT,
    console,
    errors,
    report_profile_error,
)
from sovereign.profile.defaults import EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME
from sovereign.profile.loader import ProfileError, load_profile, parse_profile
from sovereign.profile.model import Profile
from sovereign.profile.schema import input_schema
from sovereign.render import RenderError, registry, render_to
from sovereign.render.resolved import to_yaml

profile_app = typer.Typer(help="Validate, show and describe node profiles.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")


class Format(StrEnum):
    yaml = "yaml"
    json = "json"


def load_or_exit(path: Path | None) -> Profile:
    """The profile at `path` (the embedded personal default when None), or exit 2."""
    try:
        if path is None:
            return parse_profile(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME)
        return load_profile(path)
    except ProfileError as error:
        report_profile_error(error)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@profile_app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="profile files to check")],
) -> None:
    """Check profiles; exit 2 if any is invalid, naming file:line:column and field."""
    failed = 0
    for path in files:
        try:
            profile = load_profile(path)
        except ProfileError as error:
            report_profile_error(error)
            failed += 1
            continue
        console.print(f"[green]✓[/green] {path}: valid {profile.kind} profile {profile.name!r}")
    if failed:
        errors.print(f"{failed} of {len(files)} profile(s) invalid", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)


@profile_app.command()
def show(
    file: Annotated[
        Path | None, typer.Argument(help="profile file; the embedded personal default if left out")
    ] = None,
    output_format: Annotated[Format, typer.Option("--format", "-f")] = Format.yaml,
) -> None:
    """Print the profile resolved with the defaults of its kind."""
    profile = load_or_exit(file)
    if output_format is Format.json:
        print(profile.model_dump_json(indent=2))
    else:
        print(to_yaml(profile), end="")


@profile_app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write here, not stdout")] = None,
) -> None:
    """Print the JSON Schema of profile files, for editors and CI."""
    text = json.dumps(input_schema(), indent=2) + "\n"
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)


@app.command()
def render(
    file: Annotated[Path | None, typer.Argument(help="profile file")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only these renderers (repeatable)")
    ] = None,
    list_renderers: Annotated[bool, typer.Option("--list", help="list renderers and exit")] = False,
) -> None:
    """Render everything a profile drives into --out, all files or none."""
    if list_renderers:
        for renderer in registry().values():
            console.print(f"[bold]{renderer.name}[/bold]  {renderer.summary}")
        return
    if file is None or out is None:
        errors.print("error: render needs a profile FILE and --out DIR", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    profile = load_or_exit(file)
    try:
        written = render_to(profile, out, only)
    except RenderError as error:
        errors.print(f"error: {error}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for path, digest in written.items():
        console.print(f"{out / path}  [dim]sha256:{digest[:16]}[/dim]")
