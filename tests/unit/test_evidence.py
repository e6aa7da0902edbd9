"""Evidence reports: signed over canonical JSON, written atomically, refused once changed.

`sovereign evidence verify` exits 0 for a valid report, 1 for a refused one, 2 for bad input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner, Result

from sovereign import evidence
from sovereign.cli import app
from sovereign.evidence import Check, EvidenceError, NodeIdentity, Report


def _report() -> Report:
    return Report(
        profile="air-gapped-ward",
        node=NodeIdentity(hostname="ward-7", machine_id="0" * 32, ak_sha256="a" * 64),
        image={"digest": "sha256:" + "b" * 64, "recipe_hash": "c" * 64},
        started="2026-01-02T03:04:05Z",
        finished="2026-01-02T03:05:06Z",
        checks=(
            Check(
                "attestation.quote_matches_golden_pcrs",
                "attestation",
                "The node's AK quotes the profile's PCRs",
                "passed",
                {"pcrs": [0, 2, 4, 7], "nonce": "ab" * 20},
                None,
                1.25,
            ),
            Check(
                "egress.only_allowlist_goes_out",
                "egress",
                "Nothing else goes out",
                "failed",
                {"openings": ["output#9 tcp to 10.0.2.101/32 port 80"]},
                "accepts traffic the profile does not allow: ünexpected",
                0.5,
            ),
            Check("sandbox.runsc", "sandbox", "runsc", "not_applicable", {}, "runtime is runc", 0),
        ),
    )


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signed_file(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "report.json"
    evidence.write_report(evidence.sign(_report(), key), path)
    return path


def test_a_signed_report_verifies_after_a_round_trip_through_its_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signed = evidence.sign(_report(), key)
    path = tmp_path / "report.json"
    evidence.write_report(signed, path)
    verified = evidence.verify(evidence.read_report(path), key.public_key())
    assert verified == signed
    assert verified.summary == {
        "total": 3,
        "passed": 1,
        "failed": 1,
        "error": 0,
        "not_applicable": 1,
    }
    assert not verified.passed
    data = json.loads(path.read_text())
    assert data["format"] == "sovereign-evidence/1"
    assert data["signature"]["alg"] == "Ed25519"
    assert data["checks"][0]["passed"] is True
    assert data["checks"][1]["outcome"] == "failed"


def test_the_signature_covers_the_canonical_json_without_the_signature() -> None:
    key = Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), key).to_json()
    unsigned = {name: value for name, value in data.items() if name != "signature"}
    expected = json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    assert evidence.canonical(data) == expected
    assert "ünexpected".encode() in expected
    key.public_key().verify(base64.b64decode(data["signature"]["value"]), expected)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert data["signature"]["key_id"] == hashlib.sha256(raw).hexdigest()


def _flip_passed(data: dict[str, Any]) -> None:
    data["checks"][1]["passed"] = True
    data["checks"][1]["outcome"] = "passed"


def _add_check(data: dict[str, Any]) -> None:
    data["checks"].append(dict(data["checks"][0], id="attestation.extra"))


def _drop_failed_check(data: dict[str, Any]) -> None:
    del data["checks"][1]
    data["summary"]["failed"] = 0


TAMPERING: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "changed passed": (_flip_passed, "signature does not match"),
    "added check": (_add_check, "signature does not match"),
    "removed failed check": (_drop_failed_check, "signature does not match"),
    "changed observation": (
        lambda data: data["checks"][0]["observed"].update(nonce="00" * 20),
        "signature does not match",
    ),
    "removed signature": (lambda data: data.pop("signature"), "report is not signed"),
    "swapped key id": (
        lambda data: data["signature"].update(key_id="f" * 64),
        "signed by an unknown key",
    ),
    "garbled signature": (
        lambda data: data["signature"].update(value="not base64!"),
        "signature value is not base64",
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_a_changed_report_is_refused_with_a_clear_message(case: str) -> None:
    key = Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), key).to_json()
    tamper, message = TAMPERING[case]
    tamper(data)
    with pytest.raises(EvidenceError, match=message):
        evidence.verify(data, key.public_key())


def test_a_report_signed_by_another_key_is_refused_naming_both_keys() -> None:
    ours, theirs = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), theirs).to_json()
    with pytest.raises(EvidenceError) as refused:
        evidence.verify(data, ours.public_key())
    assert evidence.key_id(theirs.public_key()) in str(refused.value)
    assert evidence.key_id(ours.public_key()) in str(refused.value)


def test_a_signed_report_whose_summary_contradicts_its_checks_is_malformed() -> None:
    key = Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), key).to_json()
    data["summary"]["passed"] = 3
    del data["signature"]
    value = key.sign(evidence.canonical(data))
    data["signature"] = {
        "alg": "Ed25519",
        "key_id": evidence.key_id(key.public_key()),
        "value": base64.b64encode(value).decode(),
    }
    with pytest.raises(EvidenceError, match="summary does not match its checks"):
        evidence.verify(data, key.public_key())


def test_a_rewritten_report_leaves_no_temporary_file_and_is_whole(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "out" / "report.json"
    evidence.write_report(evidence.sign(_report(), key), path)
    first = path.read_bytes()
    evidence.write_report(evidence.sign(_report(), Ed25519PrivateKey.generate()), path)
    assert path.read_bytes() != first
    assert [entry.name for entry in path.parent.iterdir()] == ["report.json"]
    assert json.loads(path.read_bytes())["format"] == "sovereign-evidence/1"


def test_the_signing_key_is_created_once_private_with_its_public_half_beside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = evidence.default_key_path()
    assert path == tmp_path / "config" / "sovereign" / "evidence" / "ed25519.pem"
    created = evidence.load_or_create_signing_key(path)
    again = evidence.load_or_create_signing_key(path)
    assert evidence.key_id(created.public_key()) == evidence.key_id(again.public_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    public = evidence.public_key_path(path)
    assert public == path.with_name("ed25519.pub")
    assert public.read_bytes() == _pem(created)
    assert evidence.key_id(evidence.load_trusted_key(public)) == evidence.key_id(
        created.public_key()
    )


def test_the_default_key_path_falls_back_to_dot_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert evidence.default_key_path() == tmp_path / ".config/sovereign/evidence/ed25519.pem"


def test_a_key_file_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("not a key\n")
    with pytest.raises(EvidenceError, match="signing key"):
        evidence.load_or_create_signing_key(path)
    with pytest.raises(EvidenceError, match="not a PEM public key"):
        evidence.load_trusted_key(path)


# `sovereign evidence verify`


def _cli(*args: object) -> Result:
    return CliRunner().invoke(app, ["evidence", "verify", *[str(arg) for arg in args]])


def _trusted(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "trusted.pub"
    path.write_bytes(_pem(key))
    return path


def test_cli_a_valid_report_exits_0_and_prints_its_checks(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    report = _signed_file(tmp_path, key)
    result = _cli(report, "--public-key", _trusted(tmp_path, key))
    assert result.exit_code == 0, result.output
    assert "valid, signed by key" in result.stdout
    assert "egress.only_allowlist_goes_out" in result.stdout
    assert "1 passed, 1 failed, 0 error, 1 not applicable" in result.stdout


def test_cli_uses_the_default_keys_public_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = evidence.load_or_create_signing_key(evidence.default_key_path())
    result = _cli(_signed_file(tmp_path, key))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", ["changed passed", "added check", "removed signature"])
def test_cli_a_tampered_report_exits_1_naming_why(tmp_path: Path, case: str) -> None:
    key = Ed25519PrivateKey.generate()
    path = _signed_file(tmp_path, key)
    data = json.loads(path.read_text())
    tamper, message = TAMPERING[case]
    tamper(data)
    path.write_text(json.dumps(data))
    result = _cli(path, "--public-key", _trusted(tmp_path, key))
    assert result.exit_code == 1
    assert f"{path}: refused: " in result.stdout
    assert message in result.stdout
    assert "Traceback" not in result.output


def test_cli_a_report_signed_by_an_unknown_key_exits_1(tmp_path: Path) -> None:
    path = _signed_file(tmp_path, Ed25519PrivateKey.generate())
    result = _cli(path, "--public-key", _trusted(tmp_path, Ed25519PrivateKey.generate()))
    assert result.exit_code == 1
    assert "signed by an unknown key" in result.stdout


def test_cli_a_file_that_is_not_json_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"format": "sovereign-evidence/1", ')
    key = Ed25519PrivateKey.generate()
    result = _cli(path, "--public-key", _trusted(tmp_path, key))
    assert result.exit_code == 1
    assert "malformed report" in result.stdout
    assert "Traceback" not in result.output


def test_cli_bad_input_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    report = _signed_file(tmp_path, key)
    missing = _cli(tmp_path / "nope.json", "--public-key", _trusted(tmp_path, key))
    assert missing.exit_code == 2
    assert "cannot read" in missing.stderr
    no_key = _cli(report, "--public-key", tmp_path / "nope.pub")
    assert no_key.exit_code == 2
    assert "nope.pub" in no_key.stderr
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    no_default = _cli(report)
    assert no_default.exit_code == 2
    assert "no trusted key" in no_default.stderr
    assert "--public-key" in no_default.stderr
    for result in (missing, no_key, no_default):
        assert "Traceback" not in result.output


# What is signed is what a reader of the file sees.


def _with_observed(observed: dict[Any, Any]) -> Report:
    report = _report()
    first = replace(report.checks[0], observed=observed)
    return replace(report, checks=(first, *report.checks[1:]))


@pytest.mark.parametrize(
    ("observed", "read_back"),
    [
        # Sorted as numbers, 7 comes before 10; as the strings a reader sees, after.
        ({"quoted": {10: "aa", 7: "bb"}}, {"quoted": {"10": "aa", "7": "bb"}}),
        ({"mixed": {1: "a", "b": "c", None: "d"}}, {"mixed": {"1": "a", "b": "c", "null": "d"}}),
        ({"pair": (1, 2)}, {"pair": [1, 2]}),
    ],
)
def test_a_report_is_signed_as_its_file_reads_back(
    tmp_path: Path, observed: dict[Any, Any], read_back: dict[str, Any]
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = evidence.sign(_with_observed(observed), key)
    assert signed.checks[0].observed == read_back
    path = tmp_path / "report.json"
    evidence.write_report(signed, path)
    verified = evidence.verify(evidence.read_report(path), key.public_key())
    assert verified == signed


def test_keys_that_become_one_in_json_cannot_be_signed() -> None:
    with pytest.raises(EvidenceError, match="duplicate key '1'"):
        evidence.sign(_with_observed({"x": {1: "a", "1": "b"}}), Ed25519PrivateKey.generate())


def _duplicate_top_level(text: str) -> str:
    return text.replace('"format": ', '"format": "other", "format": ', 1)


def _duplicate_in_a_check(text: str) -> str:
    return text.replace('"passed": false', '"passed": true, "passed": false', 1)


def _duplicate_in_signature(text: str) -> str:
    return text.replace('"alg": "Ed25519"', '"alg": "Ed25519", "alg": "Ed25519"', 1)


@pytest.mark.parametrize(
    "duplicate", [_duplicate_top_level, _duplicate_in_a_check, _duplicate_in_signature]
)
def test_a_file_that_gives_a_key_twice_is_refused(
    tmp_path: Path, duplicate: Callable[[str], str]
) -> None:
    key = Ed25519PrivateKey.generate()
    path = _signed_file(tmp_path, key)
    text = path.read_text()
    path.write_text(duplicate(text))
    assert path.read_text() != text
    with pytest.raises(EvidenceError, match="duplicate key"):
        evidence.read_report(path)
    result = _cli(path, "--public-key", _trusted(tmp_path, key))
    assert result.exit_code == 1
    assert "refused: malformed report" in result.stdout
    assert "duplicate key" in result.stdout
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "change",
    [
        lambda signature: signature.update(note="trust me"),
        lambda signature: signature.pop("alg"),
    ],
    ids=["extra field", "missing field"],
)
def test_a_signature_with_other_fields_is_refused(change: Callable[[dict[str, Any]], Any]) -> None:
    key = Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), key).to_json()
    change(data["signature"])
    with pytest.raises(EvidenceError, match="exactly the fields alg, key_id and value"):
        evidence.verify(data, key.public_key())


DEPTH = 100_000


def test_a_deeply_nested_file_is_refused_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"checks": ' + "[" * DEPTH + "]" * DEPTH + "}")
    with pytest.raises(EvidenceError, match="nests too deeply"):
        evidence.read_report(path)
    result = _cli(path, "--public-key", _trusted(tmp_path, Ed25519PrivateKey.generate()))
    assert result.exit_code == 1
    assert "nests too deeply" in result.stdout
    assert "Traceback" not in result.output


def test_a_deeply_nested_report_is_refused_not_crashed() -> None:
    key = Ed25519PrivateKey.generate()
    data = evidence.sign(_report(), key).to_json()
    nested: list[Any] = []
    for _ in range(DEPTH):
        nested = [nested]
    data["checks"][0]["observed"]["deep"] = nested
    with pytest.raises(EvidenceError, match="no canonical form"):
        evidence.verify(data, key.public_key())


@pytest.mark.parametrize("name", ["ed25519.pub", "keys/signing.pub"])
def test_a_signing_key_named_like_a_public_key_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(EvidenceError, match=r"ending in \.pub is for the public key"):
        evidence.load_or_create_signing_key(path)
    assert not path.exists()


def test_a_signing_key_that_links_to_its_public_half_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "signing.pem"
    link.symlink_to(tmp_path / "signing.pub")
    with pytest.raises(EvidenceError, match="is for the public key"):
        evidence.load_or_create_signing_key(link)
    assert not (tmp_path / "signing.pub").exists()


def test_a_report_where_nothing_was_checked_does_not_pass() -> None:
    report = _report()
    skipped = tuple(replace(check, outcome="not_applicable") for check in report.checks)
    assert not replace(report, checks=skipped).passed
    assert not replace(report, checks=()).passed
    assert replace(report, checks=(report.checks[0], *skipped)).passed
