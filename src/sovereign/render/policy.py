"""Renderer `policy`: the gateway's Rego policies and the data they decide with.

Takes the profile; gives `policy/*.rego` (copied from the profile's policy bundle, tests
left out) and `policy/data.json`, the one input both the embedded and the remote engine load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from sovereign_gateway.contract import CLASSIFICATIONS

from sovereign.profile.model import Profile
from sovereign.render import Renderer

REPOSITORY = Path(__file__).resolve().parents[3]
# The packages the gateway asks; other policy packages ship with their own consumers.
GATEWAY_PACKAGE_DIR = "gateway"

# Administrators and the internal embedding clients handle everything stored on the node;
# every other role sees at most internal material unless identity.clearances says more.
FULL_CLEARANCE_PERMISSIONS = frozenset({"admin", "embed"})


def clearance(permissions: Iterable[str]) -> str:
    """The highest classification a role holding `permissions` may see."""
    return "secret" if FULL_CLEARANCE_PERMISSIONS & set(permissions) else "internal"


def bundle_dir(profile: Profile) -> Path:
    bundle = Path(profile.policy.bundle)
    return bundle if bundle.is_absolute() else REPOSITORY / bundle


def policy_data(profile: Profile) -> dict[str, object]:
    identity = profile.identity
    return {
        "sovereign": {
            "config": {
                "profile": profile.name,
                "kind": profile.kind,
                "roles": {role: sorted(perms) for role, perms in identity.roles.items()},
                "models": {
                    model.name: {"allowed_roles": sorted(model.allowed_roles)}
                    for model in profile.models
                },
                "service_clients": sorted(client.name for client in identity.service_clients),
                "dlp": {"mode": profile.policy.dlp},
                # Lowest first: a caller cleared for a level sees it and everything below.
                "classifications": list(CLASSIFICATIONS),
                "clearances": {
                    role: identity.clearances.get(role, clearance(perms))
                    for role, perms in sorted(identity.roles.items())
                },
                "restricted_tags": {
                    tag: sorted(roles)
                    for tag, roles in sorted(profile.memory.restricted_tags.items())
                },
            }
        }
    }


def render(profile: Profile) -> Mapping[str, bytes]:
    source = bundle_dir(profile) / GATEWAY_PACKAGE_DIR
    files: dict[str, bytes] = {
        "policy/data.json": json.dumps(policy_data(profile), indent=2, sort_keys=True).encode()
        + b"\n"
    }
    if source.is_dir():
        for rego in sorted(source.glob("*.rego")):
            if not rego.name.endswith("_test.rego"):
                files[f"policy/{GATEWAY_PACKAGE_DIR}/{rego.name}"] = rego.read_bytes()
    return files


RENDERER = Renderer("policy", "the gateway's Rego policies and their data.json", render)
