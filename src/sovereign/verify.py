"""`sovereign verify`: run the node suites (tests/node) against a node and sign what they saw.

Takes a `VerifyContext` (node address, ssh identity, exports, rendered role variables);
runs pytest in-process with `Collector`, which turns each test into a check with its
observations; gives a signed evidence `Report`, written atomically to `out`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sovereign import attestation, evidence
from sovereign.evidence import Check, NodeIdentity, Outcome, Report
from sovereign.profile.loader import ProfileError, load_profile
from sovereign.profile.model import Profile

if TYPE_CHECKING:
    import pytest

SUITES = ("attestation", "egress", "encryption", "sandbox", "baseline")
CONTEXT_ENV = "SOVEREIGN_VERIFY_CONTEXT"
ROOT = Path(__file__).resolve().parents[2]
NODE_TESTS = ROOT / "tests" / "node"
ROLES = ROOT / "roles"
SSH_TIMEOUT_S = 60
DETAIL_MAX_CHARS = 2000
# pytest's exit codes that mean the suites did not run as they should.
_PYTEST_TROUBLE = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


class VerifyError(Exception):
    """Verification could not run (bad input, node unreachable); no check was judged."""


@dataclass(frozen=True)
class Canary:
    address: str  # host:port the node connects to
    log: Path  # the canary server appends one JSON line per connection


@dataclass(frozen=True)
class VerifyContext:
    profile: Path
    vars: Path
    host: str  # ssh://USER@HOST:PORT
    identity: Path
    ssh_config: Path | None = None
    exports: Path | None = None
    image: dict[str, Any] | None = None
    canaries: dict[str, Canary] | None = None  # "allowed" and "blocked"
    suites: tuple[str, ...] = SUITES

    def to_json(self) -> dict[str, Any]:
        def path(value: Path | None) -> str | None:
            return None if value is None else str(value)

        return {
            "profile": str(self.profile),
            "vars": str(self.vars),
            "host": self.host,
            "identity": str(self.identity),
            "ssh_config": path(self.ssh_config),
            "exports": path(self.exports),
            "image": self.image,
            "canaries": None
            if self.canaries is None
            else {
                name: {"address": canary.address, "log": str(canary.log)}
                for name, canary in self.canaries.items()
            },
            "suites": list(self.suites),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VerifyContext:
        def path(value: Any) -> Path | None:
            return None if value is None else Path(value)

        try:
            canaries = data.get("canaries")
            suites = tuple(data.get("suites") or SUITES)
            unknown = sorted(set(suites) - set(SUITES))
            if unknown:
                raise VerifyError(f"unknown suites {unknown}; known: {', '.join(SUITES)}")
            return cls(
                profile=Path(data["profile"]),
                vars=Path(data["vars"]),
                host=str(data["host"]),
                identity=Path(data["identity"]),
                ssh_config=path(data.get("ssh_config")),
                exports=path(data.get("exports")),
                image=data.get("image"),
                canaries=None
                if canaries is None
                else {
                    name: Canary(address=str(item["address"]), log=Path(item["log"]))
                    for name, item in canaries.items()
                },
                suites=suites,
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise VerifyError(f"verify context: missing or wrong field {error}") from None

    @classmethod
    def load(cls, path: Path) -> VerifyContext:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise VerifyError(f"verify context {path}: {error}") from None


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int


def ssh_target(url: str) -> SshTarget:
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        port = 0
    if parts.scheme != "ssh" or not parts.username or not parts.hostname or not port:
        raise VerifyError(f"--host {url!r}: expected ssh://USER@HOST[:PORT]")
    return SshTarget(parts.username, parts.hostname, port)


def _ssh_settings(workdir: Path) -> list[str]:
    """Every ssh to the node shares one connection and learns its host key into `workdir`."""
    return [
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}",
        "-o", "IdentitiesOnly=yes",
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={workdir / 'ssh-%C'}",
        "-o", "ControlPersist=yes",
        "-o", "ConnectTimeout=15",
    ]  # fmt: skip


def ssh_options(context: VerifyContext, workdir: Path) -> list[str]:
    options = [*_ssh_settings(workdir), "-i", str(context.identity)]
    if context.ssh_config is not None:
        options += ["-F", str(context.ssh_config)]
    return options


def ssh_extra_args(workdir: Path) -> str:
    """The settings as the one string testinfra's ssh backend adds to its command line
    (it adds the identity and ssh config itself)."""
    return " ".join(shlex.quote(option) for option in _ssh_settings(workdir))


def ssh_command(context: VerifyContext, workdir: Path, *remote: str) -> list[str]:
    target = ssh_target(context.host)
    return [
        "ssh",
        *ssh_options(context, workdir),
        "-p",
        str(target.port),
        "-l",
        target.user,
        target.host,
        "--",
        *remote,
    ]


def close_ssh(context: VerifyContext, workdir: Path) -> None:
    """Stop the shared ssh connection this run opened, so no ssh process outlives it."""
    target = ssh_target(context.host)
    command = ["ssh", *ssh_options(context, workdir), "-p", str(target.port), "-l", target.user]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [*command, "-O", "exit", target.host], capture_output=True, timeout=15, check=False
        )


def node_identity(context: VerifyContext, workdir: Path) -> NodeIdentity:
    command = ssh_command(context, workdir, "hostname; cat /etc/machine-id")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SSH_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise VerifyError(f"{context.host}: no answer over ssh in {SSH_TIMEOUT_S} s") from None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise VerifyError(f"cannot reach the node over ssh at {context.host}: {reason[0]}")
    ak = None
    if context.exports is not None and (context.exports / "ak.pub.pem").is_file():
        try:
            ak = attestation.ak_sha256(context.exports / "ak.pub.pem")
        except attestation.AttestationError as error:
            raise VerifyError(str(error)) from None
    return NodeIdentity(hostname=lines[0], machine_id=lines[1], ak_sha256=ak)


class MissingVariable(LookupError):
    """A node suite needs a role variable that neither the render nor the roles define."""


class RoleVariables(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise MissingVariable(f"{key} is in neither the rendered variables nor a role's defaults")


def load_variables(rendered: Path, roles: Path = ROLES) -> RoleVariables:
    """The role variables in force: every role's defaults, overridden by the rendered file."""
    yaml = YAML(typ="safe", pure=True)
    variables = RoleVariables()
    for defaults in sorted(roles.glob("*/defaults/main.yml")):
        with contextlib.suppress(OSError, YAMLError):
            variables.update(yaml.load(defaults.read_text()) or {})
    try:
        loaded = yaml.load(rendered.read_text())
    except (OSError, YAMLError) as error:
        raise VerifyError(f"rendered variables {rendered}: {error}") from None
    if not isinstance(loaded, dict):
        raise VerifyError(f"rendered variables {rendered}: not a mapping")
    variables.update(loaded)
    return variables


def applicability(profile: Profile) -> dict[str, str | None]:
    """Each suite -> None where the profile calls for it, else why it does not.

    Only the profile decides. A role switched off in the rendered variables does not make
    its suite inapplicable: the suite runs, and the node that lacks what the profile asks
    for fails it.
    """
    tpm = any(node.tpm != "none" for node in profile.nodes)
    no_tpm = "the profile's nodes have no TPM (tpm: none)"
    runtime = profile.sandbox.runtime
    return {
        "attestation": None if tpm else no_tpm,
        "egress": None,
        "encryption": None if tpm else no_tpm,
        "sandbox": None
        if runtime == "gvisor"
        else f"the profile's sandbox runtime is {runtime}, not gVisor",
        "baseline": None,
    }


def selected_suites(profile: Profile) -> tuple[str, ...]:
    reasons = applicability(profile)
    return tuple(suite for suite in SUITES if reasons[suite] is None)


def observer(item: pytest.Item) -> Callable[..., None]:
    """`observe(**facts)` for one test: facts land in the report's `observed` for its check."""

    def observe(**facts: Any) -> None:
        # Fails here, in the test that passed it, if the report could not carry it.
        item.user_properties.append(("observed", evidence.normalised(facts)))

    return observe


@dataclass
class _Record:
    id: str
    suite: str
    title: str
    outcome: Outcome | None = None
    detail: str | None = None
    observed: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0


class Collector:
    """A pytest plugin: each collected test becomes a check; a skip means not applicable."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._failures: dict[tuple[str, str], tuple[bool, str]] = {}
        self.errors: list[str] = []

    def checks(self) -> list[Check]:
        return [
            Check(
                id=record.id,
                suite=record.suite,
                title=record.title,
                outcome=record.outcome or "error",
                observed=record.observed,
                detail=record.detail if record.outcome else "the check did not run",
                time=record.time,
            )
            for record in self._records.values()
        ]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            suite = item.path.stem.removeprefix("test_")
            self._records[item.nodeid] = _Record(
                id=f"{suite}.{item.name.removeprefix('test_')}",
                suite=suite,
                title=_title(item),
            )

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.errors.append(f"{report.nodeid or 'collection'}: {report.longreprtext}")

    def pytest_internalerror(self, excrepr: object) -> None:
        self.errors.append(f"internal error: {excrepr}")

    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        import pytest

        excinfo = call.excinfo
        if excinfo is None or excinfo.errisinstance(pytest.skip.Exception):
            return
        # A check that asserted and was wrong failed; one that crashed could not judge.
        judged = call.when == "call" and excinfo.errisinstance(
            (AssertionError, pytest.fail.Exception)
        )
        # pytest appends its own explanation ("\nassert ...") to an assert's message.
        text = str(excinfo.value).split("\nassert ", 1)[0] if judged else excinfo.exconly()
        self._failures[(item.nodeid, call.when)] = (judged, _clip(text))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = self._records.get(report.nodeid)
        if record is None:
            return
        record.time += report.duration
        record.observed = {
            key: value
            for name, facts in report.user_properties
            if name == "observed" and isinstance(facts, dict)
            for key, value in facts.items()
        }
        judged, text = self._failures.get((report.nodeid, report.when), (False, None))
        if report.when == "setup":
            if report.skipped:
                record.outcome, record.detail = "not_applicable", _skip_reason(report)
            elif report.failed:
                record.outcome, record.detail = "error", text or report.longreprtext
        elif report.when == "call":
            if report.skipped and hasattr(report, "wasxfail"):
                record.outcome, record.detail = "failed", f"expected to fail: {report.wasxfail}"
            elif report.skipped:
                record.outcome, record.detail = "not_applicable", _skip_reason(report)
            elif report.failed:
                record.outcome = "failed" if judged else "error"
                record.detail = text or _clip(report.longreprtext)
            else:
                record.outcome = "passed"
        elif report.failed and record.outcome in (None, "passed"):
            record.outcome, record.detail = "error", f"teardown: {text or report.longreprtext}"


def _title(item: pytest.Item) -> str:
    function = getattr(item, "obj", None)
    doc = None if function is None else inspect.getdoc(function)
    if doc:
        return " ".join(doc.split("\n\n")[0].split())
    return item.name.removeprefix("test_").replace("_", " ")


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"


def run_suites(tests: Path, collector: Collector, *args: str) -> int:
    """pytest.main on `tests` with its own pytest.ini and no plugins but `collector`."""
    try:
        import pytest
    except ImportError:
        raise VerifyError(
            "sovereign verify runs pytest and pytest-testinfra: install the project's dev group"
        ) from None
    argv = [
        str(tests),
        "-c", str(tests / "pytest.ini"),
        "--rootdir", str(tests),
        "--disable-plugin-autoload",
        "-p", "no:cacheprovider",
        "-p", "no:terminal",
        *args,
    ]  # fmt: skip
    with _own_modules(tests):
        return int(pytest.main(argv, plugins=[collector]))


@contextlib.contextmanager
def _own_modules(tests: Path) -> Iterator[None]:
    """Keep pytest's importlib mode from reusing a same-named module of an earlier run.

    It names modules after their path under the rootdir ("conftest", "test_egress") and
    reuses what sys.modules already holds under that name.
    """

    def ours(module: object) -> bool:
        file = getattr(module, "__file__", None)
        return file is not None and Path(file).resolve().is_relative_to(tests.resolve())

    names = {path.stem for path in tests.glob("*.py")}
    for name in names & set(sys.modules):
        if not ours(sys.modules[name]):
            del sys.modules[name]
    before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if ours(sys.modules[name]):
                del sys.modules[name]


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_context(context: VerifyContext) -> Profile:
    """The context's profile, once every file it names is there; else VerifyError."""
    ssh_target(context.host)
    for name, path in (("identity", context.identity), ("vars", context.vars)):
        if not path.is_file():
            raise VerifyError(f"{name} {path} does not exist")
    if context.exports is not None and not context.exports.is_dir():
        raise VerifyError(f"exports {context.exports} is not a directory")
    if context.ssh_config is not None and not context.ssh_config.is_file():
        raise VerifyError(f"ssh config {context.ssh_config} does not exist")
    try:
        profile = load_profile(context.profile)
    except ProfileError as error:
        first = error.issues[0]
        raise VerifyError(f"{first.file}:{first.line}: {first.path}: {first.message}") from None
    load_variables(context.vars)  # unreadable variables stop the run here, not in each check
    attests = applicability(profile)["attestation"] is None
    if attests and "attestation" in context.suites and context.exports is None:
        raise VerifyError(
            "the attestation checks need the provisioning exports (ak.pub.pem, "
            "golden-pcrs.json): pass --exports DIR"
        )
    return profile


def run_verify(context: VerifyContext, out: Path, key: Path, *, tests: Path = NODE_TESTS) -> Report:
    """Run the node suites against the node in `context`; sign and write the report to `out`."""
    profile = check_context(context)
    try:
        signing_key = evidence.load_or_create_signing_key(key)
    except evidence.EvidenceError as error:
        raise VerifyError(str(error)) from None
    if not (tests / "pytest.ini").is_file():
        raise VerifyError(f"the node suites are not at {tests} (a source checkout has them)")
    workdir = Path(tempfile.mkdtemp(prefix="sovereign-verify-"))
    try:
        context_file = workdir / "context.json"
        context_file.write_text(json.dumps(context.to_json(), indent=2))
        node = node_identity(context, workdir)
        started = _now()
        collector = Collector()
        with _environment(CONTEXT_ENV, str(context_file)):
            code = run_suites(tests, collector)
        finished = _now()
    finally:
        close_ssh(context, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    if collector.errors:
        raise VerifyError("the node suites did not load:\n" + "\n".join(collector.errors))
    if code in _PYTEST_TROUBLE:
        raise VerifyError(f"the node suites did not run: pytest: {_PYTEST_TROUBLE[code]}")
    try:
        report = evidence.sign(
            Report(
                profile=profile.name,
                node=node,
                image=context.image,
                started=started,
                finished=finished,
                checks=tuple(collector.checks()),
            ),
            signing_key,
        )
    except evidence.EvidenceError as error:
        raise VerifyError(f"cannot sign the report: {error}") from None
    try:
        evidence.write_report(report, out)
    except OSError as error:
        raise VerifyError(f"cannot write the report to {out}: {error.strerror}") from None
    return report
