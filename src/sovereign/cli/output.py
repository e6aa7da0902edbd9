"""Shared console output for the CLI: rich on stdout, plain error lines on stderr."""

from __future__ import annotations

import typer
from rich.console import Console

from sovereign.profile.loader import ProfileError

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

# click's convention, which Typer keeps: 2 means the input was wrong.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print one `error:` line on stderr; give the Exit for the caller to raise."""
    errors.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def report_profile_error(error: ProfileError) -> None:
    for issue in error.issues:
        errors.print(
            f"{issue.file}:{issue.line}:{issue.column}: error: {issue.path}: {issue.message}",
            markup=False,
        )
