"""What a node's nftables ruleset lets out, compared with what its profile allows.

Takes `nft -j list ruleset` output and the rendered role variables; gives an `Audit`: the
base chain policies, every way out an accept rule opens, the openings no allowance
explains, the allowlist entries no rule opens, anything the forward chain accepts, and
every chain or statement, in any table, that could rewrite, reroute or hand off a packet.

It fails closed: a packet must pass every base chain on its hook, so other tables cannot
widen what the sovereign table accepts, but a NAT or route chain, or a statement that
mangles, duplicates, forwards or queues a packet, can send it somewhere the filter never
judged. Only counters, logs and limits are read as harmless.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Ports = tuple[int, int]  # an inclusive range; one port p is (p, p)

TABLE = ("inet", "sovereign")
REPLY_STATES = frozenset({"established", "related"})
# IPv6 neighbour discovery and MLD: link-local housekeeping that carries no data anywhere.
NEIGHBOUR_DISCOVERY = frozenset(
    {"nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert", "mld2-listener-report"}
)
# Statements known to change nothing about where a packet goes or what it carries.
HARMLESS = frozenset({"counter", "log", "limit"})
# What decides or narrows a rule; the rule reader follows these.
_VERDICTS = frozenset({"accept", "drop", "reject", "return", "jump", "goto", "continue", "vmap"})
_MAX_DEPTH = 16
_SHOWN_CHARS = 160


@dataclass(frozen=True)
class Opening:
    """One combination of matches under which a rule accepts a packet the node sends."""

    rule: str
    l4proto: str | None = None
    daddr: Network | None = None
    dport: Ports | None = None
    sport: Ports | None = None
    oif: str | None = None
    ct_state: frozenset[str] | None = None
    icmpv6_type: str | None = None
    # Matches this audit cannot read. A match only narrows a rule, so for "what gets out"
    # ignoring it errs on the safe side; such a rule never counts as opening an entry.
    unread: tuple[str, ...] = ()

    @property
    def benign(self) -> str | None:
        if self.oif == "lo":
            return "loopback"
        if self.ct_state is not None and self.ct_state <= REPLY_STATES:
            return "replies"
        if self.icmpv6_type in NEIGHBOUR_DISCOVERY:
            return "neighbour discovery"
        return None

    def __str__(self) -> str:
        parts = [self.rule]
        for name in ("l4proto", "daddr", "dport", "sport", "oif", "icmpv6_type"):
            value = getattr(self, name)
            if value is not None:
                shown = _ports(value) if name in ("dport", "sport") else str(value)
                parts.append(f"{name} {shown}")
        if self.ct_state is not None:
            parts.append(f"ct state {','.join(sorted(self.ct_state))}")
        if self.unread:
            parts.append(f"(+ {', '.join(self.unread)})")
        return " ".join(parts)


@dataclass(frozen=True)
class Allowance:
    """Traffic the profile lets out: one allowlist entry, a DNS or NTP server, DHCP, the mesh."""

    reason: str
    l4proto: str
    daddr: Network | None = None
    dport: int | None = None
    sport: int | None = None

    def covers(self, opening: Opening) -> bool:
        """Everything `opening` lets out is inside this allowance."""
        return (
            opening.l4proto == self.l4proto
            and _net_within(opening.daddr, self.daddr)
            and _port_within(opening.dport, self.dport)
            and _port_within(opening.sport, self.sport)
        )

    def opened_by(self, opening: Opening) -> bool:
        """`opening` lets all of this allowance out (an allowlist entry is present)."""
        if opening.unread or opening.benign or opening.oif is not None:
            return False
        if opening.l4proto != self.l4proto or opening.sport is not None:
            return False
        if opening.daddr is not None and (
            self.daddr is None
            or self.daddr.version != opening.daddr.version
            or not self.daddr.subnet_of(opening.daddr)  # type: ignore[arg-type]
        ):
            return False
        if self.dport is None:
            return opening.dport is None
        return opening.dport is None or opening.dport[0] <= self.dport <= opening.dport[1]

    def __str__(self) -> str:
        where = "any address" if self.daddr is None else str(self.daddr)
        port = "" if self.dport is None else f" port {self.dport}"
        return f"{self.l4proto} to {where}{port} ({self.reason})"


@dataclass(frozen=True)
class Audit:
    policies: dict[str, str | None]  # hook -> policy of the table's base chain on it
    openings: tuple[Opening, ...]
    unexpected: tuple[Opening, ...]
    missing: tuple[Allowance, ...]
    problems: tuple[str, ...]
    forwarded: tuple[Opening, ...] = ()  # what the forward chain accepts: nothing, on a node
    unsafe: tuple[str, ...] = ()  # non-filter chains and statements outside HARMLESS

    @property
    def ok(self) -> bool:
        return not self.problems


def _net_within(inner: Network | None, outer: Network | None) -> bool:
    if outer is None:
        return True
    if inner is None or inner.version != outer.version:
        return False
    return inner.subnet_of(outer)  # type: ignore[arg-type]


def _port_within(inner: Ports | None, outer: int | None) -> bool:
    if outer is None:
        return True
    return inner == (outer, outer)


def _ports(value: Ports) -> str:
    return str(value[0]) if value[0] == value[1] else f"{value[0]}-{value[1]}"


def _network(address: str) -> Network:
    return ipaddress.ip_network(address, strict=False)


def profile_entries(variables: Mapping[str, Any]) -> list[Allowance]:
    """The profile's egress allowlist (`egress_lockdown_allow`)."""
    return [
        Allowance(
            reason=f"allow: {entry.get('description') or entry['address']}",
            l4proto=entry.get("protocol", "tcp"),
            daddr=_network(str(entry["address"])),
            dport=entry.get("port"),
        )
        for entry in variables.get("egress_lockdown_allow") or []
    ]


def allowances(variables: Mapping[str, Any]) -> list[Allowance]:
    """Everything the egress_lockdown role may let out for these variables."""
    allowed = profile_entries(variables)
    for server in variables.get("egress_lockdown_dns_servers") or []:
        allowed += [Allowance("dns", proto, _network(server), 53) for proto in ("udp", "tcp")]
    for server in variables.get("egress_lockdown_ntp_servers") or []:
        allowed.append(Allowance("ntp", "udp", _network(server), 123))
    if variables.get("egress_lockdown_dhcp"):
        allowed.append(Allowance("dhcp", "udp", None, dport=67, sport=68))
    # The mesh talks to its peers only: to a peer's port, or from the mesh port to a peer.
    mesh_port = variables.get("egress_lockdown_mesh_port")
    for peer in variables.get("egress_lockdown_mesh_peers") or []:
        address = _network(str(peer["address"]))
        allowed.append(Allowance("mesh peer", "udp", address, int(peer["port"])))
        if mesh_port:
            allowed.append(Allowance("mesh peer", "udp", address, sport=int(mesh_port)))
    # Replies of the ssh server to the admin networks, for sessions conntrack did not see start.
    ssh_port = int(variables.get("egress_lockdown_ssh_port") or 22)
    for network in variables.get("egress_lockdown_admin_networks") or []:
        allowed.append(Allowance("ssh replies", "tcp", _network(network), sport=ssh_port))
    return allowed


def _objects(ruleset: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [item for item in ruleset.get("nftables", []) if isinstance(item, dict)]


def _base_chains(ruleset: Mapping[str, Any], hook: str) -> list[dict[str, Any]]:
    return [
        chain
        for item in _objects(ruleset)
        if (chain := item.get("chain"))
        and (chain["family"], chain["table"]) == TABLE
        and chain.get("hook") == hook
    ]


def policies(ruleset: Mapping[str, Any]) -> dict[str, str | None]:
    """Hook -> policy of the sovereign table's base chain on it; None if it has none.

    Several base chains on one hook all see each packet, so the laxest policy is given.
    """
    found: dict[str, str | None] = {}
    for hook in ("input", "forward", "output"):
        chains = _base_chains(ruleset, hook)
        seen = {chain.get("policy", "accept") for chain in chains}
        found[hook] = None if not chains else "accept" if "accept" in seen else "drop"
    return found


def unsafe(ruleset: Mapping[str, Any]) -> list[str]:
    """Every chain that is not a filter chain and every statement outside HARMLESS, in
    every table: each names its table, chain and rule."""
    found = []
    for item in _objects(ruleset):
        if chain := item.get("chain"):
            kind = chain.get("type")
            if kind is not None and kind != "filter":
                found.append(
                    f"{_where(chain, chain['name'])} is a {kind} chain on hook "
                    f"{chain.get('hook')}: it can rewrite or reroute packets"
                )
        elif rule := item.get("rule"):
            for expression in rule.get("expr", []):
                kind, body = next(iter(expression.items()))
                if kind != "match" and kind not in _VERDICTS and kind not in HARMLESS:
                    found.append(
                        f"{_where(rule, rule['chain'])} rule #{rule.get('handle')}: "
                        f"statement {_statement(kind, body)}"
                    )
    return found


def _where(item: Mapping[str, Any], chain: str) -> str:
    return f"table {item['family']} {item['table']} chain {chain}"


def _statement(kind: str, body: Any) -> str:
    if kind == "mangle" and isinstance(body, dict):
        text = f"mangle {_short(body.get('key'))} set {_short(body.get('value'))}"
    elif body is None:
        text = kind
    else:
        text = f"{kind} {json.dumps(body, separators=(',', ':'), sort_keys=True)}"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def audit(ruleset: Mapping[str, Any], variables: Mapping[str, Any]) -> Audit:
    objects = _objects(ruleset)
    found_unsafe = tuple(unsafe(ruleset))
    family, name = TABLE
    chains = {
        chain["name"]: chain
        for item in objects
        if (chain := item.get("chain")) and (chain["family"], chain["table"]) == TABLE
    }
    rules: dict[str, list[dict[str, Any]]] = {}
    for item in objects:
        rule = item.get("rule")
        if rule and (rule["family"], rule["table"]) == TABLE:
            rules.setdefault(rule["chain"], []).append(rule)
    sets = {
        item["set"]["name"]: item["set"].get("elem", [])
        for item in objects
        if "set" in item and (item["set"]["family"], item["set"]["table"]) == TABLE
    }
    if not any(
        (table := item.get("table")) and (table["family"], table["name"]) == TABLE
        for item in objects
    ):
        problem = f"no table {family} {name}: the egress rules are not loaded"
        unloaded = (problem, *(f"unsafe: {text}" for text in found_unsafe))
        missing_all = tuple(profile_entries(variables))
        return Audit({}, (), (), missing_all, unloaded, unsafe=found_unsafe)

    found_policies = policies(ruleset)
    problems = [
        f"{hook} chain policy is {policy or 'missing'}, not drop"
        for hook, policy in found_policies.items()
        if policy != "drop"
    ]

    reader = _RuleReader(sets, rules)

    def accepted(hook: str) -> tuple[Opening, ...]:
        return tuple(
            opening
            for chain in chains.values()
            if chain.get("hook") == hook
            for opening in reader.chain(chain["name"], Opening(rule=""), depth=0)
        )

    openings = accepted("output")
    forwarded = accepted("forward")
    problems += [f"the forward chain accepts (a node forwards nothing): {o}" for o in forwarded]
    allowed = allowances(variables)
    unexpected = tuple(
        opening
        for opening in openings
        if not opening.benign and not any(allowance.covers(opening) for allowance in allowed)
    )
    problems += [f"accepts traffic the profile does not allow: {opening}" for opening in unexpected]
    missing = tuple(
        entry
        for entry in profile_entries(variables)
        if not any(entry.opened_by(opening) for opening in openings)
    )
    problems += [f"allowlist entry not opened: {entry}" for entry in missing]
    problems += [f"unsafe: {text}" for text in found_unsafe]
    return Audit(
        found_policies, openings, unexpected, missing, tuple(problems), forwarded, found_unsafe
    )


class _RuleReader:
    """Turns the rules of a chain, and the chains it jumps to, into openings."""

    def __init__(self, sets: dict[str, list[Any]], rules: dict[str, list[dict[str, Any]]]):
        self._sets = sets
        self._rules = rules

    def chain(self, name: str, context: Opening, depth: int) -> Iterator[Opening]:
        if depth > _MAX_DEPTH:
            yield replace(context, rule=f"{context.rule} {name}", unread=("jumps too deep",))
            return
        for rule in self._rules.get(name, []):
            where = f"{name}#{rule.get('handle')}"
            if rule.get("comment"):
                where += f" ({rule['comment']})"
            alternatives = [replace(context, rule=where)]
            for expression in rule.get("expr", []):
                kind, body = next(iter(expression.items()))
                if kind == "match":
                    alternatives = [
                        merged
                        for alternative in alternatives
                        for constraint in self._match(body)
                        if (merged := _merge(alternative, constraint)) is not None
                    ]
                elif kind == "accept":
                    yield from alternatives
                    break
                elif kind in ("jump", "goto"):
                    for alternative in alternatives:
                        yield from self.chain(body["target"], alternative, depth + 1)
                    if kind == "goto":
                        break
                elif kind in ("drop", "reject", "return", "continue", "queue"):
                    break
                elif kind == "vmap":
                    # A verdict map may accept; it cannot be read here, so it counts as open.
                    yield from (replace(a, unread=(*a.unread, "verdict map")) for a in alternatives)
                    break
                elif kind not in HARMLESS:
                    # `unsafe` names it; here it only keeps the rule from opening an entry.
                    alternatives = [
                        replace(a, unread=(*a.unread, f"statement {kind}")) for a in alternatives
                    ]

    def _match(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Each alternative constraint (field -> value) a match expression allows."""
        left, right, op = body["left"], body["right"], body.get("op", "==")
        fields = _fields(left)
        if op not in ("==", "in") or fields is None:
            return [{"unread": _describe(left, op, right)}]
        values = self._values(right)
        if fields == ["ct_state"]:
            states = frozenset(v for value in values for v in _flatten(value))
            return [{"ct_state": states}]
        constraints = []
        for value in values:
            parts = value if isinstance(value, tuple) else (value,)
            if len(parts) != len(fields):
                return [{"unread": _describe(left, op, right)}]
            constraint: dict[str, Any] = {}
            for field_name, part in zip(fields, parts, strict=True):
                converted = _convert(field_name, part)
                if converted is None:
                    return [{"unread": _describe(left, op, right)}]
                constraint[field_name] = converted
                if field_name.startswith(("tcp.", "udp.")):
                    constraint["l4proto"] = field_name.split(".")[0]
            constraints.append(constraint)
        return constraints

    def _values(self, right: Any) -> list[Any]:
        if isinstance(right, str) and right.startswith("@"):
            return [self._element(item) for item in self._sets.get(right[1:], [])]
        if isinstance(right, dict) and "set" in right:
            return [self._element(item) for item in right["set"]]
        return [self._element(right)]

    def _element(self, item: Any) -> Any:
        if isinstance(item, dict) and "elem" in item:
            return self._element(item["elem"]["val"])
        if isinstance(item, dict) and "concat" in item:
            return tuple(self._element(part) for part in item["concat"])
        return item


def _fields(left: Any) -> list[str] | None:
    if not isinstance(left, dict):
        return None
    if "concat" in left:
        parts = [_fields(part) for part in left["concat"]]
        if any(part is None or len(part) != 1 for part in parts):
            return None
        return [part[0] for part in parts if part]
    if "meta" in left:
        key = left["meta"].get("key")
        return {"oif": ["oif"], "oifname": ["oif"], "l4proto": ["l4proto"]}.get(key)
    if "ct" in left and left["ct"].get("key") == "state" and "dir" not in left["ct"]:
        return ["ct_state"]
    if "payload" in left:
        protocol, field_name = left["payload"].get("protocol"), left["payload"].get("field")
        if protocol in ("ip", "ip6") and field_name == "daddr":
            return ["daddr"]
        if protocol in ("tcp", "udp", "th") and field_name in ("dport", "sport"):
            return [f"{protocol}.{field_name}"]
        if protocol == "icmpv6" and field_name == "type":
            return ["icmpv6_type"]
    return None


def _flatten(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _convert(field_name: str, value: Any) -> Any:
    """A match value as a constraint on `field_name`; None when it cannot be read."""
    try:
        if field_name == "daddr":
            if isinstance(value, dict) and "prefix" in value:
                prefix = value["prefix"]
                return _network(f"{prefix['addr']}/{prefix['len']}")
            if isinstance(value, str):
                return _network(value)
            return None  # an address range: rare, and not worth reading
        if field_name.endswith(("dport", "sport")):
            if isinstance(value, int):
                return (value, value)
            if isinstance(value, dict) and "range" in value:
                low, high = value["range"]
                return (int(low), int(high))
            return None
        if field_name in ("oif", "l4proto", "icmpv6_type") and isinstance(value, str):
            return value
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _merge(opening: Opening, constraint: Mapping[str, Any]) -> Opening | None:
    """`opening` narrowed by `constraint`; None when the two cannot both hold."""
    changes: dict[str, Any] = {}
    for key, value in constraint.items():
        if key == "unread":
            changes["unread"] = (*opening.unread, value)
            continue
        target = "dport" if key.endswith("dport") else "sport" if key.endswith("sport") else key
        current = changes.get(target, getattr(opening, target))
        if current is None:
            changes[target] = value
        elif target == "daddr":
            if current.version != value.version:
                return None
            if value.subnet_of(current):
                changes[target] = value
            elif not current.subnet_of(value):
                return None
        elif target in ("dport", "sport"):
            low, high = max(current[0], value[0]), min(current[1], value[1])
            if low > high:
                return None
            changes[target] = (low, high)
        elif target == "ct_state":
            if not current & value:
                return None
            changes[target] = current & value
        elif current != value:
            return None
    return replace(opening, **changes)


def _short(value: Any) -> str:
    if isinstance(value, dict) and value:
        kind, body = next(iter(value.items()))
        if isinstance(body, dict):
            return f"{kind} " + " ".join(str(v) for v in body.values())
        return str(kind)
    return str(value)


def _describe(left: Any, op: str, right: Any) -> str:
    return f"{_short(left)} {op} {_short(right)}"
