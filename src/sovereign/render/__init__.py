"""Renderers turn one validated profile into the files each part of the stack reads.

A renderer takes only the `Profile` (never another renderer's output) and gives a map
of relative path to bytes. `render_to` writes them all or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sovereign.profile.model import Profile

MANIFEST = ".sovereign-render.json"

RenderFunction = Callable[[Profile], Mapping[str, bytes]]


@dataclass(frozen=True)
class Renderer:
    name: str
    summary: str
    render: RenderFunction


class RenderError(Exception):
    """A render that cannot be written; nothing was changed on disk."""


def registry() -> dict[str, Renderer]:
    # Imported here so each renderer module can import this one without a cycle.
    from sovereign.render import ansible, gateway, keycloak, policy, pulumi, resolved, vllm

    renderers = (
        resolved.RENDERER,
        gateway.RENDERER,
        policy.RENDERER,
        keycloak.RENDERER,
        vllm.RENDERER,
        ansible.RENDERER,
        pulumi.RENDERER,
    )
    return {renderer.name: renderer for renderer in renderers}


def render_files(profile: Profile, names: Iterable[str] | None = None) -> dict[str, bytes]:
    available = registry()
    selected = list(available) if names is None else list(names)
    unknown = [name for name in selected if name not in available]
    if unknown:
        raise RenderError(
            f"unknown renderer {', '.join(unknown)}; available: {', '.join(available)}"
        )
    files: dict[str, bytes] = {}
    for name in selected:
        for relative, content in available[name].render(profile).items():
            path = PurePosixPath(relative)
            if path.is_absolute() or ".." in path.parts or relative in files:
                raise RenderError(f"renderer {name} produced a bad or duplicate path {relative!r}")
            files[relative] = content
    return files


def render_to(profile: Profile, out: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """Render into `out`, replacing a previous render there; returns path -> sha256."""
    files = render_files(profile, names)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())
    ):
        raise RenderError(
            f"refusing to write into {out}: it exists and is not an earlier `sovereign render` "
            "output; choose an empty or new directory"
        )
    digests = {path: hashlib.sha256(content).hexdigest() for path, content in sorted(files.items())}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.render-", dir=out.parent))
    try:
        for relative, content in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        manifest = {"profile": profile.name, "kind": profile.kind, "files": digests}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return digests


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    retired = out.with_name(f".{out.name}.retired-{os.getpid()}")
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    shutil.rmtree(retired)
