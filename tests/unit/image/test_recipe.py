"""The Debian recipe is data, and the build cache key moves with everything that shapes
the image and with nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sovereign.image.recipe import PLAYBOOKS, ROLES, RecipeError, load_recipe, recipe_hash


def test_the_debian_recipe_loads_and_gives_each_kind_its_packages() -> None:
    recipe = load_recipe("debian")

    air_gapped = recipe.spec.packages_for("air-gapped")
    datacenter = recipe.spec.packages_for("datacenter")
    assert recipe.spec.suite == "bookworm"
    assert {"linux-image-cloud-amd64", "systemd-boot-efi", "tpm2-tools", "runsc"} <= set(datacenter)
    assert "wireguard-tools" in air_gapped
    assert "wireguard-tools" not in datacenter
    assert air_gapped == sorted(air_gapped)
    assert [hook.name for hook in recipe.hooks("before-roles")] == ["10-system.sh"]


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    roles = tmp_path / "roles"
    playbooks = tmp_path / "playbooks"
    shutil.copytree(ROLES, roles)
    shutil.copytree(PLAYBOOKS, playbooks, symlinks=True)
    return roles, playbooks


def test_the_hash_is_stable_and_moves_with_roles_variables_and_options(
    copies: tuple[Path, Path],
) -> None:
    recipe = load_recipe("debian")
    roles, playbooks = copies

    def key(variables: bytes = b"a: 1\n", options: dict[str, object] | None = None) -> str:
        return recipe_hash(recipe, variables, options or {"hostname": "n"}, (roles, playbooks))

    first = key()
    assert key() == first
    assert key(b"a: 2\n") != first
    assert key(options={"hostname": "m"}) != first
    (roles / "egress_lockdown/defaults/main.yml").write_text("egress_lockdown_enabled: false\n")
    assert key() != first


def test_the_hash_sees_a_hook_losing_its_execute_bit(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(load_recipe("debian").root, images / "debian")
    recipe = load_recipe("debian", images)
    before = recipe_hash(recipe, b"", {})
    (images / "debian/hooks/before-roles/10-system.sh").chmod(0o644)
    assert recipe_hash(recipe, b"", {}) != before


def test_an_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(RecipeError, match="no image recipe 'talos'; known: debian"):
        load_recipe("talos")


def test_a_bad_recipe_names_its_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/recipe.yaml").write_text(
        "suite: bookworm\nsources: [deb x]\nkernel_cmdline: quiet\nesp_size: 1T\n"
    )
    with pytest.raises(RecipeError, match=r"broken/recipe.yaml: esp_size: String should match"):
        load_recipe("broken", tmp_path)
