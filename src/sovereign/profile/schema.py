"""The JSON Schema of a profile file, for editors and for checking files outside Python.

The model describes a resolved profile; a file may leave out whatever every kind's
defaults fill in, so those fields are not required in the schema of the file.
"""

from __future__ import annotations

from typing import Any

from sovereign.profile.defaults import KINDS, for_kind
from sovereign.profile.model import Profile

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def input_schema() -> dict[str, Any]:
    schema = Profile.model_json_schema(mode="validation")
    _relax(schema, schema, [for_kind(kind) for kind in KINDS])
    return {"$schema": DIALECT, **schema}


def _relax(node: dict[str, Any], root: dict[str, Any], defaults: list[Any]) -> None:
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        _relax(root["$defs"][name], root, defaults)
        return
    for alternative in node.get("anyOf", []):
        _relax(alternative, root, defaults)
    # Array items are never defaulted one by one: a list in the file replaces the default.
    properties: dict[str, Any] = node.get("properties", {})
    for key, child in properties.items():
        present = [d[key] for d in defaults if isinstance(d, dict) and key in d]
        if len(present) == len(defaults) and key in node.get("required", []):
            node["required"].remove(key)
        if present:
            _relax(child, root, present)
    if node.get("required") == []:
        del node["required"]
