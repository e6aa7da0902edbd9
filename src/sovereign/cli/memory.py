"""`sovereign memory check` and `sovereign keys rotate` (delegated to the gateway's admin
with the render's config), run while the gateway is stopped; exit 0 done, 1 findings or
unusable keys or stores, 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sovereign.cli import app
from sovereign.cli.delegate import admin, render_config

memory_app = typer.Typer(help="Check and repair the node's encrypted memory.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

RenderOption = Annotated[
    Path, typer.Option("--render", help="a `sovereign render` output directory")
]


@memory_app.command("check")
def check(
    render: RenderOption,
    repair: Annotated[
        bool, typer.Option("--repair", help="remove orphans and re-index lost vectors")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Compare the catalog's ciphertexts with the vector index; name every orphan."""
    flags = [*(["--repair"] if repair else []), *(["--json"] if as_json else [])]
    admin("memory", "check", "--config", render_config(render), *flags)


keys_app = typer.Typer(
    help="Manage keys: the memory's key-encryption keys and bundle signing keys.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("rotate")
def rotate(render: RenderOption) -> None:
    """Wrap every document's data key under a new KEK from the render's key source.

    The ciphertexts are not touched. The old KEK opens the keys (its passphrase from
    SOVEREIGN_MEMORY_PASSPHRASE); the new one is made from the profile's memory settings:
    a new key file, a passphrase (SOVEREIGN_MEMORY_NEW_PASSPHRASE, or asked twice), or a
    key sealed to the TPM's PCRs as they are now. So a profile that switches key_source,
    say file to tpm, migrates with one rotation.
    """
    admin("keys", "rotate", "--config", render_config(render))
