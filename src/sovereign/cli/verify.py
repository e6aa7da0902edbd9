"""`sovereign verify` and `sovereign evidence verify`: prove a node, check the proof.

`verify` runs the node suites against a node reached over ssh (or a booted image) and writes
a signed evidence report: exit 0 all passed, 1 a check failed, 2 bad input or no node.
`evidence verify` checks a report's signature: exit 0 valid, 1 refused, 2 bad input.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from sovereign import evidence
from sovereign.cli import app
from sovereign.cli.output import EXIT_FAILED, console, errors, fail
from sovereign.cli.profile import load_or_exit
from sovereign.evidence import Check, EvidenceError, Report
from sovereign.image.boot import BootError
from sovereign.image.node import booted, read_image, verify_context
from sovereign.image.provision import ProvisionError
from sovereign.profile.model import Profile
from sovereign.render import RenderError, render_files
from sovereign.verify import VerifyContext, VerifyError, run_verify, selected_suites

RENDERED_VARS = "ansible/group_vars/all.yml"
OBSERVED_WIDTH = 90
_STYLE = {"passed": "green", "failed": "red", "error": "red", "not_applicable": "dim"}
_MARK = {"passed": "✓", "failed": "✗", "error": "!", "not_applicable": "-"}

evidence_app = typer.Typer(help="Check signed evidence reports.", no_args_is_help=True)
app.add_typer(evidence_app, name="evidence")


@contextmanager
def booted_image(profile: Path, image: Path, identity: Path) -> Iterator[VerifyContext]:
    """Boot the built image with a fresh TPM, run its first-boot roles, yield the context to
    verify it, and stop it on exit. The boot's state (console log, the node's exports) is
    removed afterwards unless the boot or the first-boot roles failed: then it is kept, and
    named, for the operator to read."""
    try:
        built = read_image(image)
    except BootError as error:
        raise VerifyError(str(error)) from None
    wanted = load_or_exit(profile)
    if built.manifest["profile"] != wanted.name:
        raise VerifyError(
            f"{image} was built from profile {built.manifest['profile']!r}, not {wanted.name!r}"
        )
    state = Path(tempfile.mkdtemp(prefix="sovereign-verify-"))
    keep = False
    try:
        with booted(built, state / "boot", identity) as (node, _):
            yield verify_context(node, built, profile)
    except BootError as error:
        keep = True
        raise VerifyError(f"{error} (boot state kept in {state})") from None
    except ProvisionError as error:
        keep = True
        raise VerifyError(f"first-boot roles: {error} (boot state kept in {state})") from None
    finally:
        if not keep:
            shutil.rmtree(state, ignore_errors=True)


@contextmanager
def _rendered_vars(profile: Profile, given: Path | None) -> Iterator[Path]:
    """The role variables file: --vars, else the profile rendered with the ansible renderer."""
    if given is not None:
        yield given
        return
    try:
        files = render_files(profile, ["ansible"])
    except RenderError as error:
        raise VerifyError(str(error)) from None
    if RENDERED_VARS not in files:
        raise VerifyError(
            f"profile {profile.name!r} is for host.os {profile.host.os}; "
            "sovereign verify checks Debian nodes"
        )
    with tempfile.TemporaryDirectory(prefix="sovereign-vars-") as directory:
        path = Path(directory) / "all.yml"
        path.write_bytes(files[RENDERED_VARS])
        yield path


@app.command("verify")
def verify_command(
    profile_file: Annotated[Path, typer.Argument(metavar="PROFILE", help="the node's profile")],
    host: Annotated[
        str | None, typer.Option("--host", help="the node, as ssh://USER@HOST:PORT")
    ] = None,
    identity: Annotated[
        Path | None, typer.Option("--identity", help="ssh private key for the node's admin user")
    ] = None,
    exports: Annotated[
        Path | None,
        typer.Option("--exports", help="what provisioning exported (ak.pub.pem, golden PCRs)"),
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="a built image directory to boot and verify")
    ] = None,
    variables_file: Annotated[
        Path | None,
        typer.Option("--vars", help="rendered role variables (default: render the profile)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="report file (default: NAME-evidence.json)")
    ] = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            "--signing-key",
            help="Ed25519 key (PEM) to sign with, created on first use "
            "(default: ~/.config/sovereign/evidence/ed25519.pem)",
        ),
    ] = None,
) -> None:
    """Run the node checks (attestation, egress, encryption, sandbox, baseline); sign a report."""
    if (host is None) == (image is None):
        raise fail("give the node as exactly one of --host ssh://USER@HOST:PORT or --image DIR")
    if identity is None:
        raise fail("--identity KEY is needed: the ssh key of the node's admin user")
    profile = load_or_exit(profile_file)
    report_path = out or Path(f"{profile.name}-evidence.json")
    key = signing_key or evidence.default_key_path()
    try:
        evidence.check_signing_key_path(key)  # before a node is booted or reached
    except EvidenceError as error:
        raise fail(str(error)) from None
    try:
        if image is not None:
            with booted_image(profile_file.resolve(), image.resolve(), identity) as context:
                report = run_verify(context, report_path, key)
        elif host is not None:
            with _rendered_vars(profile, variables_file) as rendered:
                context = VerifyContext(
                    profile=profile_file.resolve(),
                    vars=rendered.resolve(),
                    host=host,
                    identity=identity.resolve(),
                    exports=None if exports is None else exports.resolve(),
                    suites=selected_suites(profile),
                )
                report = run_verify(context, report_path, key)
    except VerifyError as error:
        raise fail(str(error)) from None
    _print_report(report)
    console.print(f"report: {report_path}", markup=False)
    if not report.passed:
        raise typer.Exit(EXIT_FAILED)


@evidence_app.command("verify")
def evidence_verify_command(
    report_file: Annotated[Path, typer.Argument(metavar="REPORT", help="an evidence report")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="the trusted public key (PEM) (default: the .pub beside the default signing key)",
        ),
    ] = None,
) -> None:
    """Check that a report is signed by the trusted key and unchanged since; print it."""
    key_path = public_key or evidence.public_key_path(evidence.default_key_path())
    if public_key is None and not key_path.is_file():
        raise fail(f"no trusted key at {key_path}: pass --public-key PEM")
    try:
        trusted = evidence.load_trusted_key(key_path)
    except EvidenceError as error:
        raise fail(str(error)) from None
    try:
        data = evidence.read_report(report_file)
        report = evidence.verify(data, trusted)
    except OSError as error:
        raise fail(f"{report_file}: cannot read: {error.strerror or error}") from None
    except EvidenceError as error:
        console.print(f"✗ {report_file}: refused: {error}", markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    console.print(
        f"✓ {report_file}: valid, signed by key {evidence.key_id(trusted)[:16]}…", markup=False
    )
    _print_report(report)


def _print_report(report: Report) -> None:
    image = "" if report.image is None else f", image {report.image.get('digest', '?')}"
    console.print(
        f"profile {report.profile}, node {report.node.hostname} "
        f"(machine-id {report.node.machine_id}){image}, {report.started} → {report.finished}",
        markup=False,
    )
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("observed", overflow="fold")
    for check in report.checks:
        result = f"{_MARK[check.outcome]} {check.outcome.replace('_', ' ')}"
        table.add_row(
            Text(check.id), Text(result, style=_STYLE[check.outcome]), Text(_short(check))
        )
    console.print(table)
    summary = report.summary
    console.print(
        ", ".join(
            f"{summary[outcome]} {outcome.replace('_', ' ')}"
            for outcome in ("passed", "failed", "error", "not_applicable")
        ),
        markup=False,
    )
    if report.passed:
        return
    for check in report.checks:
        if check.outcome in ("failed", "error") and check.detail:
            errors.print(f"{check.id}: {check.detail}", markup=False)


def _short(check: Check) -> str:
    """What the check saw, in one line: the reason when it did not pass."""
    if check.outcome != "passed" and check.detail:
        text = check.detail.splitlines()[0]
    else:
        text = "; ".join(f"{key}={_flat(value)}" for key, value in check.observed.items())
    return text if len(text) <= OBSERVED_WIDTH else text[: OBSERVED_WIDTH - 1] + "…"


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
