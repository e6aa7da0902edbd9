"""Renderer `pulumi`: the Pulumi stack config a datacenter profile deploys with.

Gives `Pulumi.<cluster.stack>.yaml`, whose `sovereign:profile` key holds the resolved
profile; the program in `stacks/` validates it again and renders the realm, gateway
config, policy bundle and vLLM launches from it. Secrets are not rendered: the file says
which `pulumi config set --secret` commands the stack still needs. A profile without a
`cluster` section gives no file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from ruamel.yaml import YAML

from sovereign.profile.model import Profile
from sovereign.render import Renderer

PROFILE_KEY = "sovereign:profile"
SECRET_KEYS = ("keycloakAdminPassword", "keycloakDatabasePassword", "memoryPassphrase")


def stack_config(profile: Profile) -> str:
    secrets = "\n".join(f"#   pulumi config set --secret sovereign:{key}" for key in SECRET_KEYS)
    header = (
        f"# Stack config for {profile.name}, written by `sovereign render`. Change the profile\n"
        "# and run `sovereign stack config PROFILE`, which replaces sovereign:profile and\n"
        "# keeps the rest. Before `pulumi up`, set the secrets:\n"
        f"{secrets}\n"
    )
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    # Lists indented under their key and no folded lines: what yamllint and people expect.
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    buffer = io.StringIO()
    yaml.dump({"config": {PROFILE_KEY: profile.model_dump(mode="json")}}, buffer)
    return header + buffer.getvalue()


def render(profile: Profile) -> Mapping[str, bytes]:
    if profile.cluster is None:
        return {}
    return {f"Pulumi.{profile.cluster.stack}.yaml": stack_config(profile).encode()}


RENDERER = Renderer("pulumi", "the Pulumi stack config of a datacenter profile's cluster", render)
