"""The operator's side of remote attestation: check a node's TPM quote against what it trusts.

Takes the quote JSON that `sovereign-quote` prints on the node, the exported AK (its PEM
public key and its TPM name), the fresh nonce and golden-pcrs.json; gives a `QuoteResult`
that names what did not match. tpm2_checkquote checks the signature, the nonce and the PCR
digest; this module then checks that the AK is one the TPM holds as an attestation key
and compares each quoted PCR with its golden value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

BANK = "sha256"
TOOL_TIMEOUT_S = 30
# tpm2_checkquote's stderr lines (tpm2-tools 5.x), most specific first.
_REFUSALS = (
    ("Error validating nonce", "stale or mismatched nonce: the quote is not over this nonce"),
    (
        "PCR values failed to match",
        "the PCR values do not match the digest the quote signed (pcr_values altered?)",
    ),
    ("Error validating signed message", "bad signature: the exported AK did not sign this quote"),
)
_PCR_LINE = re.compile(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$")

# TPMA_OBJECT bits (TPM 2.0 part 2, 8.3) a signing key's public area may carry.
ATTRIBUTES = {
    "fixedtpm": 1 << 1,
    "fixedparent": 1 << 4,
    "sensitivedataorigin": 1 << 5,
    "userwithauth": 1 << 6,
    "adminwithpolicy": 1 << 7,
    "noda": 1 << 10,
    "restricted": 1 << 16,
    "decrypt": 1 << 17,
    "sign": 1 << 18,
}
# An AK signs only what the TPM made (restricted), signs (sign) and never leaves it (fixedtpm).
REQUIRED_ATTRIBUTES = ("restricted", "sign", "fixedtpm")
_CREATEAK_ATTRIBUTES = 0x00050072  # what tpm2_createak gives: the one to try first
_ATTRIBUTE_SETS = sorted(
    (
        sum(bit for index, bit in enumerate(ATTRIBUTES.values()) if mask >> index & 1)
        for mask in range(1 << len(ATTRIBUTES))
    ),
    key=lambda attributes: attributes != _CREATEAK_ATTRIBUTES,
)
# TPM_ALG_ID values.
_HASHES = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
_ALG_RSA, _ALG_ECC, _ALG_NULL = 0x0001, 0x0023, 0x0010
_RSA_SCHEMES = (0x0014, 0x0016)  # rsassa, rsapss
_ECC_SCHEMES = (0x0018, 0x001C)  # ecdsa, ecschnorr
_CURVES = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}
_RSA_DEFAULT_EXPONENT = 65537


class AttestationError(Exception):
    """The check could not run (tool missing, unusable AK file); not a verdict on the quote."""


@dataclass(frozen=True)
class QuoteResult:
    ok: bool
    reason: str | None = None
    quoted: dict[int, str] = field(default_factory=dict)  # PCR -> lowercase hex, as signed
    mismatched: tuple[int, ...] = ()


def _load_public_key(ak_public_pem: Path) -> PublicKeyTypes:
    try:
        return serialization.load_pem_public_key(ak_public_pem.read_bytes())
    except OSError as error:
        raise AttestationError(f"cannot read {ak_public_pem}: {error.strerror}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise AttestationError(f"{ak_public_pem} is not a PEM public key") from None


def ak_sha256(ak_public_pem: Path) -> str:
    """The AK's fingerprint: sha256 of its DER SubjectPublicKeyInfo (PEM whitespace aside)."""
    key = _load_public_key(ak_public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def verify_quote(
    quote: dict[str, Any],
    ak_public_pem: Path,
    ak_name: Path,
    nonce: bytes,
    golden: dict[str, Any],
    pcrs: list[int],
) -> QuoteResult:
    """Is `quote` signed by the AK, over `nonce`, covering `pcrs` with their golden values?

    The AK must also be an attestation key: the quote's "ak_name" must be the exported name
    (`ak_name`, the binary TPM name), and that name must be the one of a restricted,
    fixedTPM signing key whose public key is `ak_public_pem`. Provisioning exports the PEM
    and the name, not the TPM public area, so the area is rebuilt from the PEM for each
    attribute set and each signing scheme a TPM key of that type can have (no auth policy,
    as tpm2_createak makes it); the name is a digest of the whole area, so the one that
    gives the exported name tells the key's attributes. A key with an auth policy, or a
    scheme not tried here, finds no match and is refused rather than guessed at.
    """
    if shutil.which("tpm2_checkquote") is None or shutil.which("tpm2_print") is None:
        raise AttestationError("tpm2_checkquote and tpm2_print (tpm2-tools) are not on PATH")
    for path in (ak_public_pem, ak_name):
        if not path.is_file():
            raise AttestationError(f"the exported AK file {path} does not exist")
    try:
        parts = {
            name: base64.b64decode(quote[name], validate=True)
            for name in ("message", "signature", "pcr_values")
        }
    except (KeyError, TypeError, binascii.Error, ValueError) as error:
        return QuoteResult(
            False, f"malformed quote: message, signature and pcr_values must be base64 ({error})"
        )
    with tempfile.TemporaryDirectory(prefix="sovereign-quote-") as work:
        files = {name: Path(work) / name for name in parts}
        for name, data in parts.items():
            files[name].write_bytes(data)
        checked = _run(
            "tpm2_checkquote",
            "-u", str(ak_public_pem),
            "-m", str(files["message"]),
            "-s", str(files["signature"]),
            "-f", str(files["pcr_values"]),
            "-g", BANK,
            "-q", nonce.hex(),
        )  # fmt: skip
        if checked.returncode != 0:
            return QuoteResult(False, _refusal(checked.stderr))
        selected = _selected_pcrs(_run("tpm2_print", "-t", "TPMS_ATTEST", str(files["message"])))
    refusal = _ak_refusal(quote.get("ak_name"), ak_public_pem, ak_name)
    if refusal is not None:
        return QuoteResult(False, refusal)
    quoted = _quoted_pcrs(checked.stdout)
    if selected != sorted(quoted):
        return QuoteResult(
            False, f"the quote signs PCRs {selected}, its PCR values are for {sorted(quoted)}"
        )
    if selected != sorted(pcrs):
        return QuoteResult(
            False, f"the quote covers PCRs {selected}, the profile asks for {sorted(pcrs)}", quoted
        )
    return compare_golden(quoted, golden, pcrs)


def _ak_refusal(claimed: Any, ak_public_pem: Path, ak_name: Path) -> str | None:
    """Why the AK is not the exported attestation key, or None when it is."""
    try:
        exported = ak_name.read_bytes()
    except OSError as error:
        raise AttestationError(f"cannot read {ak_name}: {error.strerror}") from None
    try:
        matches = isinstance(claimed, str) and bytes.fromhex(claimed) == exported
    except ValueError:
        matches = False
    if not matches:
        return (
            f"the quote's ak_name {claimed!r} is not the exported {ak_name.name} "
            f"{exported.hex()}: the node quoted with another key"
        )
    attributes = ak_attributes(ak_public_pem, exported)
    if attributes is None:
        return (
            f"{ak_name.name} is not the TPM name of the key in {ak_public_pem.name} as a "
            "signing key without an auth policy: the exported AK files do not belong together"
        )
    missing = [name for name in REQUIRED_ATTRIBUTES if not attributes & ATTRIBUTES[name]]
    if missing:
        return (
            f"the AK is not {', '.join(missing)} (it has {attribute_names(attributes)}): "
            "only a restricted, fixedTPM signing key proves that the TPM made what it signs"
        )
    return None


def attribute_names(attributes: int) -> str:
    return "|".join(name for name, bit in ATTRIBUTES.items() if attributes & bit) or "none"


def ak_attributes(ak_public_pem: Path, name: bytes) -> int | None:
    """The TPMA_OBJECT of the key named `name` whose public key is in `ak_public_pem`;
    None when no public area rebuilt for that key has that name."""
    algorithm = _HASHES.get(int.from_bytes(name[:2], "big"))
    if algorithm is None or len(name) != 2 + hashlib.new(algorithm).digest_size:
        return None
    for head, tail in _public_areas(_load_public_key(ak_public_pem), name[:2]):
        for attributes in _ATTRIBUTE_SETS:
            area = head + attributes.to_bytes(4, "big") + tail
            if hashlib.new(algorithm, area).digest() == name[2:]:
                return attributes
    return None


def _public_areas(key: PublicKeyTypes, name_alg: bytes) -> Iterator[tuple[bytes, bytes]]:
    """TPMT_PUBLIC for `key` around its objectAttributes: (type, nameAlg) and
    (empty authPolicy, parameters, unique), for each scheme a signing key may have."""
    no_policy = _u16(0)
    schemes = [_u16(_ALG_NULL)] + [
        _u16(scheme) + _u16(digest)
        for scheme in (_RSA_SCHEMES if isinstance(key, rsa.RSAPublicKey) else _ECC_SCHEMES)
        for digest in _HASHES
    ]
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        modulus = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
        # A template's exponent 0 means the default, 65537; the TPM keeps the 0.
        exponents = {numbers.e, 0} if numbers.e == _RSA_DEFAULT_EXPONENT else {numbers.e}
        for scheme in schemes:
            for exponent in sorted(exponents):
                parameters = _u16(_ALG_NULL) + scheme + _u16(key.key_size)
                parameters += exponent.to_bytes(4, "big")
                yield _u16(_ALG_RSA) + name_alg, no_policy + parameters + _sized(modulus)
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        size = (key.curve.key_size + 7) // 8
        point = key.public_numbers()
        unique = _sized(point.x.to_bytes(size, "big")) + _sized(point.y.to_bytes(size, "big"))
        for scheme in schemes:
            parameters = _u16(_ALG_NULL) + scheme + _u16(_CURVES[key.curve.name])
            parameters += _u16(_ALG_NULL)  # kdf
            yield _u16(_ALG_ECC) + name_alg, no_policy + parameters + unique


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def _sized(data: bytes) -> bytes:
    return _u16(len(data)) + data


def compare_golden(quoted: dict[int, str], golden: dict[str, Any], pcrs: list[int]) -> QuoteResult:
    expected = golden.get(BANK) if isinstance(golden, dict) else None
    if not isinstance(expected, dict):
        return QuoteResult(False, f"golden PCRs have no {BANK} bank", quoted)
    problems = []
    mismatched = []
    for pcr in sorted(pcrs):
        want = expected.get(str(pcr))
        if not isinstance(want, str):
            problems.append(f"golden PCRs have no {BANK} value for PCR {pcr}")
            mismatched.append(pcr)
        elif want.lower().removeprefix("0x") != quoted[pcr]:
            problems.append(f"PCR {pcr} differs: expected {want.lower()}, quoted {quoted[pcr]}")
            mismatched.append(pcr)
    if problems:
        return QuoteResult(False, "; ".join(problems), quoted, tuple(mismatched))
    return QuoteResult(True, None, quoted)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise AttestationError(f"{argv[0]} did not finish in {TOOL_TIMEOUT_S} s") from None


def _refusal(stderr: str) -> str:
    for marker, reason in _REFUSALS:
        if marker in stderr:
            return reason
    lines = [line.removeprefix("ERROR: ") for line in stderr.splitlines() if line.strip()]
    return "tpm2_checkquote refused the quote: " + ("; ".join(lines) or "no reason given")


def _quoted_pcrs(stdout: str) -> dict[int, str]:
    """The `pcrs: sha256:` block tpm2_checkquote prints once the digest matched."""
    values: dict[int, str] = {}
    bank = None
    for line in stdout.splitlines():
        if not line.startswith("    ") and line.strip().endswith(":"):
            bank = line.strip().removesuffix(":")
        elif bank == BANK and (match := _PCR_LINE.match(line)):
            values[int(match[1])] = match[2].lower()
    return values


def _selected_pcrs(printed: subprocess.CompletedProcess[str]) -> list[int]:
    """The sha256 PCR selection inside the signed TPMS_ATTEST, from tpm2_print's output."""
    if printed.returncode != 0:
        raise AttestationError(f"tpm2_print cannot read the quote: {printed.stderr.strip()}")
    selected: list[int] = []
    bank = None
    for line in printed.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "hash":
            bank = value.split("(")[-1].rstrip(")").strip()
        elif key == "pcrSelect" and bank == BANK:
            bitmap = bytes.fromhex(value.strip())
            selected += [
                8 * index + bit
                for index, byte in enumerate(bitmap)
                for bit in range(8)
                if byte & (1 << bit)
            ]
    return sorted(selected)
