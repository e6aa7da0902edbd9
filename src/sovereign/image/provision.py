"""First-boot provisioning: the roles that need the running node, applied over ssh.

`disk_encryption` (LUKS2 bound to this node's TPM) and `tpm_attestation` (EK, AK, golden
PCR values) cannot run in the builder's chroot: they need the node's own TPM and kernel.
They write what the operator keeps (the recovery key, the AK public key, the EK
certificate, the golden PCRs) into `exports/<node>/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sovereign.image.recipe import PLAYBOOKS, ROLES

PROVISION_TIMEOUT_S = 900


class ProvisionError(Exception):
    """The node's first-boot roles failed; the message carries the end of Ansible's output."""


@dataclass(frozen=True)
class SshTarget:
    name: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class PlaybookRun:
    changed: int
    failures: int
    ok: int
    log: Path


def write_inventory(target: SshTarget, path: Path) -> Path:
    ssh_args = (
        f"-o UserKnownHostsFile={target.known_hosts} -o StrictHostKeyChecking=accept-new "
        "-o IdentitiesOnly=yes -o LogLevel=ERROR"
    )
    inventory = {
        "sovereign": {
            "hosts": {
                target.name: {
                    "ansible_host": target.address,
                    "ansible_port": target.port,
                    "ansible_user": target.user,
                    "ansible_ssh_private_key_file": str(target.identity),
                    "ansible_ssh_common_args": ssh_args,
                    "ansible_python_interpreter": "/usr/bin/python3",
                }
            }
        }
    }
    path.write_text(json.dumps(inventory, indent=2) + "\n")
    return path


def run_playbook(
    target: SshTarget, playbook: str, variables: Path, exports: Path, work: Path, label: str
) -> PlaybookRun:
    """Run `playbooks/<playbook>` against the node; the JSON callback's stats give the counts."""
    work.mkdir(parents=True, exist_ok=True)
    exports.mkdir(parents=True, exist_ok=True)
    inventory = write_inventory(target, work / "inventory.json")
    report = work / f"{label}.json"
    argv = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "-i", str(inventory), "-e", f"@{variables}",
        "-e", f"tpm_attestation_export_dir={exports}",
        "-e", f"disk_encryption_recovery_key_file={exports / target.name / 'recovery.key'}",
        str(PLAYBOOKS / playbook),
    ]  # fmt: skip
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        # One ssh round trip per task instead of four: under TCG each one costs seconds.
        "ANSIBLE_PIPELINING": "True",
    }
    with report.open("w") as sink:
        try:
            done = subprocess.run(
                argv, stdout=sink, stderr=subprocess.PIPE, text=True, env=env,
                timeout=PROVISION_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ProvisionError(f"{playbook} ran past {PROVISION_TIMEOUT_S} s") from None
    try:
        result = json.loads(report.read_text())
    except ValueError:
        raise ProvisionError(
            f"{playbook} gave no report ({done.returncode}): {done.stderr.strip()[-1500:]}"
        ) from None
    stats = result.get("stats", {}).get(target.name, {})
    run = PlaybookRun(
        stats.get("changed", 0), stats.get("failures", 0) + stats.get("unreachable", 0),
        stats.get("ok", 0), report,
    )  # fmt: skip
    if done.returncode != 0 or run.failures:
        raise ProvisionError(f"{playbook} failed on {target.name}: {_failed_tasks(result)}")
    return run


def _failed_tasks(result: dict[str, object]) -> str:
    messages: list[str] = []
    for play in result.get("plays", []):  # type: ignore[attr-defined]
        for task in play.get("tasks", []):
            for host in task.get("hosts", {}).values():
                if host.get("failed") or host.get("unreachable"):
                    name = task.get("task", {}).get("name", "?")
                    messages.append(f"{name}: {host.get('msg', '')}".strip())
    return "; ".join(messages) or "see the Ansible report"
