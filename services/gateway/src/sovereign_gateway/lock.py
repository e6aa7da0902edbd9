"""The compliance lock: a signed manifest pinning models, policy bundle, config and egress.

Takes the rendered config and the manifest on disk; gives the manifest (`create_manifest`),
its verified contents (`load_verified`), drift reasons (`drift`) and a `LockWatcher`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sovereign_gateway import contract
from sovereign_gateway.contract import ComplianceLock, GatewayConfig, resolve

SCHEMA_VERSION = 1
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Every field but the signature is signed; a field this version does not know is refused,
# because an older gateway would otherwise silently not enforce what a newer lock pins.
_SIGNED_FIELDS = {
    "schema_version",
    "profile",
    "kind",
    "created",
    "models",
    "policy_bundle_sha256",
    "gateway_config_sha256",
    "egress_default",
    "key_id",
}

LockErrorCode = Literal[
    "missing", "malformed", "unsigned", "bad_signature", "wrong_key", "key_unreadable"
]


class LockError(Exception):
    """A manifest that cannot be trusted; `code` says why, the message says where."""

    def __init__(self, code: LockErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: LockErrorCode = code


@dataclass(frozen=True)
class LockFacts:
    """What the running node actually is, to be compared with what the lock pins."""

    models: tuple[tuple[str, str | None], ...]
    policy_bundle_sha256: str
    gateway_config_sha256: str
    egress_default: str


@dataclass(frozen=True)
class LockStatus:
    state: Literal["locked", "absent", "violation"]
    ok: bool
    reasons: tuple[str, ...]


def policy_bundle_digest(bundle_dir: Path) -> str:
    """sha256 over `"<relative posix path> <sha256>\\n"` of every file, sorted by path.

    A missing directory digests like an empty one: it then matches no lock made from a
    render (which always has data.json), so the gateway reports drift instead of crashing.
    """
    lines: list[str] = []
    for root, _dirs, files in os.walk(bundle_dir):
        for name in files:
            path = Path(root) / name
            relative = path.relative_to(bundle_dir).as_posix()
            lines.append(f"{relative} {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


def facts_for(config_path: Path, config: GatewayConfig) -> LockFacts:
    return LockFacts(
        models=tuple((model.name, model.sha256) for model in config.models),
        policy_bundle_sha256=policy_bundle_digest(resolve(config_path, config.policy.bundle)),
        gateway_config_sha256=hashlib.sha256(config_path.read_bytes()).hexdigest(),
        egress_default=config.egress_default,
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def create_manifest(
    facts: LockFacts, *, profile: str, kind: str, private_key: Ed25519PrivateKey
) -> bytes:
    """The signed manifest as JSON bytes; raises ValueError for a model without sha256."""
    unpinned = [name for name, sha256 in facts.models if sha256 is None]
    if unpinned:
        # Such a lock would be violated the moment it is installed.
        raise ValueError(f"model {', '.join(unpinned)} has no sha256 to pin")
    body: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "profile": profile,
        "kind": kind,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "models": [{"name": name, "sha256": sha256} for name, sha256 in facts.models],
        "policy_bundle_sha256": facts.policy_bundle_sha256,
        "gateway_config_sha256": facts.gateway_config_sha256,
        "egress_default": facts.egress_default,
        "key_id": key_id(private_key.public_key()),
    }
    signature = base64.b64encode(private_key.sign(canonical(body))).decode()
    return (json.dumps({**body, "signature": signature}, indent=2, sort_keys=True) + "\n").encode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        return contract.load_public_key(path)
    except contract.KeyFileError as exc:
        raise LockError("key_unreadable", str(exc)) from None


def load_verified(manifest_path: Path, public_key_path: Path) -> dict[str, Any]:
    """The manifest, once it parses and verifies against the public key; else LockError."""
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise LockError("missing", f"{manifest_path} is missing") from None
    except OSError as exc:
        # Unreadable is not absent: treating it as absent would lift an optional lock.
        raise LockError("malformed", f"cannot read {manifest_path}: {exc.strerror}") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise LockError("malformed", f"{manifest_path} is not JSON") from None
    if not isinstance(manifest, dict):
        raise LockError("malformed", f"{manifest_path} is not a JSON object")
    signature = manifest.get("signature")
    if signature is None or signature == "":
        raise LockError("unsigned", f"{manifest_path} has no signature")
    problem = _shape_problem(manifest)
    if problem is not None:
        raise LockError("malformed", f"{manifest_path}: {problem}")
    public_key = load_public_key(public_key_path)
    expected = key_id(public_key)
    if manifest["key_id"] != expected:
        raise LockError(
            "wrong_key",
            f"{manifest_path} is signed by key {manifest['key_id'][:16]}…, "
            f"not by {public_key_path} ({expected[:16]}…)",
        )
    try:
        decoded = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise LockError("bad_signature", f"{manifest_path}: signature is not base64") from None
    body = {key: value for key, value in manifest.items() if key != "signature"}
    try:
        public_key.verify(decoded, canonical(body))
    except InvalidSignature:
        raise LockError(
            "bad_signature", f"{manifest_path}: signature does not match its contents"
        ) from None
    return manifest


def _shape_problem(manifest: Mapping[str, Any]) -> str | None:
    fields = set(manifest) - {"signature"}
    if fields != _SIGNED_FIELDS:
        missing, unknown = _SIGNED_FIELDS - fields, fields - _SIGNED_FIELDS
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing))}")
        if unknown:
            parts.append(f"unknown {', '.join(sorted(unknown))}")
        return "; ".join(parts)
    version = manifest["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        return f"schema_version must be {SCHEMA_VERSION}"
    if not isinstance(manifest["signature"], str):
        return "signature must be a base64 string"
    for name in ("profile", "kind", "created", "egress_default"):
        if not isinstance(manifest[name], str):
            return f"{name} must be a string"
    for name in ("policy_bundle_sha256", "gateway_config_sha256", "key_id"):
        if not isinstance(manifest[name], str) or not _HEX_SHA256.fullmatch(manifest[name]):
            return f"{name} must be a lower-case hex sha256"
    models = manifest["models"]
    if not isinstance(models, list):
        return "models must be a list"
    for index, model in enumerate(models):
        if (
            not isinstance(model, dict)
            or set(model) != {"name", "sha256"}
            or not isinstance(model["name"], str)
            or not isinstance(model["sha256"], str)
            or not _HEX_SHA256.fullmatch(model["sha256"])
        ):
            return f"models[{index}] must be {{name, sha256}} with a hex sha256"
    return None


def drift(manifest: Mapping[str, Any], facts: LockFacts) -> list[str]:
    """Why the node no longer matches a verified manifest; empty when it does."""
    pinned: dict[str, set[str]] = {}
    for entry in manifest.get("models", []):
        pinned.setdefault(entry["name"], set()).add(entry["sha256"])
    reasons: list[str] = []
    configured = set()
    for name, sha256 in facts.models:
        configured.add(name)
        if sha256 is None:
            reasons.append(f"model {name} has no sha256")
        elif sha256 not in pinned.get(name, set()):
            reasons.append(f"model {name} sha256 {sha256[:12]}… is not pinned")
    reasons.extend(
        f"model {name} is pinned but not configured" for name in sorted(pinned.keys() - configured)
    )
    if manifest.get("policy_bundle_sha256") != facts.policy_bundle_sha256:
        reasons.append("policy bundle digest differs")
    if manifest.get("gateway_config_sha256") != facts.gateway_config_sha256:
        reasons.append("gateway config digest differs")
    if manifest.get("egress_default") != facts.egress_default:
        reasons.append("egress mode differs")
    return reasons


def evaluate(lock: ComplianceLock, facts: LockFacts) -> LockStatus:
    manifest_path, key_path = Path(lock.manifest), Path(lock.public_key)
    try:
        manifest = load_verified(manifest_path, key_path)
    except LockError as error:
        if error.code == "missing":
            if not lock.required:
                return LockStatus("absent", True, ())
            return LockStatus(
                "violation",
                False,
                (f"compliance lock required but {manifest_path} is missing",),
            )
        return LockStatus("violation", False, (str(error),))
    reasons = drift(manifest, facts)
    if reasons:
        return LockStatus("violation", False, tuple(reasons))
    return LockStatus("locked", True, ())


_Stamp = tuple[int, int, int] | None
# Stands for a file that exists but cannot be stat'ed; no real stat result looks like it.
_UNSTATABLE: _Stamp = (-1, -1, -1)


class LockWatcher:
    """The lock's status, re-evaluated only when the manifest or its key changes on disk."""

    def __init__(self, lock: ComplianceLock, facts: LockFacts) -> None:
        self._lock = lock
        self._facts = facts
        self._stamps: tuple[_Stamp, _Stamp] | None = None
        self._status: LockStatus | None = None
        # How many times the manifest was read and verified; lets tests and metrics see
        # that an unchanged lock costs two stat calls per request and nothing more.
        self.loads = 0

    def check(self) -> tuple[LockStatus, bool]:
        """The current status, and whether it differs from the one the last check gave.

        The first check counts as a change, so a caller can log the state it starts in.
        """
        stamps = (_stamp(Path(self._lock.manifest)), _stamp(Path(self._lock.public_key)))
        previous = self._status
        # An unstatable file has no identity to compare, so it is re-read every time.
        if previous is not None and stamps == self._stamps and _UNSTATABLE not in stamps:
            return previous, False
        # Stat before reading: a file replaced in between gets a new stamp and is re-read.
        self._stamps = stamps
        self._status = evaluate(self._lock, self._facts)
        self.loads += 1
        return self._status, self._status != previous


def _stamp(path: Path) -> _Stamp:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return _UNSTATABLE
    return (info.st_mtime_ns, info.st_size, info.st_ino)
