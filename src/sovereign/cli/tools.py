"""`sovereign tools install|list` and `sovereign doctor`: the pinned real components on this host.

Takes component names and flags; gives rich progress and tables (or JSON) and an exit code.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sovereign import tools
from sovereign.cli import app

tools_app = typer.Typer(
    help="Fetch or build the pinned real components (OPA, Keycloak, models, ...).",
    no_args_is_help=True,
)
app.add_typer(tools_app, name="tools")

console = Console()
err = Console(stderr=True)


def _select(names: list[str] | None) -> list[tools.Component]:
    if not names:
        return list(tools.REGISTRY.values())
    unknown = [n for n in names if n not in tools.REGISTRY]
    if unknown:
        err.print(
            Text(
                f"unknown tool: {', '.join(unknown)}; valid names: {', '.join(tools.REGISTRY)}",
                style="red",
            )
        )
        raise typer.Exit(2)
    # dict.fromkeys keeps order and drops repeats.
    return [tools.REGISTRY[n] for n in dict.fromkeys(names)]


@tools_app.command("install")
def install(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="Components to install; all of them when none are given.", show_default=False
        ),
    ] = None,
) -> None:
    """Install pinned components into the tools cache; already installed ones are left alone."""
    if not install_components(_select(names)):
        raise typer.Exit(1)


def install_components(selected: list[tools.Component]) -> bool:
    """Install each component, with progress and a table of what was done; False if any failed."""
    root = tools.tools_dir()
    results: list[tuple[tools.Component, str, str, float]] = []
    failed = False
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        for component in selected:
            label = f"{component.name} {component.version}"
            task = progress.add_task(label)

            def step(message: str, task: TaskID = task, label: str = label) -> None:
                progress.update(task, description=f"{label}: {message}")
                progress.console.print(Text(f"{label}: {message}", style="dim"), soft_wrap=True)

            start = time.monotonic()
            try:
                outcome = component.install(root, step)
            except tools.InstallFailed as exc:
                failed = True
                results.append((component, "failed", str(exc), time.monotonic() - start))
                progress.console.print(Text(f"{label} failed: {exc}", style="bold red"))
                if exc.tail:
                    progress.console.print(Text(exc.tail, style="red"))
            else:
                results.append(
                    (component, outcome.status, outcome.detail, time.monotonic() - start)
                )
            progress.remove_task(task)

    if all(status == "present" for _, status, _, _ in results):
        console.print(f"Nothing to do: {len(results)} already installed in {root}.")
        return True
    table = Table(title=f"sovereign tools ({root})")
    for column in ("tool", "version", "result", "time"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold")
    styles = {"installed": "green", "present": "green", "skipped": "yellow", "failed": "red"}
    for component, status, detail, seconds in results:
        shown = "already installed" if status == "present" else status
        table.add_row(
            component.name,
            component.version,
            Text(shown, style=styles[status]),
            f"{seconds:.1f}s",
            Text(detail),
        )
    console.print(table)
    return not failed


@tools_app.command("list")
def list_tools() -> None:
    """List the pinned components, whether each is installed, and where."""
    root = tools.tools_dir()
    table = Table(title=f"sovereign tools ({root})")
    for column in ("tool", "version", "installed", "path"):
        table.add_column(column)
    for component in tools.REGISTRY.values():
        finding = component.inspect(root)
        table.add_row(
            component.name,
            component.version,
            Text("yes", style="green") if finding.present else Text("no", style="red"),
            Text(finding.detail),
        )
    console.print(table)


@app.command()
def doctor(
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when anything required is missing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Report host tools and pinned components: present or missing, versions, what a gap blocks."""
    root = tools.tools_dir()
    findings = tools.diagnose(root)
    if as_json:
        typer.echo(
            json.dumps(
                {"tools_dir": str(root), "findings": [asdict(f) for f in findings]}, indent=2
            )
        )
    else:
        _print_findings(findings, root)
    if strict and any(f.required and not f.present for f in findings):
        raise typer.Exit(1)


def _print_findings(findings: list[tools.Finding], root: Path) -> None:
    hosts = Table(title="Host tools", title_justify="left")
    components = Table(title=f"Pinned components ({root})", title_justify="left")
    for table, columns in (
        (hosts, ("name", "status", "version")),
        (components, ("name", "status", "version", "pinned")),
    ):
        for column in columns:
            table.add_column(column, no_wrap=True)
        table.add_column("where", overflow="fold")
    for f in findings:
        if not f.present:
            status = Text(
                "missing" if f.required else "missing (optional)",
                style="red" if f.required else "yellow",
            )
        elif f.pinned and f.version != f.pinned:
            status = Text("present, other version", style="yellow")
        else:
            status = Text("present", style="green")
        cells: list[str | Text] = [f.name, status, f.version or "-"]
        if f.kind == "host":
            hosts.add_row(*cells, Text(f.detail))
        else:
            components.add_row(*cells, f.pinned or "-", Text(f.detail))
    console.print(hosts)
    console.print(components)
    missing = [f for f in findings if not f.present]
    if missing:
        console.print("What is missing blocks:")
        for f in missing:
            line = Text(f"  {f.name}", style="red" if f.required else "yellow")
            line.append(f": {f.blocks}", style="default")
            console.print(line)
