"""`sovereign image build`: a profile's Debian node image, cached by recipe hash.

mmdebstrap makes the bookworm rootfs. Its customize hooks (run through `sh`, with the
rootfs as `$1`) copy the overlay, run the recipe's hooks, and apply the build-time roles
with Ansible's `community.general.chroot` connection, twice: the second run must change
nothing. The rootfs then becomes a GPT disk (see `disk`). Everything lands in a staging
directory under the cache and is renamed into place only when complete, so a failed or
interrupted build leaves no half-made entry and no half-written output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sovereign.image.disk import (
    ESP_TYPE,
    LINUX_DATA_TYPE,
    ROOT_X86_64_TYPE,
    DiskError,
    Partition,
    assemble,
    make_esp,
    make_ext4,
)
from sovereign.image.recipe import PLAYBOOKS, ROLES, Recipe, load_recipe, recipe_hash
from sovereign.profile.model import Profile
from sovereign.profile.types import byte_size
from sovereign.render.ansible import role_variables
from sovereign.render.resolved import dump_yaml
from sovereign.tools import locked

MANIFEST = "manifest.json"
DISK = "disk.raw"
QCOW2 = "disk.qcow2"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
ROOT_LABEL = "sovereign-root"
DATA_LABEL = "sovereign-data"
BUILD_INFO = "etc/sovereign/build.json"
VARIABLES = "ansible-vars.yml"
# What a build directory holds; `--out` is replaced whole, so nothing else may be in it.
IMAGE_FILES = frozenset(
    {MANIFEST, DISK, QCOW2, KERNEL, INITRD, VARIABLES, "build.log", "packages.tsv",
     "release-dates", "second-run.json"}
)  # fmt: skip
# The roles the builder applies into the rootfs; the others need the running node.
BUILD_TIME_ROLES = ("base_hardening", "egress_lockdown", "sandbox_runtime", "gateway_node")
RUNTIME_ROLES = ("disk_encryption", "tpm_attestation")
MMDEBSTRAP_TIMEOUT_S = 1800

Log = Callable[[str], None]


class BuildError(Exception):
    """The image could not be built; nothing was left half-made."""


class BuildInputError(BuildError):
    """The request itself is wrong (profile, option, output directory); nothing was started."""


@dataclass(frozen=True)
class BuildOptions:
    node: str | None = None
    disabled_roles: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    qcow2: bool = False
    recipe: str = "debian"


@dataclass
class BuildResult:
    out: Path
    manifest: dict[str, Any]
    cached: bool
    seconds: float
    log: list[str] = field(default_factory=list)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("SOVEREIGN_IMAGE_CACHE", f"{base}/sovereign/images"))


def build_variables(profile: Profile, options: BuildOptions) -> dict[str, Any]:
    variables = role_variables(profile)
    variables["base_hardening_admin_keys"] = [
        *variables["base_hardening_admin_keys"],
        *options.admin_keys,
    ]
    for role in options.disabled_roles:
        variables[f"{role}_enabled"] = False
    return variables


def build_image(
    profile: Profile, out: Path, options: BuildOptions, log: Log = lambda _: None
) -> BuildResult:
    started = time.monotonic()
    if profile.host.os != "debian":
        raise BuildInputError(
            f"host.os is {profile.host.os}: `sovereign image build` makes Debian images "
            "(Talos and NixOS nodes are configured from talos/ and nix/)"
        )
    unknown = sorted(set(options.disabled_roles) - set(BUILD_TIME_ROLES + RUNTIME_ROLES))
    if unknown:
        raise BuildInputError(
            f"unknown role {', '.join(unknown)}; "
            f"roles: {', '.join(BUILD_TIME_ROLES + RUNTIME_ROLES)}"
        )
    node = _node(profile, options.node)
    recipe = load_recipe(options.recipe)
    variables = build_variables(profile, options)
    variables_text = dump_yaml(variables).encode()
    packages = recipe.spec.packages_for(profile.kind)
    key = recipe_hash(recipe, variables_text, {"packages": packages, "hostname": node})
    _check_out(out)
    entry = cache_root() / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with locked(entry.parent, on_wait=lambda: log("waiting for another build of this recipe")):
        cached = (entry / MANIFEST).is_file()
        if cached:
            log(f"recipe {key[:12]} is cached: {entry}")
        else:
            _build_into_cache(entry, recipe, profile, node, variables_text, packages, key, log)
    manifest: dict[str, Any] = json.loads((entry / MANIFEST).read_text())
    _export(entry, out, manifest, options.qcow2, log)
    return BuildResult(out, manifest, cached, time.monotonic() - started)


def _node(profile: Profile, name: str | None) -> str:
    names = [node.name for node in profile.nodes]
    if name is None:
        return names[0]
    if name not in names:
        raise BuildInputError(f"node {name!r} is not in the profile; its nodes: {', '.join(names)}")
    return name


def _check_out(out: Path) -> None:
    """`out` may be new, empty, or an earlier build holding nothing but a build's files: it is
    replaced whole, so anything else in it would be lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildInputError(f"refusing to write into {out}: it is not a directory")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in IMAGE_FILES)
    if foreign or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        held = ", ".join(foreign) if foreign else f"files but no {MANIFEST}"
        raise BuildInputError(
            f"refusing to write into {out}: it holds {held}, which an image build would "
            "replace; choose an empty or new directory"
        )


def _build_into_cache(
    entry: Path,
    recipe: Recipe,
    profile: Profile,
    node: str,
    variables_text: bytes,
    packages: list[str],
    key: str,
    log: Log,
) -> None:
    if os.geteuid() != 0:
        raise BuildError(
            "image build needs root: mmdebstrap makes device nodes and Ansible's chroot "
            "connection calls chroot(2)"
        )
    for tool in ("mmdebstrap", "mkfs.ext4", "mkfs.vfat", "mcopy", "sgdisk"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not installed; run `sovereign tools install`")
    work = Path(tempfile.mkdtemp(prefix=f"{key[:12]}.partial-", dir=entry.parent))
    try:
        began = datetime.now(UTC)
        rootfs = work / "rootfs"
        vars_file = work / "vars.yml"
        vars_file.write_bytes(variables_text)
        log(f"mmdebstrap {recipe.spec.suite}: {len(packages)} packages, then the build-time roles")
        _mmdebstrap(recipe, rootfs, work, packages, node, vars_file)
        second_run = _ansible_stats(work / "second-run.json")
        if second_run["changed"] or second_run["failures"]:
            raise BuildError(
                f"the build-time roles are not idempotent: their second run reported {second_run}"
            )
        info = {"recipe_hash": key, "profile": profile.name, "kind": profile.kind, "built": _now()}
        (rootfs / BUILD_INFO).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log("laying out the GPT disk: ESP (systemd-boot), root, data")
        manifest = _make_disk(recipe, profile, rootfs, work, key)
        manifest.update(
            {
                "node": node,
                "recipe_hash": key,
                "recipe": recipe.name,
                "debian": {
                    "suite": recipe.spec.suite,
                    "sources": recipe.spec.sources,
                    "archive_dates": _archive_dates(work / "release-dates"),
                    "snapshot": None,
                },
                "packages": _packages(work / "packages.tsv"),
                "roles": {
                    "applied": [r for r in BUILD_TIME_ROLES if _enabled(variables_text, r)],
                    "disabled": [
                        r
                        for r in BUILD_TIME_ROLES + RUNTIME_ROLES
                        if not _enabled(variables_text, r)
                    ],
                    "at_first_boot": [r for r in RUNTIME_ROLES if _enabled(variables_text, r)],
                    "second_run": second_run,
                },
                "variables": VARIABLES,
                "started": began.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "built": info["built"],
            }
        )
        (work / VARIABLES).write_bytes(variables_text)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for leftover in ("rootfs", "root.img", "esp.img", "vars.yml"):
            target = work / leftover
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        os.rename(work, entry)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _enabled(variables_text: bytes, role: str) -> bool:
    return f"{role}_enabled: false".encode() not in variables_text


def _mmdebstrap(
    recipe: Recipe, rootfs: Path, work: Path, packages: list[str], node: str, vars_file: Path
) -> None:
    playbook = shlex.join(
        [
            str(Path(sys.executable).with_name("ansible-playbook")),
            "-i", "$ROOT,", "-c", "community.general.chroot",
            "-e", f"@{vars_file}", "-e", "sovereign_build_chroot=true",
            "-e", "ansible_python_interpreter=/usr/bin/python3",
            str(PLAYBOOKS / "image.yml"),
        ]
    ).replace("'$ROOT,'", '"$1",')  # fmt: skip
    second = work / "second-run.json"
    hooks = [f"sync-in {recipe.overlay} /"]
    hooks += [f'sh {shlex.quote(str(hook))} "$1"' for hook in recipe.hooks("before-roles")]
    hooks += [
        playbook,
        f"ANSIBLE_STDOUT_CALLBACK=ansible.posix.json {playbook} > {shlex.quote(str(second))}",
        # apt's lists are gone once mmdebstrap cleans up: take the archive dates now.
        "grep -H '^Date:' \"$1\"/var/lib/apt/lists/*InRelease > "
        + shlex.quote(str(work / "release-dates")),
    ]
    hooks += [f'sh {shlex.quote(str(hook))} "$1"' for hook in recipe.hooks("after-roles")]
    hooks.append(
        "chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\t${Architecture}\\n' > "
        + shlex.quote(str(work / "packages.tsv"))
    )
    argv = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={recipe.spec.variant}",
        f"--include={','.join(packages)}",
        *(f"--customize-hook={hook}" for hook in hooks),
        recipe.spec.suite,
        str(rootfs),
        *recipe.spec.sources,
    ]
    env = {
        **os.environ,
        "SOVEREIGN_HOSTNAME": node,
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    log_path = work / "build.log"
    with log_path.open("w") as log_file:
        try:
            result = subprocess.run(
                argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                timeout=MMDEBSTRAP_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BuildError(f"mmdebstrap ran past {MMDEBSTRAP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise BuildError(f"mmdebstrap failed ({result.returncode}); the end of its log:\n{tail}")


def _ansible_stats(path: Path) -> dict[str, int]:
    try:
        stats: dict[str, dict[str, int]] = json.loads(path.read_text())["stats"]
    except (OSError, ValueError, KeyError) as error:
        raise BuildError(f"the second Ansible run left no readable report: {error}") from None
    totals = {"changed": 0, "failures": 0, "ok": 0}
    for host in stats.values():
        for name in totals:
            totals[name] += host.get(name, 0)
    return totals


def _make_disk(
    recipe: Recipe, profile: Profile, rootfs: Path, work: Path, key: str
) -> dict[str, Any]:
    def stable_uuid(name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sovereign-image:{key}:{name}")).upper()

    root_uuid = stable_uuid("root-partition")
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError("the rootfs has no kernel in /boot; is linux-image-* in the package list?")
    kernel = kernels[-1]
    initrd = kernel.with_name(kernel.name.replace("vmlinuz-", "initrd.img-"))
    (rootfs / "etc/fstab").write_text(
        "# Written by the image builder.\n"
        f"PARTUUID={root_uuid.lower()} / ext4 rw,errors=remount-ro 0 1\n"
    )
    loader = work / "loader.conf"
    # No boot menu and no editor: nobody at the console can change the kernel command line.
    loader.write_text("default sovereign.conf\ntimeout 0\neditor no\n")
    entry = work / "sovereign.conf"
    entry.write_text(
        f"title SovereignStack {profile.name}\nlinux /{KERNEL}\ninitrd /{INITRD}\n"
        f"options root=PARTUUID={root_uuid.lower()} {recipe.spec.kernel_cmdline}\n"
    )
    boot_efi = rootfs / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    esp = work / "esp.img"
    esp_size = byte_size(recipe.spec.esp_size)
    root = work / "root.img"
    try:
        make_esp(
            esp,
            esp_size,
            {
                "EFI/BOOT/BOOTX64.EFI": boot_efi,
                "EFI/systemd/systemd-bootx64.efi": boot_efi,
                "loader/loader.conf": loader,
                "loader/entries/sovereign.conf": entry,
                KERNEL: kernel,
                INITRD: initrd,
            },
            volume_id=key[:8],
        )
        root_size = byte_size(profile.host.disk.root_size)
        make_ext4(root, rootfs, root_size, ROOT_LABEL, stable_uuid("root-fs"))
        partitions = assemble(
            work / DISK,
            [
                Partition("esp", ESP_TYPE, stable_uuid("esp"), esp_size, esp),
                Partition(ROOT_LABEL, ROOT_X86_64_TYPE, root_uuid, root_size, root),
                Partition(
                    DATA_LABEL, LINUX_DATA_TYPE, stable_uuid("data"),
                    byte_size(profile.host.disk.data_size),
                ),
            ],
            disk_guid=stable_uuid("disk"),
        )  # fmt: skip
    except DiskError as error:
        raise BuildError(str(error)) from None
    shutil.copyfile(kernel, work / KERNEL)
    disk_bytes = (work / DISK).stat().st_size
    version = kernel.name.removeprefix("vmlinuz-")
    shutil.copyfile(initrd, work / INITRD)
    return {
        "format": "sovereign-image/1",
        "profile": profile.name,
        "kind": profile.kind,
        "image": {"file": DISK, "sha256": _sha256(work / DISK), "bytes": disk_bytes},
        "kernel": {"file": KERNEL, "version": version, "sha256": _sha256(work / KERNEL)},
        "initrd": {"file": INITRD, "sha256": _sha256(work / INITRD)},
        "kernel_cmdline": f"root=PARTUUID={root_uuid.lower()} {recipe.spec.kernel_cmdline}",
        "partitions": partitions,
    }  # fmt: skip


def _export(entry: Path, out: Path, manifest: dict[str, Any], qcow2: bool, log: Log) -> None:
    """Copy a cache entry to `out`, all or nothing; the cache keeps its own copy."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.image-", dir=out.parent))
    try:
        for item in sorted(entry.iterdir()):
            if item.is_file():
                subprocess.run(
                    [
                        "cp",
                        "--sparse=always",
                        "--reflink=auto",
                        str(item),
                        str(staging / item.name),
                    ],
                    check=True,
                )
        if qcow2:
            log("converting to qcow2")
            subprocess.run(
                ["qemu-img", "convert", "-O", "qcow2", str(staging / DISK), str(staging / QCOW2)],
                check=True, capture_output=True,
            )  # fmt: skip
            manifest["qcow2"] = {"file": QCOW2, "sha256": _sha256(staging / QCOW2)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _archive_dates(path: Path) -> dict[str, str]:
    dates: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, _, date = line.partition(":Date:")
        dates[Path(name).name.removesuffix("_InRelease")] = date.strip()
    return dates


def _packages(path: Path) -> list[dict[str, str]]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [{"name": n, "version": v, "arch": a} for n, v, a in sorted(rows)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
