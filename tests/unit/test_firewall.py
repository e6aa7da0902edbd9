"""The egress audit, on rulesets loaded into real nftables inside a private network namespace.

The rulesets are the egress_lockdown role's own template rendered for a profile, and
hand-written ones with the holes the audit must find.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sovereign import firewall

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "roles" / "egress_lockdown" / "templates" / "etc" / "nftables.conf.j2"


def _netns_works() -> bool:
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _netns_works(), reason="needs nft and `unshare -n` (root or user namespaces)"
)

VARIABLES: dict[str, Any] = {
    "egress_lockdown_allow": [
        {"address": "10.0.2.100", "port": 80, "protocol": "tcp", "description": "canary"},
        {"address": "10.8.0.0/16", "port": None, "protocol": "udp", "description": "lab"},
    ],
    "egress_lockdown_admin_networks": ["10.0.2.0/24"],
    "egress_lockdown_ssh_port": 22,
    "egress_lockdown_mesh_port": 51820,
    "egress_lockdown_mesh_peers": [{"address": "10.9.0.1", "port": 51820}],
    "egress_lockdown_dns_servers": ["9.9.9.9"],
    "egress_lockdown_ntp_servers": ["192.0.2.5"],
    "egress_lockdown_dhcp": True,
}


def _load(ruleset: str) -> dict[str, Any]:
    """`nft -j list ruleset` after loading `ruleset` into a fresh network namespace."""
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", "nft -f /dev/stdin && nft -j list ruleset"],
        input=ruleset,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = json.loads(done.stdout)
    return loaded


def _named(items: object) -> list[str]:
    """Each item as text, without nft's rule handles, which vary from run to run."""
    return [re.sub(r"#\d+", "", str(item)) for item in items]  # type: ignore[attr-defined]


def _output_chain(*rules: str, policy: str = "drop", extra: str = "", forward: str = "") -> str:
    body = "\n".join(rules)
    return f"""
table inet sovereign {{
  chain input {{ type filter hook input priority 0; policy drop; }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    {forward}
  }}
  chain output {{
    type filter hook output priority 0; policy {policy};
    oif "lo" accept
    ct state established,related accept
    {body}
    counter limit rate 10/second log prefix "sovereign-egress-deny "
  }}
  {extra}
}}
"""


ALLOWED = (
    'ip daddr 10.0.2.100 tcp dport 80 accept comment "canary"',
    "ip daddr 10.8.0.0/16 meta l4proto udp accept",
    "ip daddr 9.9.9.9 meta l4proto { tcp, udp } th dport 53 accept",
)


def _render_role_template(tmp_path: Path) -> str:
    """The role's nftables.conf for VARIABLES, rendered by Ansible itself (its filters)."""
    ansible = Path(sys.executable).with_name("ansible")
    if not ansible.exists():
        pytest.skip("ansible is not installed")
    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps(VARIABLES))
    out = tmp_path / "nftables.conf"
    done = subprocess.run(
        [
            str(ansible), "localhost", "-i", "localhost,", "-c", "local",
            "-m", "ansible.builtin.template", "-a", f"src={TEMPLATE} dest={out}",
            "-e", "@" + str(TEMPLATE.parents[2] / "defaults" / "main.yml"),
            "-e", f"@{variables}",
            "-e", f"ansible_python_interpreter={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible")},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text()


@pytest.mark.skipif(not TEMPLATE.is_file(), reason="the egress_lockdown role is not here")
def test_the_roles_ruleset_opens_exactly_the_profiles_allowlist(tmp_path: Path) -> None:
    text = _render_role_template(tmp_path)
    found = firewall.audit(_load(text), VARIABLES)
    assert found.problems == ()
    assert found.policies == {"input": "drop", "forward": "drop", "output": "drop"}
    opened = [str(opening) for opening in found.openings if not opening.benign]
    assert any("daddr 10.0.2.100/32 dport 80" in line for line in opened)


def test_a_hand_written_ruleset_with_only_the_allowlist_passes() -> None:
    found = firewall.audit(_load(_output_chain(*ALLOWED)), VARIABLES)
    assert found.ok, found.problems


def test_a_rule_to_anywhere_else_is_named() -> None:
    ruleset = _output_chain(*ALLOWED, 'ip daddr 10.0.2.101 tcp dport 80 accept comment "oops"')
    found = firewall.audit(_load(ruleset), VARIABLES)
    assert _named(found.problems) == [
        "accepts traffic the profile does not allow: "
        "output (oops) l4proto tcp daddr 10.0.2.101/32 dport 80"
    ]


@pytest.mark.parametrize(
    "hole",
    [
        "tcp dport 443 accept",  # any address
        "ip daddr 10.0.2.100 accept",  # any protocol and port to an allowed host
        "ip daddr 10.0.0.0/8 tcp dport 80 accept",  # wider than the entry
        "ip daddr 10.0.2.100 tcp dport 1-1024 accept",  # more ports than the entry
        "ct state new,established accept",  # new connections anywhere
        "meta l4proto icmp accept",
        "tcp dport vmap { 443 : accept }",  # a verdict this audit cannot read counts as open
        "ip daddr . tcp dport { 10.0.2.100 . 80, 203.0.113.9 . 443 } accept",
    ],
)
def test_anything_wider_than_the_allowlist_is_a_problem(hole: str) -> None:
    found = firewall.audit(_load(_output_chain(*ALLOWED, hole)), VARIABLES)
    assert found.unexpected, hole
    assert not found.ok


def test_an_accept_behind_a_jump_is_found() -> None:
    ruleset = _output_chain(
        *ALLOWED,
        "ip daddr 198.51.100.0/24 jump extra",
        extra="chain extra { tcp dport 22 accept; }",
    )
    found = firewall.audit(_load(ruleset), VARIABLES)
    assert _named(found.unexpected) == ["extra l4proto tcp daddr 198.51.100.0/24 dport 22"]


def test_a_named_concatenated_set_can_open_an_entry() -> None:
    ruleset = _output_chain(
        "ip daddr . tcp dport @allowed accept",
        "ip daddr 10.8.0.0/16 meta l4proto udp accept",
        "ip daddr 9.9.9.9 meta l4proto { tcp, udp } th dport 53 accept",
        extra="set allowed { type ipv4_addr . inet_service; elements = { 10.0.2.100 . 80 } }",
    )
    found = firewall.audit(_load(ruleset), VARIABLES)
    assert found.ok, found.problems


def test_a_missing_allowlist_entry_is_named() -> None:
    found = firewall.audit(_load(_output_chain(*ALLOWED[1:])), VARIABLES)
    assert [str(entry) for entry in found.missing] == [
        "tcp to 10.0.2.100/32 port 80 (allow: canary)"
    ]
    assert "allowlist entry not opened: tcp to 10.0.2.100/32 port 80 (allow: canary)" in (
        found.problems
    )


def test_an_accepting_output_policy_fails_and_policies_are_reported() -> None:
    ruleset = _load(_output_chain(*ALLOWED, policy="accept"))
    assert firewall.policies(ruleset) == {"input": "drop", "forward": "drop", "output": "accept"}
    assert "output chain policy is accept, not drop" in firewall.audit(ruleset, VARIABLES).problems


def test_without_the_table_nothing_is_proved() -> None:
    ruleset = _load("table inet other { chain output { type filter hook output priority 0; }; }")
    found = firewall.audit(ruleset, VARIABLES)
    assert found.problems == ("no table inet sovereign: the egress rules are not loaded",)
    assert firewall.policies(ruleset) == {"input": None, "forward": None, "output": None}


# Fail closed: whatever could rewrite, reroute or hand off a packet, in any table.

REROUTES = ": it can rewrite or reroute packets"
OTHER_TABLES = {
    "dnat": (
        "table ip nat {\n chain out {\n type nat hook output priority -100\n"
        "  ip daddr 10.0.2.100 tcp dport 80 dnat to 10.0.2.101:80\n }\n}",
        [
            "table ip nat chain out is a nat chain on hook output" + REROUTES,
            'table ip nat chain out rule : statement dnat {"addr":"10.0.2.101","port":80}',
        ],
    ),
    "snat and masquerade": (
        "table ip nat {\n chain post {\n type nat hook postrouting priority 100\n"
        '  oif "lo" masquerade\n  ip daddr 192.0.2.7 snat to 10.0.0.1\n }\n}',
        [
            "table ip nat chain post is a nat chain on hook postrouting" + REROUTES,
            "table ip nat chain post rule : statement masquerade",
            'table ip nat chain post rule : statement snat {"addr":"10.0.0.1"}',
        ],
    ),
    "redirect": (
        "table ip6 nat {\n chain out {\n type nat hook output priority -100\n"
        "  tcp dport 80 redirect to :8080\n }\n}",
        [
            "table ip6 nat chain out is a nat chain on hook output" + REROUTES,
            'table ip6 nat chain out rule : statement redirect {"port":8080}',
        ],
    ),
    "route chain": (
        "table ip marks {\n chain out {\n type route hook output priority 0\n"
        "  meta mark set 1\n }\n}",
        [
            "table ip marks chain out is a route chain on hook output" + REROUTES,
            "table ip marks chain out rule : statement mangle meta mark set 1",
        ],
    ),
    "mangle in a filter chain": (
        "table inet other {\n chain out {\n type filter hook output priority -10\n"
        "  ip daddr 10.0.2.100 ip daddr set 10.0.2.101\n  tcp dport set 8080\n }\n}",
        [
            "table inet other chain out rule : statement mangle payload ip daddr set 10.0.2.101",
            "table inet other chain out rule : statement mangle payload tcp dport set 8080",
        ],
    ),
    "dup": (
        "table ip copy {\n chain out {\n type filter hook output priority 0\n"
        '  dup to 10.0.2.101 device "lo"\n }\n}',
        ['table ip copy chain out rule : statement dup {"addr":"10.0.2.101","dev":"lo"}'],
    ),
    "fwd": (
        "table netdev edge {\n chain in {\n"
        '  type filter hook ingress device "lo" priority 0\n  fwd to "lo"\n }\n}',
        ['table netdev edge chain in rule : statement fwd {"dev":"lo"}'],
    ),
}


@pytest.mark.parametrize("case", OTHER_TABLES)
def test_a_rewrite_or_reroute_in_any_table_fails_naming_it(case: str) -> None:
    table, expected = OTHER_TABLES[case]
    found = firewall.audit(_load(_output_chain(*ALLOWED) + table), VARIABLES)
    assert not found.ok
    assert _named(found.unsafe) == expected
    assert _named(found.problems) == [f"unsafe: {text}" for text in expected]


def test_a_mangle_in_the_sovereign_table_fails_and_opens_no_entry() -> None:
    rewritten = "ip daddr 10.0.2.100 tcp dport 80 ip daddr set 10.0.2.101 accept"
    found = firewall.audit(_load(_output_chain(rewritten, *ALLOWED[1:])), VARIABLES)
    assert _named(found.unsafe) == [
        "table inet sovereign chain output rule : statement mangle payload ip daddr set 10.0.2.101"
    ]
    assert [str(entry) for entry in found.missing] == [
        "tcp to 10.0.2.100/32 port 80 (allow: canary)"
    ]


def test_a_queue_statement_fails() -> None:
    # This kernel may lack nft_queue, so the rule is added to a loaded ruleset's JSON.
    ruleset = _load(_output_chain(*ALLOWED))
    ruleset["nftables"].append(
        {
            "rule": {
                "family": "inet",
                "table": "sovereign",
                "chain": "output",
                "handle": 99,
                "expr": [{"queue": {"num": 3}}],
            }
        }
    )
    found = firewall.audit(ruleset, VARIABLES)
    assert found.unsafe == (
        'table inet sovereign chain output rule #99: statement queue {"num":3}',
    )
    assert not found.ok


def test_counters_logs_and_limits_in_other_tables_are_harmless() -> None:
    table = (
        "table inet watch {\n chain out {\n type filter hook output priority 10\n"
        '  counter limit rate 5/second log prefix "watch " comment "only looks"\n'
        "  accept\n }\n}"
    )
    found = firewall.audit(_load(_output_chain(*ALLOWED) + table), VARIABLES)
    assert found.ok, found.problems


def test_a_rule_in_the_forward_chain_fails_even_with_a_drop_policy() -> None:
    ruleset = _output_chain(*ALLOWED, forward='ip daddr 10.0.2.101 accept comment "route"')
    found = firewall.audit(_load(ruleset), VARIABLES)
    assert found.policies["forward"] == "drop"
    assert _named(found.problems) == [
        "the forward chain accepts (a node forwards nothing): forward (route) daddr 10.0.2.101/32"
    ]


@pytest.mark.parametrize(
    "rule",
    [
        "udp sport 51820 accept",  # the mesh port, to anywhere
        "ip daddr 10.9.0.2 udp sport 51820 accept",  # not a peer
        "ip daddr 10.9.0.2 udp dport 51820 accept",  # not a peer
        "ip daddr 10.9.0.1 udp dport 51821 accept",  # a peer, another port
    ],
)
def test_mesh_traffic_goes_only_to_peers(rule: str) -> None:
    found = firewall.audit(_load(_output_chain(*ALLOWED, rule)), VARIABLES)
    assert found.unexpected, rule


def test_mesh_traffic_to_a_peer_passes() -> None:
    rules = ("ip daddr 10.9.0.1 udp dport 51820 accept", "ip daddr 10.9.0.1 udp sport 51820 accept")
    found = firewall.audit(_load(_output_chain(*ALLOWED, *rules)), VARIABLES)
    assert found.ok, found.problems
