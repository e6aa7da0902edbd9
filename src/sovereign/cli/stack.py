"""`sovereign stack config`: write a datacenter profile into its Pulumi stack's config.

A new stack file is the `pulumi` renderer's output. An existing one keeps everything but
`sovereign:profile`: the secrets `pulumi config set --secret` wrote, the encryption salt
and any provider settings, which re-rendering would otherwise destroy.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign.cli import app
from sovereign.cli.output import console, fail
from sovereign.cli.profile import load_or_exit
from sovereign.render.pulumi import PROFILE_KEY, stack_config

stack_app = typer.Typer(help="The Pulumi stack of a datacenter profile.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("config")
def config(
    file: Annotated[Path, typer.Argument(help="a datacenter profile with a cluster section")],
    project_dir: Annotated[
        Path, typer.Option("--project-dir", help="the directory holding Pulumi.yaml")
    ] = Path(),
) -> None:
    """Create or update Pulumi.<cluster.stack>.yaml, keeping its secrets."""
    profile = load_or_exit(file)
    if profile.cluster is None:
        raise fail(f"{file}: profile {profile.name!r} has no cluster section; nothing to deploy")
    if not (project_dir / "Pulumi.yaml").is_file():
        raise fail(f"{project_dir}: no Pulumi.yaml here; pass --project-dir")
    target = project_dir / f"Pulumi.{profile.cluster.stack}.yaml"
    fresh = stack_config(profile)
    if target.exists():
        text = _merged(target, fresh)
        verb = "updated"
    else:
        text = fresh
        verb = "wrote"
    _write_atomically(target, text)
    console.print(f"{verb} {target} (sovereign:profile from {file})")


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    # As the renderer writes it: `key: null`, not `key:`.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def _merged(target: Path, fresh: str) -> str:
    yaml = _yaml()
    try:
        existing: Any = yaml.load(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError) as error:
        raise fail(f"{target}: cannot read it as a Pulumi stack file: {error}") from None
    if existing is None:
        return fresh
    if not isinstance(existing, dict) or not isinstance(existing.get("config", {}), dict):
        raise fail(f"{target}: not a Pulumi stack file (expected a mapping with `config:`)")
    if existing.get("config") is None:
        existing["config"] = {}
    existing["config"][PROFILE_KEY] = yaml.load(fresh)["config"][PROFILE_KEY]
    buffer = io.StringIO()
    yaml.dump(existing, buffer)
    return buffer.getvalue()


def _write_atomically(target: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if target.exists():
            os.chmod(temporary, target.stat().st_mode & 0o777)
        else:
            os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
