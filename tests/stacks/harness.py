"""Helpers to run the stack under Pulumi's mock engine (no cluster, no CLI): what it would create.

`pulumi.runtime.set_mocks` stands in for the Pulumi engine and the Kubernetes API, which
no test here can reach; every other piece (the profile, the renderers, OPA,
kubernetes-validate) is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pulumi

from stacks import config as stack_config
from stacks.synth import (
    PROJECT_DIR,
    Synthesized,
    synthesize,
)
from stacks.synth import (
    stack_config as read_config,
)

STACK = "datacenter"
STACK_FILE = PROJECT_DIR / f"Pulumi.{STACK}.yaml"
SECRETS = {
    "keycloakAdminPassword": "test-admin-password",
    "keycloakDatabasePassword": "test-database-password",
    "memoryPassphrase": "test-memory-passphrase",
}


def datacenter_config(**overrides: str) -> dict[str, str]:
    """The committed stack file's config plus test secrets; `overrides` replace keys."""
    flat = read_config(STACK_FILE, SECRETS)
    flat.update(overrides)
    return flat


def settings_for(project_dir: Path = PROJECT_DIR) -> stack_config.StackSettings:
    """The settings from the config the mock engine was given (see `synth`)."""
    return stack_config.load(pulumi.Config(stack_config.NAMESPACE), STACK, project_dir)


def synth(
    build: Callable[[stack_config.StackSettings], object],
    flat: dict[str, str] | None = None,
    project_dir: Path = PROJECT_DIR,
) -> list[Synthesized]:
    """Load the settings from `flat` inside the mock engine, then run `build` with them."""
    config = datacenter_config() if flat is None else flat
    secret_keys = tuple(f"{stack_config.NAMESPACE}:{key}" for key in SECRETS)
    return synthesize(
        lambda: build(settings_for(project_dir)),
        config,
        stack=STACK,
        secret_keys=secret_keys,
    )
