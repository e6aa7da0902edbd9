"""The node image, end to end: build the air-gapped profile's image (cached by recipe hash),
boot it under QEMU with a fresh swtpm and OVMF, run its first-boot roles, verify it, and
check the negative controls, each of which must fail exactly the checks it targets.

The profile is the example air-gapped one, pointed at the VM's loopback world: its local
mirror is the allowed canary (10.0.2.100:80) and its admin network is QEMU's user network.
Every boot gets a new TPM, so provisioning, attestation and the PCR-bound unlock all run
against a TPM that has never seen this image.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.node_profile import loopback_profile
from sovereign.evidence import Report
from sovereign.image.node import BuiltImage, booted, first_boot, read_image, verify_context
from sovereign.verify import run_verify

SOVEREIGN = str(Path(sys.executable).with_name("sovereign"))
# A key kept between runs: it is part of the image, so a new one per run would defeat the cache.
KEY_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sovereign/node-test"
ALL_SUITES = {"attestation", "egress", "encryption", "sandbox", "baseline"}
# A cold build is minutes, and every boot runs under TCG: boot, first-boot roles and the
# suites take several minutes per node on these machines (figures in docs/benchmarks.md).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def operator_key() -> Path:
    key = KEY_DIR / "id_ed25519"
    if not key.is_file():
        KEY_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "node-test", "-f", str(key)],
            check=True,
        )
    return key


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory, operator_key: Path) -> Path:
    return loopback_profile(
        "ward-ci", operator_key.with_suffix(".pub"), tmp_path_factory.mktemp("profile")
    )


def sovereign(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SOVEREIGN, *argv], capture_output=True, text=True, check=False)


def build(profile: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    done = sovereign("image", "build", str(profile), "--out", str(out), *options)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, profile: Path) -> BuiltImage:
    out = tmp_path_factory.mktemp("image") / "ward-ci"
    build(profile, out)
    return read_image(out)


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    return tmp_path / "evidence" / "ed25519.pem"


def failed(report: Report) -> dict[str, str]:
    return {f"{c.suite}.{c.id}" if "." not in c.id else c.id: c.outcome for c in report.checks
            if c.outcome in ("failed", "error")}  # fmt: skip


def describe(report: Report) -> str:
    return "\n".join(
        f"{c.id}: {c.outcome}: {c.detail} {json.dumps(c.observed)[:400]}"
        for c in report.checks
        if c.outcome != "passed"
    )


def test_the_manifest_records_digest_recipe_packages_and_archive_date(image: BuiltImage) -> None:
    manifest = image.manifest
    digest = hashlib.sha256(image.disk.read_bytes()).hexdigest()
    packages = {p["name"]: p["version"] for p in manifest["packages"]}

    assert manifest["image"]["sha256"] == digest
    assert len(manifest["recipe_hash"]) == 64
    assert {"linux-image-cloud-amd64", "systemd", "nftables", "runsc", "cryptsetup"} <= set(
        packages
    )
    assert all(packages.values())
    assert set(manifest["debian"]["archive_dates"]) >= {"deb.debian.org_debian_dists_bookworm"}
    assert [p["label"] for p in manifest["partitions"]] == [
        "esp",
        "sovereign-root",
        "sovereign-data",
    ]
    assert manifest["roles"]["applied"] == [
        "base_hardening", "egress_lockdown", "sandbox_runtime", "gateway_node"
    ]  # fmt: skip
    assert manifest["roles"]["at_first_boot"] == ["disk_encryption", "tpm_attestation"]
    # The build applied the roles twice; the second run must have changed nothing.
    assert manifest["roles"]["second_run"]["changed"] == 0
    assert manifest["roles"]["second_run"]["ok"] > 0
    assert (image.directory / "vmlinuz").is_file()
    assert (image.directory / "initrd.img").is_file()


def test_a_second_build_of_the_same_recipe_comes_from_the_cache(
    image: BuiltImage, profile: Path, tmp_path: Path
) -> None:
    done = build(profile, tmp_path / "again", "--qcow2")
    again = read_image(tmp_path / "again")

    assert "from the cache" in done.stdout
    assert again.manifest["image"]["sha256"] == image.manifest["image"]["sha256"]
    assert again.manifest["qcow2"]["file"] == "disk.qcow2"
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(tmp_path / "again/disk.qcow2")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(info.stdout)["format"] == "qcow2"


@pytest.fixture
def node_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "boot"
    yield state
    console = state / "console.log"
    if console.is_file():  # kept in the test's tmp dir; printed only when a test fails
        print(console.read_text(errors="replace")[-4000:])


def test_the_node_verifies_and_a_pcr_change_fails_exactly_unlock_and_attestation(
    image: BuiltImage,
    profile: Path,
    operator_key: Path,
    node_state: Path,
    signing_key: Path,
    tmp_path: Path,
) -> None:
    with booted(image, node_state, operator_key, provision=False) as (node, _):
        first = first_boot(node, image)
        exported = node_state / "exports" / image.manifest["node"]
        recovery = (exported / "recovery.key").read_bytes()
        again = first_boot(node, image, "second-run")

        report = run_verify(verify_context(node, image, profile), tmp_path / "r1.json", signing_key)

        assert first.changed > 0
        assert again.changed == 0, f"the first-boot roles changed things again: {again.log}"
        assert (exported / "recovery.key").read_bytes() == recovery  # written once
        assert (exported / "recovery.key").stat().st_mode & 0o077 == 0
        assert {p.name for p in exported.iterdir()} >= {
            "ak.pub.pem", "ak.name", "ek.crt", "golden-pcrs.json", "recovery.key"
        }  # fmt: skip
        assert report.passed, describe(report)
        assert {check.suite for check in report.checks} == ALL_SUITES
        assert all(check.outcome == "passed" for check in report.checks), describe(report)
        assert report.image == {
            "digest": f"sha256:{image.manifest['image']['sha256']}",
            "recipe_hash": image.manifest["recipe_hash"],
        }

        # Negative control: a PCR the data volume is bound to moves after enrolment.
        extended = node.ssh("sudo tpm2_pcrextend 7:sha256=" + "ab" * 32)
        assert extended.returncode == 0, extended.stderr
        after = run_verify(verify_context(node, image, profile), tmp_path / "r2.json", signing_key)

    assert set(failed(after)) == {
        "encryption.tpm_unlock",
        "attestation.quote_matches_golden_pcrs",
    }, describe(after)

    valid = sovereign("evidence", "verify", str(tmp_path / "r1.json"),
                      "--public-key", str(signing_key.with_suffix(".pub")))  # fmt: skip
    assert valid.returncode == 0, valid.stderr

    # Negative control: a report edited after signing is refused.
    tampered = json.loads((tmp_path / "r2.json").read_text())
    for check in tampered["checks"]:
        check["passed"] = True
        check["outcome"] = "passed"
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    refused = sovereign("evidence", "verify", str(tmp_path / "tampered.json"),
                        "--public-key", str(signing_key.with_suffix(".pub")))  # fmt: skip
    assert refused.returncode == 1
    assert "signature" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr


def test_an_image_without_egress_lockdown_fails_only_the_egress_checks(
    image: BuiltImage, profile: Path, operator_key: Path, tmp_path: Path
) -> None:
    out = tmp_path / "open"
    build(profile, out, "--without-role", "egress_lockdown")
    assert read_image(out).manifest["roles"]["disabled"] == ["egress_lockdown"]
    report_path = tmp_path / "open.json"

    done = sovereign(
        "verify", str(profile), "--image", str(out), "--identity", str(operator_key),
        "--out", str(report_path), "--signing-key", str(tmp_path / "k.pem"),
    )  # fmt: skip

    assert done.returncode == 1, done.stderr
    report = json.loads(report_path.read_text())
    bad = {c["id"] for c in report["checks"] if c["outcome"] in ("failed", "error")}
    assert "egress.blocked_canary_receives_nothing" in bad
    assert {check_id.split(".")[0] for check_id in bad} == {"egress"}, done.stdout
    assert "egress.allowed_canary_is_reached" not in bad  # the positive control still holds
