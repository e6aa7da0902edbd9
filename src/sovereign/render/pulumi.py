"""Renderer `pulumi`: the Pulumi stack config a datacenter profile deploys with.

Gives `Pulumi.<cluster.stack>.yaml`, whose `sovereign:profile` key holds the resolved
profile; the program in `stacks/` validates it again and renders the realm, gateway
config, policy bundle and vLLM launches from it. Secrets are not rendered: the file says
which `pulumi config set --secret` commands the stack still needs. A profile without a
`cluster` section gives no file.
"""

from __future__ import annotations

from collections.abc import Mapping

from sovereign.profile.model import Profile
from sovereign.render import Renderer
from sovereign.render.resolved import dump_yaml

SECRET_KEYS = ("keycloakAdminPassword", "keycloakDatabasePassword", "memoryPassphrase")


def stack_config(profile: Profile) -> str:
    secrets = "\n".join(f"#   pulumi config set --secret sovereign:{key}" for key in SECRET_KEYS)
    header = (
        f"# Stack config for {profile.name}, written by `sovereign render`; edit the profile\n"
        "# and render again rather than this file. Before `pulumi up`, set the secrets:\n"
        f"{secrets}\n"
    )
    return header + dump_yaml({"config": {"sovereign:profile": profile.model_dump(mode="json")}})


def render(profile: Profile) -> Mapping[str, bytes]:
    if profile.cluster is None:
        return {}
    return {f"Pulumi.{profile.cluster.stack}.yaml": stack_config(profile).encode()}


RENDERER = Renderer("pulumi", "the Pulumi stack config of a datacenter profile's cluster", render)
