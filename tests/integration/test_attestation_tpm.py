"""`verify_quote` against quotes from swtpm, a real TPM 2.0: a good quote passes; a stale
nonce, a changed golden PCR, a tampered signature or PCR file, another AK, an ak.name that
is not the AK's, or a signing key that is not a restricted attestation key fails."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sovereign.attestation import AttestationError, ak_sha256, verify_quote
from tests.integration.swtpm import MISSING, Swtpm, swtpm

TOOLS_MISSING = MISSING + [
    tool for tool in ("tpm2_checkquote", "tpm2_print") if shutil.which(tool) is None
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(TOOLS_MISSING), reason=f"{' and '.join(TOOLS_MISSING)} not on PATH"),
]

PCRS = [0, 2, 4, 7]
SELECTION = "sha256:" + ",".join(map(str, PCRS))


@dataclass(frozen=True)
class Quoted:
    """What the node's sovereign-quote prints, plus what provisioning exported."""

    quote: dict[str, Any]
    nonce: bytes
    ak_pem: Path
    ak_name: Path
    golden: dict[str, dict[str, str]]
    tpm: Swtpm
    work: Path


def _create_ak(tpm: Swtpm, work: Path, algorithm: str, name: str) -> Path:
    """EK and AK as the tpm_attestation role makes them; gives the AK's public PEM."""
    scheme = {"rsa": "rsassa", "ecc": "ecdsa"}[algorithm]
    tpm.tpm2("tpm2_createek", "-c", str(work / "ek.ctx"), "-G", "rsa", "-u", str(work / "ek.pub"))
    tpm.tpm2("tpm2_flushcontext", "-t")
    pem = work / f"{name}.pub.pem"
    tpm.tpm2(
        "tpm2_createak",
        "-C", str(work / "ek.ctx"),
        "-c", str(work / f"{name}.ctx"),
        "-G", algorithm, "-g", "sha256", "-s", scheme,
        "-u", str(pem), "-f", "pem", "-n", str(work / f"{name}.name"),
    )  # fmt: skip
    tpm.tpm2("tpm2_flushcontext", "-t")
    return pem


def _quote(tpm: Swtpm, work: Path, nonce: bytes, ak: str = "ak") -> dict[str, Any]:
    files = {name: work / f"quote.{name}" for name in ("message", "signature", "pcr_values")}
    tpm.tpm2(
        "tpm2_quote",
        "-c", str(work / f"{ak}.ctx"),
        "-l", SELECTION,
        "-q", nonce.hex(),
        "-m", str(files["message"]),
        "-s", str(files["signature"]),
        "-o", str(files["pcr_values"]),
        "-g", "sha256",
    )  # fmt: skip
    tpm.tpm2("tpm2_flushcontext", "-t")
    quote: dict[str, Any] = {
        name: base64.b64encode(path.read_bytes()).decode() for name, path in files.items()
    }
    quote["pcrs"] = SELECTION
    quote["ak_name"] = (work / f"{ak}.name").read_bytes().hex()
    return quote


def _golden(tpm: Swtpm) -> dict[str, dict[str, str]]:
    """golden-pcrs.json as provisioning writes it, read with tpm2_pcrread."""
    values = re.findall(
        r"^\s+(\d+)\s*:\s*0x([0-9A-F]+)$", tpm.tpm2("tpm2_pcrread", SELECTION), re.M
    )
    return {"sha256": {index: value.lower() for index, value in values}}


@pytest.fixture(params=["rsa", "ecc"])
def quoted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Quoted]:
    with swtpm(tmp_path / "tpm-state", tmp_path / "swtpm.log") as tpm:
        # Non-trivial values: measured boot would have extended these.
        tpm.extend(4)
        tpm.extend(7, "7" * 64)
        ak_pem = _create_ak(tpm, tmp_path, request.param, "ak")
        golden = _golden(tpm)
        nonce = secrets.token_bytes(20)
        quote = _quote(tpm, tmp_path, nonce)
        yield Quoted(quote, nonce, ak_pem, tmp_path / "ak.name", golden, tpm, tmp_path)


def test_a_fresh_quote_of_golden_pcrs_verifies(quoted: Quoted) -> None:
    result = verify_quote(
        quoted.quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, PCRS
    )
    assert result.ok, result.reason
    assert result.reason is None
    assert sorted(result.quoted) == PCRS
    assert result.quoted[4] == quoted.golden["sha256"]["4"]
    assert result.quoted[4] != "0" * 64
    assert len(ak_sha256(quoted.ak_pem)) == 64


def test_a_quote_over_another_nonce_is_stale(quoted: Quoted) -> None:
    stale = secrets.token_bytes(20)
    result = verify_quote(quoted.quote, quoted.ak_pem, quoted.ak_name, stale, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason is not None
    assert "stale or mismatched nonce" in result.reason


def test_a_changed_golden_pcr_is_named_with_both_values(quoted: Quoted) -> None:
    golden = {"sha256": dict(quoted.golden["sha256"], **{"7": "ab" * 32})}
    result = verify_quote(quoted.quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, golden, PCRS)
    assert not result.ok
    assert result.mismatched == (7,)
    assert result.reason == (
        f"PCR 7 differs: expected {'ab' * 32}, quoted {quoted.golden['sha256']['7']}"
    )


def test_a_pcr_extended_after_provisioning_fails(quoted: Quoted) -> None:
    quoted.tpm.extend(7)
    nonce = secrets.token_bytes(20)
    quote = _quote(quoted.tpm, quoted.work, nonce)
    result = verify_quote(quote, quoted.ak_pem, quoted.ak_name, nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.mismatched == (7,)
    assert result.reason is not None
    assert result.reason.startswith("PCR 7 differs: expected ")


def _flip(encoded: str, offset: int) -> str:
    data = bytearray(base64.b64decode(encoded))
    data[offset] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


def test_a_tampered_signature_fails(quoted: Quoted) -> None:
    quote = dict(quoted.quote, signature=_flip(quoted.quote["signature"], -3))
    result = verify_quote(quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason is not None
    assert "bad signature" in result.reason


def test_pcr_values_that_do_not_match_the_signed_digest_fail(quoted: Quoted) -> None:
    # The PCR file holds each value raw; change one byte inside PCR 4's.
    pcr_values = base64.b64decode(quoted.quote["pcr_values"])
    value = bytes.fromhex(quoted.golden["sha256"]["4"])
    offset = pcr_values.index(value) + 5
    quote = dict(quoted.quote, pcr_values=_flip(quoted.quote["pcr_values"], offset))
    result = verify_quote(quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason is not None
    assert "do not match the digest the quote signed" in result.reason


def test_a_quote_by_another_ak_fails(quoted: Quoted) -> None:
    other = _create_ak(quoted.tpm, quoted.work, "rsa", "other")
    result = verify_quote(
        quoted.quote, other, quoted.work / "other.name", quoted.nonce, quoted.golden, PCRS
    )
    assert not result.ok
    assert result.reason is not None
    assert "bad signature" in result.reason


def test_a_quote_of_fewer_pcrs_than_the_profile_asks_fails(quoted: Quoted) -> None:
    result = verify_quote(
        quoted.quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, [*PCRS, 8]
    )
    assert not result.ok
    assert (
        result.reason == "the quote covers PCRs [0, 2, 4, 7], the profile asks for [0, 2, 4, 7, 8]"
    )


def test_a_malformed_quote_is_refused_not_crashed(quoted: Quoted) -> None:
    quote = dict(quoted.quote, message="%%%")
    result = verify_quote(quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason is not None
    assert result.reason.startswith("malformed quote")


def test_an_exported_ak_name_of_another_key_fails(quoted: Quoted) -> None:
    _create_ak(quoted.tpm, quoted.work, "rsa", "other")
    other_name = quoted.work / "other.name"
    result = verify_quote(
        quoted.quote, quoted.ak_pem, other_name, quoted.nonce, quoted.golden, PCRS
    )
    assert not result.ok
    assert result.reason == (
        f"the quote's ak_name {quoted.quote['ak_name']!r} is not the exported other.name "
        f"{other_name.read_bytes().hex()}: the node quoted with another key"
    )


def test_a_quote_that_names_another_ak_fails(quoted: Quoted) -> None:
    _create_ak(quoted.tpm, quoted.work, "ecc", "other")
    quote = dict(quoted.quote, ak_name=(quoted.work / "other.name").read_bytes().hex())
    result = verify_quote(quote, quoted.ak_pem, quoted.ak_name, quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason is not None
    assert "is not the exported ak.name" in result.reason


def test_an_ak_name_that_is_not_the_pems_key_fails(quoted: Quoted) -> None:
    _create_ak(quoted.tpm, quoted.work, "rsa", "other")
    other_name = quoted.work / "other.name"
    quote = dict(quoted.quote, ak_name=other_name.read_bytes().hex())
    result = verify_quote(quote, quoted.ak_pem, other_name, quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason == (
        "other.name is not the TPM name of the key in ak.pub.pem as a signing key without an "
        "auth policy: the exported AK files do not belong together"
    )


def test_a_signing_key_that_is_not_restricted_is_no_ak(quoted: Quoted) -> None:
    """A key the TPM signs anything with could sign a quote-shaped message it never made."""
    work = quoted.work
    tpm = quoted.tpm
    tpm.tpm2("tpm2_createprimary", "-C", "o", "-c", str(work / "primary.ctx"))
    tpm.tpm2("tpm2_flushcontext", "-t")
    tpm.tpm2(
        "tpm2_create",
        "-C", str(work / "primary.ctx"),
        "-G", "rsa2048:rsassa-sha256:null",
        "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        "-u", str(work / "plain.pub"), "-r", str(work / "plain.priv"),
    )  # fmt: skip
    tpm.tpm2("tpm2_flushcontext", "-t")
    tpm.tpm2(
        "tpm2_load",
        "-C", str(work / "primary.ctx"),
        "-u", str(work / "plain.pub"), "-r", str(work / "plain.priv"),
        "-c", str(work / "plain.ctx"), "-n", str(work / "plain.name"),
    )  # fmt: skip
    tpm.tpm2("tpm2_flushcontext", "-t")
    pem = work / "plain.pub.pem"
    tpm.tpm2("tpm2_readpublic", "-c", str(work / "plain.ctx"), "-f", "pem", "-o", str(pem))
    tpm.tpm2("tpm2_flushcontext", "-t")
    quote = _quote(tpm, work, quoted.nonce, ak="plain")
    result = verify_quote(quote, pem, work / "plain.name", quoted.nonce, quoted.golden, PCRS)
    assert not result.ok
    assert result.reason == (
        "the AK is not restricted (it has fixedtpm|fixedparent|sensitivedataorigin|"
        "userwithauth|sign): only a restricted, fixedTPM signing key proves that the TPM "
        "made what it signs"
    )


def test_a_missing_ak_name_file_cannot_be_checked(quoted: Quoted) -> None:
    with pytest.raises(AttestationError, match=r"ak\.name does not exist"):
        verify_quote(
            quoted.quote, quoted.ak_pem, quoted.work / "gone" / "ak.name", quoted.nonce,
            quoted.golden, PCRS,
        )  # fmt: skip
