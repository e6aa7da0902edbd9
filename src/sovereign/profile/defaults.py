"""Defaults per deployment kind, kept as data in `kinds/<kind>.yaml`.

`for_kind` gives a fresh copy of a kind's defaults; `merge` lays a user's profile over them.
Mappings merge key by key; a list or scalar the user gives replaces the default whole.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

from ruamel.yaml import YAML

KINDS = ("personal", "edge", "air-gapped", "datacenter")


@cache
def _load(kind: str) -> dict[str, Any]:
    text = resources.files("sovereign.profile").joinpath("kinds", f"{kind}.yaml").read_text()
    data: dict[str, Any] = YAML(typ="safe", pure=True).load(text)
    return data


def for_kind(kind: str) -> dict[str, Any]:
    if kind not in KINDS:
        raise KeyError(kind)
    return copy.deepcopy(_load(kind))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# The profile `sovereign up` runs when given none: a personal node with a local model,
# local memory and local identity, all from the personal kind's defaults.
EMBEDDED_DEFAULT_NAME = "<embedded personal profile>"
EMBEDDED_DEFAULT = "kind: personal\nname: personal\n"
