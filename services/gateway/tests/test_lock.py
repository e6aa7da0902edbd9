"""The compliance lock: signing, verification, drift and the watcher's cheap re-checks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sovereign_gateway.contract import ComplianceLock, GatewayConfig, load_config
from sovereign_gateway.lock import (
    LockError,
    LockFacts,
    LockWatcher,
    create_manifest,
    drift,
    facts_for,
    key_id,
    load_verified,
    policy_bundle_digest,
)

from services.gateway.tests.configs import config_document

SHA_A = "a" * 64
SHA_B = "b" * 64


class Node:
    """A render directory on disk plus the signing key its lock is made with."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.config_path = tmp_path / "render" / "gateway" / "config.json"
        self.bundle = tmp_path / "render" / "policy"
        (self.bundle / "gateway").mkdir(parents=True)
        (self.bundle / "data.json").write_text('{"sovereign": {}}\n')
        (self.bundle / "gateway" / "authz.rego").write_text("package gateway\n")
        self.write_config(config_document(tmp_path))
        self.key = Ed25519PrivateKey.generate()
        self.public_key_path = tmp_path / "lock.pub"
        self.public_key_path.write_bytes(_public_pem(self.key))
        self.manifest_path = tmp_path / "lock.json"

    def write_config(self, document: dict[str, Any]) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(document, indent=2))

    @property
    def config(self) -> GatewayConfig:
        return load_config(self.config_path)

    def facts(self) -> LockFacts:
        return facts_for(self.config_path, self.config)

    def lock(self, key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
        manifest = create_manifest(
            self.facts(), profile="t", kind="personal", private_key=key or self.key
        )
        self.manifest_path.write_bytes(manifest)
        document: dict[str, Any] = json.loads(manifest)
        return document

    def rewrite_manifest(self, document: dict[str, Any]) -> None:
        # A new file under the same name, as an editor or `lock create` would leave it.
        temporary = self.manifest_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document))
        os.replace(temporary, self.manifest_path)

    def compliance(self, *, required: bool = False) -> ComplianceLock:
        return ComplianceLock(
            required=required,
            manifest=str(self.manifest_path),
            public_key=str(self.public_key_path),
        )


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def _error_code(node: Node) -> str:
    with pytest.raises(LockError) as caught:
        load_verified(node.manifest_path, node.public_key_path)
    return caught.value.code


# -- signing and verification -------------------------------------------------------------


def test_signed_manifest_verifies_and_matches_the_node_it_was_made_from(node: Node) -> None:
    written = node.lock()
    verified = load_verified(node.manifest_path, node.public_key_path)
    assert verified == written
    assert verified["models"] == [{"name": "m", "sha256": SHA_A}]
    assert verified["gateway_config_sha256"] == node.facts().gateway_config_sha256
    assert drift(verified, node.facts()) == []
    status, _ = LockWatcher(node.compliance(), node.facts()).check()
    assert (status.state, status.ok, status.reasons) == ("locked", True, ())


def test_manifest_without_signature_is_unsigned(node: Node) -> None:
    document = node.lock()
    del document["signature"]
    node.rewrite_manifest(document)
    assert _error_code(node) == "unsigned"


def test_manifest_with_empty_signature_is_unsigned(node: Node) -> None:
    document = node.lock()
    document["signature"] = ""
    node.rewrite_manifest(document)
    assert _error_code(node) == "unsigned"


def test_manifest_signed_by_another_key_is_refused(node: Node) -> None:
    node.lock(key=Ed25519PrivateKey.generate())
    assert _error_code(node) == "wrong_key"


def test_manifest_claiming_the_configured_key_but_signed_by_another_fails_signature(
    node: Node,
) -> None:
    document = node.lock(key=Ed25519PrivateKey.generate())
    document["key_id"] = key_id(node.key.public_key())
    node.rewrite_manifest(document)
    assert _error_code(node) == "bad_signature"


def test_field_edited_after_signing_breaks_the_signature(node: Node) -> None:
    document = node.lock()
    document["models"] = [{"name": "m", "sha256": SHA_B}]
    node.rewrite_manifest(document)
    assert _error_code(node) == "bad_signature"


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b'{"signature": "x"}'],
    ids=["not-json", "not-an-object", "fields-missing"],
)
def test_malformed_manifest_is_refused(node: Node, content: bytes) -> None:
    node.manifest_path.write_bytes(content)
    assert _error_code(node) == "malformed"


def test_manifest_with_an_unknown_field_is_refused(node: Node) -> None:
    document = node.lock()
    document["pins_sandbox"] = True
    node.rewrite_manifest(document)
    assert _error_code(node) == "malformed"


def test_unreadable_public_key_is_reported_as_such(node: Node) -> None:
    node.lock()
    node.public_key_path.write_text("not a key")
    assert _error_code(node) == "key_unreadable"


def test_missing_manifest_is_reported_as_missing(node: Node) -> None:
    assert _error_code(node) == "missing"


def test_manifest_refuses_to_pin_a_model_without_sha256(node: Node) -> None:
    facts = dataclasses.replace(node.facts(), models=(("m", None),))
    with pytest.raises(ValueError, match="model m has no sha256"):
        create_manifest(facts, profile="t", kind="personal", private_key=node.key)


# -- drift --------------------------------------------------------------------------------


def test_model_with_another_digest_is_not_pinned(node: Node) -> None:
    manifest = node.lock()
    document = config_document(node.root)
    document["models"][0]["sha256"] = SHA_B
    node.write_config(document)
    reasons = drift(manifest, node.facts())
    assert f"model m sha256 {SHA_B[:12]}… is not pinned" in reasons
    assert "gateway config digest differs" in reasons


def test_model_without_sha256_is_drift(node: Node) -> None:
    manifest = node.lock()
    facts = dataclasses.replace(node.facts(), models=(("m", None),))
    assert drift(manifest, facts) == ["model m has no sha256"]


def test_pinned_model_no_longer_configured_is_drift(node: Node) -> None:
    manifest = node.lock()
    facts = dataclasses.replace(node.facts(), models=())
    assert drift(manifest, facts) == ["model m is pinned but not configured"]


@pytest.mark.parametrize("change", ["edit", "add", "rename"])
def test_any_change_to_the_policy_bundle_is_drift(node: Node, change: str) -> None:
    manifest = node.lock()
    rego = node.bundle / "gateway" / "authz.rego"
    if change == "edit":
        rego.write_text("package gateway\n\ndefault allow := true\n")
    elif change == "add":
        (node.bundle / "gateway" / "extra.rego").write_text("package gateway.extra\n")
    else:
        rego.rename(rego.with_name("other.rego"))
    assert drift(manifest, node.facts()) == ["policy bundle digest differs"]


def test_policy_bundle_digest_is_stable_for_an_unchanged_bundle(node: Node) -> None:
    assert policy_bundle_digest(node.bundle) == policy_bundle_digest(node.bundle)
    assert policy_bundle_digest(node.bundle) != policy_bundle_digest(node.root / "absent")


def test_edited_gateway_config_is_drift(node: Node) -> None:
    manifest = node.lock()
    document = config_document(node.root)
    document["max_body_bytes"] = 2048
    node.write_config(document)
    assert drift(manifest, node.facts()) == ["gateway config digest differs"]


def test_other_egress_mode_is_drift(node: Node) -> None:
    manifest = node.lock()
    facts = dataclasses.replace(node.facts(), egress_default="allow")
    assert drift(manifest, facts) == ["egress mode differs"]


# -- status and the watcher ---------------------------------------------------------------


def test_absent_lock_that_is_not_required_is_fine(node: Node) -> None:
    status, _ = LockWatcher(node.compliance(required=False), node.facts()).check()
    assert (status.state, status.ok, status.reasons) == ("absent", True, ())


def test_absent_lock_that_is_required_is_a_violation(node: Node) -> None:
    status, _ = LockWatcher(node.compliance(required=True), node.facts()).check()
    assert (status.state, status.ok) == ("violation", False)
    assert status.reasons == (f"compliance lock required but {node.manifest_path} is missing",)


def test_present_lock_is_enforced_even_when_not_required(node: Node) -> None:
    node.lock(key=Ed25519PrivateKey.generate())
    status, _ = LockWatcher(node.compliance(required=False), node.facts()).check()
    assert (status.state, status.ok) == ("violation", False)
    assert "signed by key" in status.reasons[0]


def test_drifted_lock_reports_every_reason(node: Node) -> None:
    node.lock()
    facts = dataclasses.replace(node.facts(), egress_default="allow", models=(("m", None),))
    status, _ = LockWatcher(node.compliance(), facts).check()
    assert status.state == "violation"
    assert status.reasons == ("model m has no sha256", "egress mode differs")


def test_watcher_does_not_reread_an_unchanged_lock(node: Node) -> None:
    node.lock()
    watcher = LockWatcher(node.compliance(), node.facts())
    first, changed_first = watcher.check()
    second, changed_second = watcher.check()
    assert (first.state, changed_first) == ("locked", True)
    assert (second, changed_second) == (first, False)
    assert watcher.loads == 1


def test_watcher_notices_a_manifest_replaced_on_disk(node: Node) -> None:
    document = node.lock()
    watcher = LockWatcher(node.compliance(), node.facts())
    assert watcher.check()[0].state == "locked"
    document["egress_default"] = "allow"
    node.rewrite_manifest(document)
    status, changed = watcher.check()
    assert (status.state, changed, watcher.loads) == ("violation", True, 2)


def test_watcher_notices_a_lock_appearing_and_disappearing(node: Node) -> None:
    watcher = LockWatcher(node.compliance(), node.facts())
    assert watcher.check()[0].state == "absent"
    node.lock()
    status, changed = watcher.check()
    assert (status.state, changed) == ("locked", True)
    node.manifest_path.unlink()
    status, changed = watcher.check()
    assert (status.state, changed) == ("absent", True)


def test_watcher_notices_a_replaced_public_key(node: Node) -> None:
    node.lock()
    watcher = LockWatcher(node.compliance(), node.facts())
    assert watcher.check()[0].state == "locked"
    replacement = node.root / "other.pub"
    replacement.write_bytes(_public_pem(Ed25519PrivateKey.generate()))
    os.replace(replacement, node.public_key_path)
    status, changed = watcher.check()
    assert (status.state, changed) == ("violation", True)
