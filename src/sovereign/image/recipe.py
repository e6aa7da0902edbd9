"""An image recipe (`images/<name>/`) and the hash its builds are cached by.

The recipe is data: `recipe.yaml` (suite, mirror, package lists per profile kind, disk
settings), an `overlay/` tree copied over the rootfs, and `hooks/before-roles/*.sh` and
`hooks/after-roles/*.sh`, run in name order around the build-time Ansible roles.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign.profile.types import ByteSize, Kind

REPOSITORY = Path(__file__).resolve().parents[3]
IMAGES = REPOSITORY / "images"
ROLES = REPOSITORY / "roles"
PLAYBOOKS = REPOSITORY / "playbooks"
# Bumped when the builder lays out disks differently, so old cache entries are not reused.
BUILDER_VERSION = "1"


class RecipeError(Exception):
    """A recipe that cannot be read; names the file."""


class RecipeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(pattern=r"^[a-z]+$")
    sources: list[str] = Field(min_length=1)
    variant: str = "minbase"
    kernel_cmdline: str
    esp_size: ByteSize
    # `common` goes into every image; each kind's list is added for that kind.
    packages: dict[Literal["common"] | Kind, list[str]] = Field(default_factory=dict)

    def packages_for(self, kind: Kind) -> list[str]:
        return sorted({*self.packages.get("common", []), *self.packages.get(kind, [])})


@dataclass(frozen=True)
class Recipe:
    name: str
    root: Path
    spec: RecipeSpec

    def hooks(self, stage: str) -> list[Path]:
        return sorted((self.root / "hooks" / stage).glob("*.sh"))

    @property
    def overlay(self) -> Path:
        return self.root / "overlay"


def load_recipe(name: str, images: Path = IMAGES) -> Recipe:
    root = images / name
    path = root / "recipe.yaml"
    try:
        data: Any = YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        known = sorted(p.name for p in images.iterdir() if (p / "recipe.yaml").is_file())
        raise RecipeError(f"no image recipe {name!r}; known: {', '.join(known)}") from None
    except YAMLError as error:
        raise RecipeError(f"{path}: {error}") from None
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise RecipeError(f"{path}: {where}: {first['msg']}") from None
    return Recipe(name, root, spec)


def _files(roots: Iterable[Path]) -> Iterable[tuple[str, Path]]:
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                yield f"{root.name}/{path.relative_to(root)}", path


def recipe_hash(
    recipe: Recipe,
    variables: bytes,
    options: dict[str, Any],
    ansible: tuple[Path, ...] = (ROLES, PLAYBOOKS),
) -> str:
    """SHA-256 over everything that shapes the image: the recipe, the roles and playbooks,
    the rendered role variables, the build options and the builder's layout version."""
    digest = hashlib.sha256()
    digest.update(f"builder {BUILDER_VERSION}\n".encode())
    digest.update(json.dumps(options, sort_keys=True).encode() + b"\n")
    digest.update(hashlib.sha256(variables).hexdigest().encode() + b"\n")
    for relative, path in _files((recipe.root, *ansible)):
        mode = "x" if path.stat().st_mode & 0o111 else "-"
        digest.update(
            f"{relative} {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode()
        )
    return digest.hexdigest()
