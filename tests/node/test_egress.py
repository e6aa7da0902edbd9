"""Egress: the node reaches what its profile allows and nothing else.

The canaries are listeners outside the node that log each connection they get: the
allowed one is the positive control, the blocked one must never hear from the node.
Only a booted image has them (`sovereign verify --image`).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereign import firewall
from sovereign.nodefacts import Listener, Probe, listeners
from sovereign.profile.types import split_host_port
from sovereign.verify import Canary, RoleVariables, VerifyContext

CANARY_WAIT_S = 5.0


def _canary(context: VerifyContext, name: str) -> Canary:
    if context.canaries is None or name not in context.canaries:
        pytest.skip("no canaries: only a booted image (--image) has them")
    return context.canaries[name]


def _connections(log: Path) -> int:
    try:
        return len(log.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_for(log: Path, more_than: int) -> int:
    deadline = time.monotonic() + CANARY_WAIT_S
    while (seen := _connections(log)) <= more_than and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


def test_blocked_canary_receives_nothing(
    connect: Callable[[str], Probe], context: VerifyContext, observe: Callable[..., None]
) -> None:
    """The node tries and fails to connect to the blocked canary, which hears nothing"""
    canary = _canary(context, "blocked")
    before = _connections(canary.log)
    probe = connect(canary.address)  # errors unless nc really ran and said why it failed
    after = _wait_for(canary.log, before)
    observe(
        address=canary.address,
        connected=probe.connected,
        probe=probe.said,
        canary_saw=after - before,
    )
    assert not probe.connected, f"the node connected to the blocked canary {canary.address}"
    assert after == before, f"the blocked canary logged {after - before} connection(s)"


def test_allowed_canary_is_reached(
    connect: Callable[[str], Probe],
    context: VerifyContext,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """Positive control: the node connects to the allowed canary, and the canary logs it"""
    canary = _canary(context, "allowed")
    host, port = split_host_port(canary.address)
    assert any(
        entry.l4proto == "tcp"
        and entry.daddr is not None
        and ipaddress.ip_address(host) in entry.daddr
        and entry.dport in (None, port)
        for entry in firewall.profile_entries(variables)
    ), f"the allowed canary {canary.address} is not in the profile's egress allowlist"
    before = _connections(canary.log)
    probe = connect(canary.address)
    after = _wait_for(canary.log, before)
    observe(
        address=canary.address,
        connected=probe.connected,
        probe=probe.said,
        canary_saw=after - before,
    )
    assert probe.connected, f"the node could not connect to the allowed canary: {probe.said}"
    assert after > before, "the allowed canary logged no new connection"


def _ruleset(output: Callable[[str], str], sudo: str) -> dict[str, Any]:
    ruleset: dict[str, Any] = json.loads(output(f"{sudo}nft -j list ruleset"))
    return ruleset


def test_default_policies_drop(
    output: Callable[[str], str], sudo: str, observe: Callable[..., None]
) -> None:
    """nftables drops by default: the input, forward and output policies are drop"""
    policies = firewall.policies(_ruleset(output, sudo))
    observe(table=" ".join(firewall.TABLE), policies=policies)
    wrong = {hook: policy for hook, policy in policies.items() if policy != "drop"}
    assert not wrong, f"base chain policies that are not drop: {wrong}"


def test_only_allowlist_goes_out(
    output: Callable[[str], str],
    sudo: str,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """Every allowlist entry is open, nothing else goes out or is forwarded, and no table
    rewrites or reroutes a packet"""
    found = firewall.audit(_ruleset(output, sudo), variables)
    observe(
        allowlist=[str(entry) for entry in firewall.profile_entries(variables)],
        openings=[str(opening) for opening in found.openings],
        forwarded=[str(opening) for opening in found.forwarded],
        unsafe=list(found.unsafe),
    )
    assert found.ok, "; ".join(found.problems)


def _expected(listener: Listener, variables: RoleVariables) -> bool:
    ssh_port = int(variables.get("base_hardening_ssh_port") or 22)
    if listener.protocol == "tcp" and listener.port == ssh_port:
        return listener.processes == ("sshd",)
    gateway = variables.get("gateway_node_listen")
    if gateway and listener.protocol == "tcp":
        host, port = split_host_port(str(gateway))
        if listener.port == port and listener.address == host:
            return True
    if listener.protocol == "udp":
        if listener.port == variables.get("egress_lockdown_mesh_port"):
            return True
        if listener.port == 68 and variables.get("egress_lockdown_dhcp"):
            return True
    return False


def test_only_expected_sockets_listen(
    output: Callable[[str], str], sudo: str, variables: RoleVariables, observe: Callable[..., None]
) -> None:
    """Only sshd and what the profile runs (gateway, mesh, DHCP client) listen"""
    found = listeners(output(f"{sudo}ss -Hlntup"))
    unexpected = [str(listener) for listener in found if not _expected(listener, variables)]
    observe(listening=[str(listener) for listener in found])
    assert not unexpected, f"unexpected listeners: {', '.join(unexpected)}"
