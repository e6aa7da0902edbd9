"""Fixtures: the whole datacenter stack under Pulumi's mock engine (see harness.py)."""

from __future__ import annotations

from typing import Any

import pytest

from stacks.synth import Synthesized, manifests
from tests.stacks.harness import synth


@pytest.fixture(scope="session")
def stack() -> list[Synthesized]:
    """Every resource the whole program registers for the committed datacenter stack."""
    from stacks.program import deploy

    return synth(deploy)


@pytest.fixture(scope="session")
def k8s_manifests(stack: list[Synthesized]) -> list[dict[str, Any]]:
    return manifests(stack)
