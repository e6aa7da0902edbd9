"""Fixtures of the node suites: the node over ssh, the verify context, the role variables.

`sovereign verify` writes the context to a JSON file and names it in SOVEREIGN_VERIFY_CONTEXT;
a suite the profile does not call for, or the context leaves out, is skipped, which the
report records as not applicable. A suite the profile calls for always runs, whatever the
rendered variables switch off: a node without what the profile asks for fails it.
The project's own test run (rootdir at the repository) leaves these suites alone.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import testinfra
from testinfra.host import Host

from sovereign.nodefacts import Probe, nc_connected
from sovereign.profile.loader import load_profile
from sovereign.profile.types import split_host_port
from sovereign.verify import (
    CONTEXT_ENV,
    RoleVariables,
    VerifyContext,
    applicability,
    load_variables,
    observer,
    ssh_extra_args,
)

HERE = Path(__file__).resolve().parent
SSH_FAILED = 255
PROBE_TIMEOUT_S = 3


def _context_file() -> Path:
    value = os.environ.get(CONTEXT_ENV)
    if not value:
        raise pytest.UsageError(
            f"{CONTEXT_ENV} is not set: run these suites with `sovereign verify`"
        )
    return Path(value)


def _ours(config: pytest.Config) -> bool:
    """Run with tests/node/pytest.ini, as `sovereign verify` does."""
    return config.rootpath == HERE


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    return None if _ours(config) else True


def pytest_configure(config: pytest.Config) -> None:
    if _ours(config):
        _context_file()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _ours(config):
        return
    context = VerifyContext.load(_context_file())
    reasons = applicability(load_profile(context.profile))
    for item in items:
        suite = item.path.stem.removeprefix("test_")
        reason = reasons.get(suite)
        if reason is None and suite not in context.suites:
            reason = "not selected for this run"
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def context() -> VerifyContext:
    return VerifyContext.load(_context_file())


@pytest.fixture(scope="session")
def variables(context: VerifyContext) -> RoleVariables:
    return load_variables(context.vars)


@pytest.fixture(scope="session")
def node(context: VerifyContext) -> Host:
    """The node over ssh; its host key goes to a known_hosts file in this run's work dir."""
    return testinfra.get_host(
        context.host,
        ssh_identity_file=str(context.identity),
        ssh_config=None if context.ssh_config is None else str(context.ssh_config),
        ssh_extra_args=ssh_extra_args(_context_file().parent),
        timeout=15,
    )


@pytest.fixture(scope="session")
def sudo(node: Host) -> str:
    """The prefix that runs a command as root on the node: `sudo -n ` for a hardened node's
    admin account; nothing when ssh logs in as root, which needs no sudo installed."""
    return "" if node.user().uid == 0 else "sudo -n "


@pytest.fixture(scope="session")
def output(node: Host) -> Callable[[str], str]:
    """output(command): its stdout, stripped; if it exits non-zero, the check fails saying so."""

    def run(command: str) -> str:
        result = node.run(command)
        said = (result.stderr.strip() or result.stdout.strip())[-1000:]
        if result.rc == SSH_FAILED:
            raise ConnectionError(f"ssh to the node failed running `{command}`: {said}")
        if result.rc != 0:
            raise AssertionError(f"`{command}` exited {result.rc}: {said}")
        return str(result.stdout).strip()

    return run


@pytest.fixture
def observe(request: pytest.FixtureRequest) -> Callable[..., None]:
    """observe(**facts): what the check saw, for the report."""
    return observer(request.node)


@pytest.fixture(scope="session")
def connect(node: Host) -> Callable[[str], Probe]:
    """connect("HOST:PORT"): try a TCP connection from the node with netcat-openbsd.

    The check errors, rather than reading "blocked", when the probe did not really try.
    """

    def probe(address: str) -> Probe:
        host, port = split_host_port(address)
        if node.run("command -v nc").rc != 0:
            raise RuntimeError("nc (netcat-openbsd) is not on the node: nothing can probe")
        command = f"nc -v -z -w {PROBE_TIMEOUT_S} {shlex.quote(host)} {port}"
        result = node.run(command)
        said = f"{command}: exit {result.rc} {result.stderr.strip()[-300:]}".strip()
        connected = nc_connected(host, port, result.rc, result.stderr)
        if connected is None:
            raise RuntimeError(f"the probe from the node did not run as it should: {said}")
        return Probe(connected, said)

    return probe
