"""Seal a secret to TPM 2.0 PCR values and unseal it again, through the tpm2-tools CLI.

Takes a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`), PCR indexes in
the sha256 bank and a secret of at most 128 bytes. Gives a `Sealed` blob to store (the public
and private halves of a sealed-data object under the owner hierarchy's ECC storage primary,
plus the PCR values its policy names) and, later, the secret back, or `errors.KeyUnavailable`
saying why not: no TPM, a PCR that changed, another TPM.

The secret goes in on stdin and comes back on stdout, and crosses the TPM's bus only encrypted,
in sessions salted with the primary key. The context files tpm2-tools insists on writing hold
only TPM-encrypted state; they live in a private temporary directory removed afterwards.
Without a resource manager (swtpm, /dev/tpm0) every tool leaves its objects loaded and the
TPM has only three slots, so each step flushes transient objects.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sovereign_gateway.memory.errors import KeyUnavailable

BANK = "sha256"
MAX_SECRET = 128  # TPM2B_SENSITIVE_DATA
TIMEOUT_S = 30
# The TCG's storage root key template, spelled out so a tpm2-tools upgrade that changes its
# defaults cannot change the primary key (the same seed and template give the same key).
_PRIMARY = [
    "-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb",
    "-a", "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
]  # fmt: skip
# No userwithauth: the PCR policy is the only way to unseal.
_SEALED_ATTRIBUTES = "fixedtpm|fixedparent"
_PCR_LINE = re.compile(r"^\s*(\d+)\s*:\s*0x([0-9A-Fa-f]{64})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Sealed:
    """What to store to unseal later; none of it reveals the secret."""

    public: bytes
    private: bytes
    pcrs: dict[int, bytes]  # index -> sha256 value the policy was computed over


def read_pcrs(tcti: str, pcrs: Sequence[int]) -> dict[int, bytes]:
    out = _run(tcti, ["tpm2_pcrread", _selection(pcrs)]).decode(errors="replace")
    values = {int(index): bytes.fromhex(value) for index, value in _PCR_LINE.findall(out)}
    if sorted(values) != sorted(pcrs):
        raise KeyUnavailable(f"the TPM at tcti {tcti} did not report {BANK} PCRs {list(pcrs)}")
    return values


def seal(tcti: str, pcrs: Sequence[int], secret: bytes) -> Sealed:
    """Seal `secret` to the current values of `pcrs` in the sha256 bank."""
    if not 0 < len(secret) <= MAX_SECRET:
        raise ValueError(f"secret: must be 1 to {MAX_SECRET} bytes")
    with _workdir() as work:
        primary, trial, enc = (str(work / n) for n in ("primary.ctx", "trial.ctx", "enc.ctx"))
        values = read_pcrs(tcti, pcrs)
        # The policy is computed over the values just read, so what is stored is what is enforced.
        (work / "pcrs.bin").write_bytes(b"".join(values[i] for i in sorted(values)))
        try:
            _run(tcti, ["tpm2_createprimary", "-Q", *_PRIMARY, "-c", primary])
            _flush(tcti)
            _run(tcti, ["tpm2_startauthsession", "-S", trial])
            _run(tcti, ["tpm2_policypcr", "-Q", "-S", trial, "-l", _selection(pcrs),
                        "-f", str(work / "pcrs.bin"), "-L", str(work / "policy")])  # fmt: skip
            _flush(tcti, trial)
            # A session salted with the primary key encrypts the secret on its way to the TPM.
            _run(tcti, ["tpm2_startauthsession", "--hmac-session", "-c", primary, "-S", enc])
            _flush(tcti)
            _run(tcti, ["tpm2_sessionconfig", enc, "--enable-decrypt"])
            _run(tcti, ["tpm2_create", "-Q", "-C", primary, "-g", "sha256",
                        "-a", _SEALED_ATTRIBUTES, "-L", str(work / "policy"), "-i-",
                        "-u", str(work / "sealed.pub"), "-r", str(work / "sealed.priv"),
                        "-S", enc], stdin=secret)  # fmt: skip
        finally:
            _flush(tcti, trial, enc)
        return Sealed(
            public=(work / "sealed.pub").read_bytes(),
            private=(work / "sealed.priv").read_bytes(),
            pcrs=values,
        )


def unseal(tcti: str, sealed: Sealed) -> bytes:
    """The secret in `sealed`, if this TPM made it and the PCRs still hold the sealed values."""
    pcrs = sorted(sealed.pcrs)
    with _workdir() as work:
        primary, obj, session = (str(work / n) for n in ("primary.ctx", "sealed.ctx", "s.ctx"))
        (work / "sealed.pub").write_bytes(sealed.public)
        (work / "sealed.priv").write_bytes(sealed.private)
        try:
            _run(tcti, ["tpm2_createprimary", "-Q", *_PRIMARY, "-c", primary])
            _flush(tcti)
            _run(tcti, ["tpm2_load", "-Q", "-C", primary, "-u", str(work / "sealed.pub"),
                        "-r", str(work / "sealed.priv"), "-c", obj])  # fmt: skip
            _flush(tcti)
            # Salted with the primary key, the policy session also encrypts the secret on its
            # way back from the TPM.
            _run(tcti, ["tpm2_startauthsession", "--policy-session", "-c", primary, "-S", session])
            _flush(tcti)
            _run(tcti, ["tpm2_sessionconfig", session, "--enable-encrypt"])
            _run(tcti, ["tpm2_policypcr", "-Q", "-S", session, "-l", _selection(pcrs)])
            return _run(tcti, ["tpm2_unseal", "-c", obj, "-p", f"session:{session}"])
        except _PolicyFailed:
            current = read_pcrs(tcti, pcrs)
            changed = [str(i) for i in pcrs if current[i] != sealed.pcrs[i]]
            names = ", ".join(changed)
            what = {0: "its PCRs no longer match", 1: f"PCR {names} no longer matches"}.get(
                len(changed), f"PCRs {names} no longer match"
            )
            raise KeyUnavailable(
                f"the TPM refused to unseal the memory key: {what} the sealing policy"
            ) from None
        finally:
            _flush(tcti, session)


class _PolicyFailed(Exception):
    pass


def _selection(pcrs: Sequence[int]) -> str:
    return f"{BANK}:{','.join(str(i) for i in sorted(pcrs))}"


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sovereign-tpm-") as name:  # mkdtemp: mode 0700
        yield Path(name)


def _flush(tcti: str, *sessions: str) -> None:
    """Best effort: a failure here must not hide the error that got us here."""
    for session in map(Path, sessions):
        if session.exists():
            with suppress(KeyUnavailable):
                _run(tcti, ["tpm2_flushcontext", str(session)])
            session.unlink()
    with suppress(KeyUnavailable):
        _run(tcti, ["tpm2_flushcontext", "-t"])


def _run(tcti: str, argv: list[str], stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(
            argv,
            input=stdin if stdin is not None else b"",
            capture_output=True,
            timeout=TIMEOUT_S,
            env={**os.environ, "TPM2TOOLS_TCTI": tcti},
            check=False,
        )
    except FileNotFoundError:
        raise KeyUnavailable(f"tpm2-tools is not installed: {argv[0]} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise KeyUnavailable(f"the TPM at tcti {tcti} did not answer in {TIMEOUT_S} s") from None
    if done.returncode == 0:
        return done.stdout
    err = done.stderr.decode(errors="replace")
    if "Could not load tcti" in err:
        reason = re.search(r"Failed to (.*)", err)
        detail = f": failed to {reason.group(1).strip()}" if reason else ""
        raise KeyUnavailable(f"no TPM at tcti {tcti}{detail}")
    if "policy check failed" in err:
        raise _PolicyFailed
    if "integrity check failed" in err:
        raise KeyUnavailable(
            "the TPM cannot load the sealed memory key: it was sealed by another TPM, "
            "or this TPM's owner hierarchy was cleared"
        )
    last = [line for line in err.splitlines() if line.startswith("ERROR")][-1:]
    raise KeyUnavailable(f"{argv[0]} failed at tcti {tcti}: {''.join(last) or err.strip()}")
