"""Encryption: the node's data lives on LUKS2 that only its TPM (or the recovery key) opens.

The volume is `/dev/disk/by-partlabel/sovereign-data`, mapped as `sovereign-data` and mounted
at /var/lib/private/sovereign; the role variables may name others.
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import Callable

from testinfra.host import Host

from sovereign.nodefacts import RECOVERY_KEY_PATTERN, crypttab, luks_binding
from sovereign.verify import RoleVariables

DEVICE = "/dev/disk/by-partlabel/sovereign-data"
NAME = "sovereign-data"
MOUNT = "/var/lib/private/sovereign"
# Where key material could be left behind, and how long reading the raw device may take.
SEARCHED = ("/etc", "/root", "/home", "/var/lib")
RAW_GREP_TIMEOUT_S = 300
# Runs as root: $1 the mount to leave out, $2 the pattern, then the directories. Exit 0 once
# every file was read (the matching ones on stdout), else the step that could not run.
SEARCH_SCRIPT = r"""
mount=$1 pattern=$2
shift 2
list=$(mktemp) || exit 3
trap 'rm -f "$list"' EXIT
find "$@" -xdev -path "$mount" -prune -o -type f -size -16M -print0 >"$list" || exit 4
# grep exits 1 for a batch with no match: the answer hoped for, not a failure.
xargs -0r sh -c 'p=$1; shift; grep -lE -- "$p" "$@"; [ $? -le 1 ]' grep "$pattern" <"$list" ||
    exit 5
"""
SEARCH_FAILED = {3: "mktemp", 4: "find", 5: "grep"}
# `test -e`: 0 there, 1 not there; anything else says nothing.
EXISTS, ABSENT = 0, 1


def _volume(variables: RoleVariables) -> tuple[str, str, str]:
    return (
        str(variables.get("disk_encryption_device") or DEVICE),
        str(variables.get("disk_encryption_name") or NAME),
        str(variables.get("disk_encryption_mount") or MOUNT),
    )


def test_data_mount_is_luks2(
    output: Callable[[str], str],
    sudo: str,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """The data mount is ext4 on a dm-crypt LUKS2 mapping of the data partition"""
    device, name, mount = _volume(variables)
    tree = json.loads(output(f"lsblk -J -o NAME,TYPE,FSTYPE,MOUNTPOINTS {shlex.quote(device)}"))
    partition = tree["blockdevices"][0]
    children = partition.get("children") or []
    status = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition(":")
            for line in output(f"{sudo}cryptsetup status {shlex.quote(name)}").splitlines()[1:]
        )
    )
    real_device = output(f"readlink -f {shlex.quote(device)}")
    observe(
        partition=partition["name"],
        fstype=partition.get("fstype"),
        mappings=[(child["name"], child["type"], child.get("mountpoints")) for child in children],
        luks_type=status.get("type"),
        mapped_device=status.get("device"),
    )
    assert partition.get("fstype") == "crypto_LUKS", f"{device} holds {partition.get('fstype')}"
    assert status.get("type") == "LUKS2", f"{name} is {status.get('type')}, not LUKS2"
    assert status.get("device") == real_device, f"{name} maps {status.get('device')}, not {device}"
    assert any(
        child["name"] == name
        and child["type"] == "crypt"
        and mount in (child.get("mountpoints") or [])
        for child in children
    ), f"{mount} is not mounted from the {name} mapping of {device}"


def test_tpm2_token_bound_to_profile_pcrs(
    output: Callable[[str], str],
    sudo: str,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """A systemd-tpm2 token binds the volume to the profile's disk PCRs; no other keyslot"""
    device, _, _ = _volume(variables)
    metadata = json.loads(
        output(f"{sudo}cryptsetup luksDump --dump-json-metadata {shlex.quote(device)}")
    )
    binding = luks_binding(metadata)
    want = tuple(sorted(int(pcr) for pcr in variables["disk_encryption_tpm_pcrs"]))
    observe(
        tokens=list(binding.token_types),
        tpm2_pcrs=[list(pcrs) for pcrs in binding.tpm2_pcrs],
        keyslots=list(binding.keyslots),
    )
    assert binding.tpm2_pcrs == (want,), (
        f"want one systemd-tpm2 token bound to PCRs {list(want)}, "
        f"found {[list(pcrs) for pcrs in binding.tpm2_pcrs]}"
    )
    assert not binding.unaccounted, (
        f"keyslots {list(binding.unaccounted)} belong to no TPM2 or recovery token "
        "(a bootstrap passphrase left behind?)"
    )


def test_no_key_material_on_disk(
    node: Host,
    output: Callable[[str], str],
    sudo: str,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """No key file in crypttab or cryptsetup-keys.d, and no recovery key stored on the node"""
    _, name, mount = _volume(variables)
    entries = crypttab(output(f"{sudo}cat /etc/crypttab"))
    ours = [entry for entry in entries if entry.name == name]
    key_dir_file = f"/etc/cryptsetup-keys.d/{name}.key"
    key_dir_check = node.run(f"{sudo}test -e {shlex.quote(key_dir_file)}")
    search = node.run(
        f"{sudo}sh -c {shlex.quote(SEARCH_SCRIPT)} search {shlex.quote(mount)} "
        f"{shlex.quote(RECOVERY_KEY_PATTERN)} {' '.join(SEARCHED)}"
    )
    found = search.stdout.splitlines()
    observe(
        crypttab=[f"{e.name} {e.device} {e.key} {','.join(e.options)}" for e in entries],
        searched=list(SEARCHED),
        search_exit=search.rc,
        recovery_key_files=found,
    )
    assert key_dir_check.rc in (EXISTS, ABSENT), (
        f"cannot tell whether {key_dir_file} exists: `test -e` exited {key_dir_check.rc} "
        f"{key_dir_check.stderr.strip()}"
    )
    assert search.rc == 0, (
        f"the search for stored recovery keys did not cover every file: "
        f"{SEARCH_FAILED.get(search.rc, 'sh, sudo or ssh')} exited {search.rc}: "
        f"{search.stderr.strip()[-500:]}"
    )
    assert ours, f"/etc/crypttab has no entry for {name}"
    keyfiles = [entry.keyfile for entry in entries if entry.keyfile]
    assert not keyfiles, f"/etc/crypttab names key files: {keyfiles}"
    assert any(option.startswith("tpm2-device=") for option in ours[0].options), (
        f"/etc/crypttab does not unlock {name} with the TPM: {','.join(ours[0].options)}"
    )
    assert key_dir_check.rc == ABSENT, f"{key_dir_file} holds a key for {name}"
    assert not found, f"files holding a recovery key: {found}"


def test_canary_not_in_raw_partition(
    node: Host,
    output: Callable[[str], str],
    sudo: str,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """A string written through the mount is on disk, but not in the raw partition's bytes"""
    device, name, mount = _volume(variables)
    canary = f"sovereign-verify-canary-{secrets.token_hex(16)}"
    path = shlex.quote(f"{mount}/.sovereign-verify-{secrets.token_hex(4)}")
    try:
        output(f"printf %s {canary} | {sudo}tee {path} >/dev/null")
        output(f"{sudo}sh -c 'sync && echo 3 > /proc/sys/vm/drop_caches'")
        grep = f"{sudo}timeout {RAW_GREP_TIMEOUT_S} grep -c -a -F {canary}"
        mapped = node.run(f"{grep} /dev/mapper/{shlex.quote(name)}")
        raw = node.run(f"{grep} {shlex.quote(device)}")
    finally:
        node.run(f"{sudo}rm -f {path}")
    observe(
        canary_in_mapping=mapped.stdout.strip(),
        canary_in_raw_partition=raw.stdout.strip(),
        raw_exit=raw.rc,
    )
    # grep -c: exit 0 and a count when found, exit 1 and 0 when not, exit 2 on error.
    assert mapped.rc == 0, (
        f"the canary did not reach the disk through the mapping, which proves nothing: "
        f"{mapped.stderr.strip()}"
    )
    assert raw.rc != 2, f"cannot read the raw partition {device}: {raw.stderr.strip()}"
    assert raw.stdout.strip() == "0", (
        f"the canary is readable in the raw partition {device}: grep counted {raw.stdout.strip()}"
    )


def test_tpm_unlock(
    node: Host, sudo: str, variables: RoleVariables, observe: Callable[..., None]
) -> None:
    """The TPM unlocks the volume now; after a PCR change this is the check that fails"""
    device, _, _ = _volume(variables)
    result = node.run(
        f"{sudo}cryptsetup open --test-passphrase --token-only --token-type systemd-tpm2 "
        f"{shlex.quote(device)}"
    )
    observe(exit=result.rc, said=result.stderr.strip()[-500:])
    assert result.rc == 0, f"the TPM did not unlock {device}: {result.stderr.strip()}"
