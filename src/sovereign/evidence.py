"""Signed evidence reports: what `sovereign verify` checked on a node and what it saw.

Takes checks and the operator's Ed25519 key; gives a report signed over its canonical JSON,
written atomically, and `verify`, which refuses any report that changed after signing.
A report is signed as a reader of its file will see it (through a JSON round trip), and a
file with a key given twice is refused: two readers could take different values from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sovereign_gateway.contract import (
    KeyFileError,
    load_or_create_private_key,
    load_public_key,
    write_atomic,
)

FORMAT = "sovereign-evidence/1"
ALGORITHM = "Ed25519"
KEY_FILE = "ed25519.pem"
PUBLIC_SUFFIX = ".pub"
SIGNATURE_FIELDS = frozenset({"alg", "key_id", "value"})

Outcome = Literal["passed", "failed", "error", "not_applicable"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


class EvidenceError(Exception):
    """A report or key that cannot be trusted or used; the message says why."""


@dataclass(frozen=True)
class Check:
    id: str
    suite: str
    title: str
    outcome: Outcome
    observed: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None
    time: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "suite": self.suite,
            "title": self.title,
            "passed": self.passed,
            "outcome": self.outcome,
            "observed": self.observed,
            "detail": self.detail,
            "time": round(self.time, 3),
        }


@dataclass(frozen=True)
class NodeIdentity:
    hostname: str
    machine_id: str
    ak_sha256: str | None  # None when the node has no attestation key (no TPM)


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: str
    alg: str = ALGORITHM


@dataclass(frozen=True)
class Report:
    profile: str
    node: NodeIdentity
    image: dict[str, Any] | None
    started: str
    finished: str
    checks: tuple[Check, ...]
    signature: Signature | None = None

    @property
    def summary(self) -> dict[str, int]:
        counts = Counter(check.outcome for check in self.checks)
        return {"total": len(self.checks), **{outcome: counts[outcome] for outcome in OUTCOMES}}

    @property
    def passed(self) -> bool:
        """Something passed and nothing failed or errored; checks that do not apply to the
        profile do not count, but a run where nothing applied proves nothing."""
        return any(check.passed for check in self.checks) and all(
            check.outcome in ("passed", "not_applicable") for check in self.checks
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": FORMAT,
            "profile": self.profile,
            "node": {
                "hostname": self.node.hostname,
                "machine_id": self.node.machine_id,
                "ak_sha256": self.node.ak_sha256,
            },
            "image": self.image,
            "started": self.started,
            "finished": self.finished,
            "checks": [check.to_json() for check in self.checks],
            "summary": self.summary,
        }
        if self.signature is not None:
            data["signature"] = {
                "alg": self.signature.alg,
                "key_id": self.signature.key_id,
                "value": self.signature.value,
            }
        return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        twice = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"duplicate key {twice[0]!r}")
    return data


def loads(text: str | bytes) -> Any:
    """JSON, refusing an object that gives a key twice (ValueError)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def normalised(value: Any) -> Any:
    """`value` as a reader of its JSON sees it: string keys, lists for tuples.

    EvidenceError when it has no JSON form, or two of its keys become one (1 and "1").
    """
    try:
        return loads(json.dumps(value, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as error:
        raise EvidenceError(f"not representable as JSON: {error}") from None


def canonical(data: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the report without "signature", in canonical JSON."""
    unsigned = {key: value for key, value in data.items() if key != "signature"}
    return json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(report: Report, private_key: Ed25519PrivateKey) -> Report:
    """`report`, normalised to what its JSON reads back as, and signed over that."""
    unsigned = replace(
        report,
        image=normalised(report.image),
        checks=tuple(
            replace(check, observed=normalised(check.observed)) for check in report.checks
        ),
        signature=None,
    )
    value = private_key.sign(canonical(unsigned.to_json()))
    signature = Signature(
        key_id=key_id(private_key.public_key()), value=base64.b64encode(value).decode()
    )
    return replace(unsigned, signature=signature)


def verify(data: Any, trusted: Ed25519PublicKey) -> Report:
    """The report in `data` if `trusted` signed exactly this content; else EvidenceError."""
    if not isinstance(data, dict):
        raise EvidenceError("malformed report: not a JSON object")
    signature = data.get("signature")
    if signature is None:
        raise EvidenceError("report is not signed: it has no signature")
    if not isinstance(signature, dict) or set(signature) != SIGNATURE_FIELDS:
        raise EvidenceError(
            "malformed report: signature must have exactly the fields alg, key_id and value"
        )
    if not all(isinstance(signature[name], str) for name in SIGNATURE_FIELDS):
        raise EvidenceError("malformed report: signature needs alg, key_id and value strings")
    if signature["alg"] != ALGORITHM:
        raise EvidenceError(f"unsupported signature algorithm {signature['alg']!r}")
    expected = key_id(trusted)
    if signature["key_id"] != expected:
        raise EvidenceError(
            f"signed by an unknown key {signature['key_id']}; the trusted key is {expected}"
        )
    try:
        value = base64.b64decode(signature["value"], validate=True)
    except (binascii.Error, ValueError):
        raise EvidenceError("malformed report: signature value is not base64") from None
    try:
        content = canonical(data)
    except (ValueError, TypeError, RecursionError) as error:  # NaN, odd keys, deep nesting
        raise EvidenceError(f"malformed report: no canonical form: {error}") from None
    try:
        trusted.verify(value, content)
    except InvalidSignature:
        raise EvidenceError(
            "signature does not match: the report was changed after it was signed"
        ) from None
    return _parse(data)


def _parse(data: dict[str, Any]) -> Report:
    """A signed report whose content is not a report is still refused, not half-read."""
    try:
        if data["format"] != FORMAT:
            raise EvidenceError(f"unsupported report format {data['format']!r}; want {FORMAT}")
        node = data["node"]
        checks = tuple(_parse_check(item) for item in data["checks"])
        report = Report(
            profile=_text(data["profile"]),
            node=NodeIdentity(
                hostname=_text(node["hostname"]),
                machine_id=_text(node["machine_id"]),
                ak_sha256=None if node["ak_sha256"] is None else _text(node["ak_sha256"]),
            ),
            image=data["image"],
            started=_text(data["started"]),
            finished=_text(data["finished"]),
            checks=checks,
            signature=Signature(
                key_id=data["signature"]["key_id"],
                value=data["signature"]["value"],
                alg=data["signature"]["alg"],
            ),
        )
        summary = data["summary"]
    except KeyError as error:
        raise EvidenceError(f"malformed report: it has no field {error}") from None
    except (TypeError, AttributeError) as error:
        raise EvidenceError(f"malformed report: {error}") from None
    if report.image is not None and not isinstance(report.image, dict):
        raise EvidenceError("malformed report: image must be an object or null")
    if summary != report.summary:
        raise EvidenceError("malformed report: summary does not match its checks")
    return report


def _parse_check(item: Any) -> Check:
    outcome = item["outcome"]
    if outcome not in OUTCOMES:
        raise EvidenceError(f"malformed report: check {item.get('id')!r} has outcome {outcome!r}")
    if item["passed"] is not (outcome == "passed"):
        raise EvidenceError(f"malformed report: check {item['id']!r}: passed contradicts outcome")
    if not isinstance(item["observed"], dict) or not isinstance(item["time"], int | float):
        raise TypeError(f"check {item['id']!r}: observed must be an object, time a number")
    detail = item["detail"]
    return Check(
        id=_text(item["id"]),
        suite=_text(item["suite"]),
        title=_text(item["title"]),
        outcome=outcome,
        observed=item["observed"],
        detail=None if detail is None else _text(detail),
        time=float(item["time"]),
    )


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def read_report(path: Path) -> Any:
    """The JSON in `path`; EvidenceError if it is not JSON, gives a key twice or nests too
    deep to read. OSError passes through."""
    data = path.read_bytes()
    try:
        return loads(data)
    except RecursionError:
        raise EvidenceError(f"malformed report: {path} nests too deeply to read") from None
    except ValueError as error:  # not JSON, not UTF-8, a key twice, a huge number
        raise EvidenceError(f"malformed report: {path} is not JSON ({error})") from None


def write_report(report: Report, path: Path) -> None:
    """Write atomically: a reader sees the old report or the whole new one, never half."""
    text = json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode(), 0o644)


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sovereign" / "evidence" / KEY_FILE


def public_key_path(private_key_path: Path) -> Path:
    return private_key_path.with_suffix(PUBLIC_SUFFIX)


def check_signing_key_path(path: Path) -> None:
    """Refuse a signing key path that names a public key: its `.pub` would be itself."""
    public = public_key_path(path)
    if path.suffix == PUBLIC_SUFFIX or os.path.realpath(public) == os.path.realpath(path):
        raise EvidenceError(
            f"signing key {path}: a name ending in {PUBLIC_SUFFIX} is for the public key, "
            f"written beside the private one; give the private key's path (such as {KEY_FILE})"
        )


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key in `path`, created (0600, with its public `.pub` beside it) on first use."""
    check_signing_key_path(path)
    try:
        private_key = load_or_create_private_key(path)
        public_path = public_key_path(path)
        pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not public_path.exists() or public_path.read_bytes() != pem:
            write_atomic(public_path, pem, 0o644)
    except KeyFileError as error:
        raise EvidenceError(f"signing key: {error}") from None
    except OSError as error:
        where = error.filename or path
        raise EvidenceError(f"signing key: cannot use {where}: {error.strerror}") from None
    return private_key


def load_trusted_key(path: Path) -> Ed25519PublicKey:
    """A public key in PEM (SubjectPublicKeyInfo), such as the `.pub` beside a signing key."""
    try:
        return load_public_key(path)
    except KeyFileError as error:
        raise EvidenceError(str(error)) from None
