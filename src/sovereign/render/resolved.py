"""Renderer `profile`: the profile resolved with its kind's defaults, as YAML."""

from __future__ import annotations

import io
from collections.abc import Mapping

from ruamel.yaml import YAML

from sovereign.profile.model import Profile
from sovereign.render import Renderer


def dump_yaml(data: object) -> str:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    return buffer.getvalue()


def to_yaml(profile: Profile) -> str:
    return dump_yaml(profile.model_dump(mode="json"))


def render(profile: Profile) -> Mapping[str, bytes]:
    header = f"# {profile.name}: resolved {profile.kind} profile, written by `sovereign render`\n"
    return {"profile.yaml": (header + to_yaml(profile)).encode()}


RENDERER = Renderer("profile", "the profile resolved with its kind's defaults", render)
