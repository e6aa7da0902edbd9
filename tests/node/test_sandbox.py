"""Sandbox: gVisor (runsc) is the node's container runtime, and its containers have no network.

Reads what the node is configured with (/etc/sovereign/sandbox.json and containers.conf),
then builds an OCI bundle with busybox as its whole root file system and runs it with those
settings. From inside, it lists the interfaces and tries to connect to an address the node
itself reaches, so "cannot connect" is the sandbox's doing and not a dead target's.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from testinfra.host import Host

from sovereign.nodefacts import Probe, busybox_nc_connected, interfaces
from sovereign.profile.types import split_host_port
from sovereign.verify import VerifyContext

SANDBOX_JSON = "/etc/sovereign/sandbox.json"
# containers.conf and its drop-ins, in the order podman reads them: later ones win.
CONTAINERS_CONF = ("/usr/share/containers/containers.conf", "/etc/containers/containers.conf")
CONTAINERS_CONF_D = "/etc/containers/containers.conf.d"
RUNTIME = "runsc"
PROBE = "SOVEREIGN-PROBE\n"  # /proc/net/dev before it, the probe's output after
MARKER = "SOVEREIGN-CONNECT="
# Runs as root on the node: $1 the runtime, $2 its platform, $3 its network, $4 $5 the host
# and port to try from inside the container.
BUNDLE_SCRIPT = r"""
set -eu
runtime=$1 platform=$2 network=$3
busybox=$(command -v busybox) || { echo "busybox (busybox-static) is not installed" >&2; exit 3; }
"$busybox" --list | grep -qx nc || { echo "this busybox has no nc" >&2; exit 3; }
dir=$(mktemp -d -p /var/tmp sovereign-verify-sandbox.XXXXXX)
id=$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '-')
cleanup() {
    "$runtime" --root "$dir/state" delete -force "$id" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir -p "$dir/bundle/rootfs/bin" "$dir/state"
cp "$busybox" "$dir/bundle/rootfs/bin/busybox"
cd "$dir/bundle"
"$runtime" spec -- /bin/busybox sh -c '/bin/busybox cat /proc/net/dev
echo SOVEREIGN-PROBE
/bin/busybox nc -w 3 "$0" "$1" </dev/null 2>&1
echo SOVEREIGN-CONNECT=$?' "$4" "$5"
sed -i 's/"terminal": true/"terminal": false/' config.json
"$runtime" --root "$dir/state" --network="$network" --platform="$platform" \
    run --bundle "$dir/bundle" "$id"
"""


def _containers_conf(output: Callable[[str], str]) -> dict[str, Any]:
    """containers.conf as podman sees it: each file's tables merged over the ones before."""
    listing = (
        f"for f in {' '.join(CONTAINERS_CONF)} {CONTAINERS_CONF_D}/*.conf; "
        'do [ -f "$f" ] && printf "%s\\n" "$f"; done; true'
    )
    files = output(f"sh -c {shlex.quote(listing)}").splitlines()
    base = [path for path in files if not path.startswith(CONTAINERS_CONF_D)]
    merged: dict[str, Any] = {}
    for path in base + sorted(set(files) - set(base)):
        try:
            _merge(merged, tomllib.loads(output(f"cat {shlex.quote(path)}")))
        except tomllib.TOMLDecodeError as error:
            raise AssertionError(f"{path} is not TOML: {error}") from None
    return merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _target(context: VerifyContext, output: Callable[[str], str]) -> str:
    """The allowed canary when there is one, else the node's own ssh address: the node
    reaches either, a container without a network neither."""
    if context.canaries and "allowed" in context.canaries:
        return context.canaries["allowed"].address
    fields = output("echo $SSH_CONNECTION").split()
    if len(fields) != 4:
        pytest.fail(f"SSH_CONNECTION on the node is {fields}, not client and server addresses")
    return f"{fields[2]}:{fields[3]}"


def test_runsc_is_the_default_runtime_with_no_network(
    output: Callable[[str], str], observe: Callable[..., None]
) -> None:
    """runsc is the configured default container runtime, and containers get no network"""
    try:
        sandbox = json.loads(output(f"cat {SANDBOX_JSON}"))
    except json.JSONDecodeError as error:
        raise AssertionError(f"{SANDBOX_JSON} is not JSON: {error}") from None
    conf = _containers_conf(output)
    engine = conf.get("engine", {})
    observe(
        sandbox=sandbox,
        runtime=engine.get("runtime"),
        runtime_paths=engine.get("runtimes", {}).get(RUNTIME),
        netns=conf.get("containers", {}).get("netns"),
    )
    assert sandbox.get("default_runtime") == RUNTIME, f"{SANDBOX_JSON}: {sandbox}"
    assert sandbox.get("network") == "none", f"{SANDBOX_JSON}: network {sandbox.get('network')}"
    assert engine.get("runtime") == RUNTIME, (
        f"containers.conf: [engine] runtime is {engine.get('runtime')!r}, not {RUNTIME!r}"
    )
    assert engine.get("runtimes", {}).get(RUNTIME), f"containers.conf registers no {RUNTIME}"
    assert conf.get("containers", {}).get("netns") == "none", (
        f"containers.conf: [containers] netns is {conf.get('containers', {}).get('netns')!r}"
    )


def test_runsc_container_has_no_network(
    node: Host,
    output: Callable[[str], str],
    sudo: str,
    connect: Callable[[str], Probe],
    context: VerifyContext,
    observe: Callable[..., None],
) -> None:
    """A container run as the node is configured has only lo and cannot connect out"""
    try:
        sandbox = json.loads(output(f"cat {SANDBOX_JSON}"))
    except json.JSONDecodeError as error:
        raise AssertionError(f"{SANDBOX_JSON} is not JSON: {error}") from None
    engine = _containers_conf(output).get("engine", {})
    runtime = engine.get("runtime")
    assert runtime == RUNTIME, f"the configured container runtime is {runtime!r}, not {RUNTIME}"
    paths = engine.get("runtimes", {}).get(runtime) or []
    found = [path for path in paths if node.run(f"test -x {shlex.quote(str(path))}").rc == 0]
    assert found, f"containers.conf gives no executable path for {runtime}: {paths}"
    platform, network = str(sandbox.get("platform")), str(sandbox.get("network"))

    target = _target(context, output)
    host, port = split_host_port(target)
    control = connect(target)  # errors unless the probe really ran
    arguments = " ".join(shlex.quote(str(a)) for a in (found[0], platform, network, host, port))
    result = node.run(f"{sudo}sh -c {shlex.quote(BUNDLE_SCRIPT)} sandbox {arguments}")
    net_dev, _, probe = result.stdout.partition(PROBE)
    seen = interfaces(net_dev)
    line = next((line for line in probe.splitlines() if line.startswith(MARKER)), "")
    exit_code = line.removeprefix(MARKER).strip()
    connected = busybox_nc_connected(host, int(exit_code), probe) if exit_code.isdigit() else None
    observe(
        runtime=found[0],
        platform=platform,
        network=network,
        target=target,
        node_connects=control.connected,
        interfaces=seen,
        container_connects=connected,
        exit=result.rc,
    )
    assert control.connected, (
        f"the node itself cannot reach {target}, so a container failing to proves nothing: "
        f"{control.said}"
    )
    assert result.rc == 0, f"the container did not run: {result.stderr.strip()[-1000:]}"
    assert seen == ["lo"], f"the container has interfaces {seen}, want only lo"
    assert connected is not None, (
        f"the probe inside the container did not run as it should: {probe[-500:]}"
    )
    assert not connected, f"from inside the container, {target} is reachable"
