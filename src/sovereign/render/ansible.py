"""Renderer `ansible`: the inventory and the role variables of a Debian node.

Gives `ansible/inventory.yml` (one host per profile node, in the group `sovereign`) and
`ansible/group_vars/all.yml`, the variables of every role in `roles/`, named with each
role's prefix. The image builder passes the same file to the build-time roles it applies
into the rootfs, and `sovereign image boot` to the roles that need the running node.

Names in the egress allowlist are written as the addresses `network.hosts` gives them
(a profile rule makes sure each one is there): nftables matches addresses, not names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from sovereign.profile.model import Profile
from sovereign.profile.types import is_cidr, split_host_port
from sovereign.render import Renderer
from sovereign.render.resolved import dump_yaml

HEADER = "# Written by `sovereign render` from profile {name!r}; edit the profile, not this file.\n"


def _address(host: str, hosts: Mapping[str, str]) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return hosts[host]


def role_variables(profile: Profile) -> dict[str, Any]:
    network = profile.network
    tpm = any(node.tpm != "none" for node in profile.nodes)
    allow: list[dict[str, Any]] = []
    for rule in network.egress.allow:
        if is_cidr(rule.to):
            address, port = rule.to, None
        else:
            host, port = split_host_port(rule.to)
            address = _address(host, network.hosts)
        allow.append(
            {
                "address": address,
                "port": port,
                "protocol": rule.protocol,
                "description": rule.description,
            }
        )
    mesh = network.mesh
    peers = []
    for peer in mesh.peers if mesh.enabled else []:
        if peer.endpoint is not None:
            host, port = split_host_port(peer.endpoint)
            peers.append({"address": _address(host, network.hosts), "port": port})
    return {
        "sovereign_profile": profile.name,
        "sovereign_kind": profile.kind,
        "base_hardening_admin_user": profile.host.admin_user,
        "base_hardening_admin_keys": list(profile.host.admin_keys),
        "base_hardening_hosts": dict(network.hosts),
        "egress_lockdown_allow": allow,
        "egress_lockdown_admin_networks": list(network.admin_networks),
        "egress_lockdown_mesh_port": mesh.listen_port if mesh.enabled else None,
        "egress_lockdown_mesh_peers": peers,
        # The Debian image takes its address by DHCP (images/debian/overlay).
        "egress_lockdown_dhcp": True,
        "sandbox_runtime_default": profile.sandbox.runtime,
        "gateway_node_listen": profile.gateway.listen,
        # The gateway reaches loopback (OPA, local engines) and what the node may reach.
        "gateway_node_ip_allow": ["localhost", *(rule["address"] for rule in allow)],
        "disk_encryption_enabled": tpm,
        "disk_encryption_tpm_pcrs": list(profile.host.disk_pcrs),
        "tpm_attestation_enabled": tpm,
        "tpm_attestation_pcrs": list(profile.host.attestation_pcrs),
    }


def render(profile: Profile) -> Mapping[str, bytes]:
    if profile.host.os != "debian":
        return {}
    header = HEADER.format(name=profile.name)
    inventory: dict[str, Any] = {
        "sovereign": {"hosts": {node.name: {} for node in profile.nodes}},
    }
    return {
        "ansible/inventory.yml": (header + dump_yaml(inventory)).encode(),
        "ansible/group_vars/all.yml": (header + dump_yaml(role_variables(profile))).encode(),
    }


RENDERER = Renderer("ansible", "Ansible inventory and role variables (Debian nodes)", render)
