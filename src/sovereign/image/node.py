"""A built image on disk, booted and given its first-boot roles: what `image boot` and
`verify --image` share."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereign.image.boot import BootedNode, BootError, boot
from sovereign.image.build import DISK, MANIFEST
from sovereign.image.provision import PlaybookRun, SshTarget, run_playbook
from sovereign.verify import Canary, VerifyContext


@dataclass(frozen=True)
class BuiltImage:
    directory: Path
    manifest: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.directory / DISK

    @property
    def variables(self) -> Path:
        return self.directory / str(self.manifest["variables"])


def read_image(path: Path) -> BuiltImage:
    """An image build directory (or its disk.raw) and its manifest; BootError if it is not one."""
    directory = path.parent if path.is_file() else path
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise BootError(
            f"{path} is not a `sovereign image build` output: {directory / MANIFEST}: {error}"
        ) from None
    image = BuiltImage(directory, manifest)
    if not image.disk.is_file():
        raise BootError(f"{image.disk} is missing")
    return image


@contextmanager
def booted(
    image: BuiltImage, state: Path, identity: Path, accel: str = "auto", provision: bool = True
) -> Iterator[tuple[BootedNode, PlaybookRun | None]]:
    """Boot the image and, unless told not to, run its first-boot roles."""
    user = _admin_user(image)
    with boot(image.disk, state, identity, user, accel) as node:
        run = None
        if provision and image.manifest["roles"]["at_first_boot"]:
            started = time.monotonic()
            run = first_boot(node, image)
            node.provision_seconds = time.monotonic() - started
        yield node, run


def first_boot(node: BootedNode, image: BuiltImage, label: str = "first-boot") -> PlaybookRun:
    target = SshTarget(
        image.manifest["node"], node.ssh_port, node.user, node.identity, node.known_hosts
    )
    return run_playbook(
        target, "node.yml", image.variables, exports(node), node.state / "ansible", label
    )


def exports(node: BootedNode) -> Path:
    return node.state / "exports"


def _admin_user(image: BuiltImage) -> str:
    for line in image.variables.read_text().splitlines():
        if line.startswith("base_hardening_admin_user:"):
            return line.split(":", 1)[1].strip()
    raise BootError(f"{image.variables} names no base_hardening_admin_user")


def verify_context(
    node: BootedNode, image: BuiltImage, profile: Path, suites: tuple[str, ...] | None = None
) -> VerifyContext:
    """What `sovereign verify` needs to check this booted node: its ssh address, the role
    variables it was built with, the operator's exports, the image and the canaries."""
    canaries = {
        name: Canary(entry["address"], Path(entry["log"]))
        for name, entry in node.canary_context().items()
    }
    context = VerifyContext(
        profile=profile,
        vars=image.variables.resolve(),
        host=node.host,
        identity=node.identity.resolve(),
        ssh_config=node.write_ssh_config(),
        exports=exports(node) / str(image.manifest["node"]),
        image={
            "digest": f"sha256:{image.manifest['image']['sha256']}",
            "recipe_hash": image.manifest["recipe_hash"],
        },
        canaries=canaries,
    )
    return context if suites is None else dataclasses.replace(context, suites=suites)
