"""`admin lock keygen|create|verify`: make, sign and check the compliance lock; exit 1
when a manifest does not hold (each reason named), 2 when it cannot be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sovereign_gateway.admin.base import EXIT_FAILED, AdminError, config_from
from sovereign_gateway.contract import (
    GatewayConfig,
    KeyFileError,
    load_private_key,
    private_pem,
    public_pem,
    resolve,
    write_atomic,
)
from sovereign_gateway.lock import (
    LockError,
    LockFacts,
    create_manifest,
    drift,
    facts_for,
    key_id,
    load_verified,
)

PRIVATE_KEY = "lock.key"
PUBLIC_KEY = "lock.pub"


def run_keygen(args: argparse.Namespace) -> int:
    out: Path = args.out
    for name in (PRIVATE_KEY, PUBLIC_KEY):
        if (out / name).exists():
            raise AdminError(
                f"refusing to overwrite {out / name}; move it away or choose another --out"
            )
    key = Ed25519PrivateKey.generate()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / PRIVATE_KEY, private_pem(key), 0o600)
        write_atomic(out / PUBLIC_KEY, public_pem(key.public_key()), 0o644)
    except OSError as exc:
        raise AdminError(f"cannot write keys into {out}: {exc.strerror}") from None
    print(f"{out / PRIVATE_KEY}  private, keep it off the node")
    print(f"{out / PUBLIC_KEY}  key id {key_id(key.public_key())[:16]}")
    return 0


def run_create(args: argparse.Namespace) -> int:
    config_path: Path = args.config
    out: Path = args.out
    config = config_from(config_path)
    bundle = resolve(config_path, config.policy.bundle)
    if not bundle.is_dir():
        raise AdminError(f"{config_path}: policy.bundle {bundle} is not a directory")
    try:
        private_key = load_private_key(args.key)
    except KeyFileError as exc:
        raise AdminError(str(exc)) from None
    facts = _facts(config_path, config)
    try:
        manifest = create_manifest(
            facts, profile=config.profile, kind=config.kind, private_key=private_key
        )
    except ValueError as exc:
        raise AdminError(f"{config_path}: {exc}") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, manifest, 0o644)
    except OSError as exc:
        raise AdminError(f"cannot write {out}: {exc.strerror}") from None
    print(f"{out}  locks {len(facts.models)} model(s), policy and config")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        verified = load_verified(args.manifest, args.public_key)
    except LockError as error:
        if error.code in ("missing", "key_unreadable"):
            raise AdminError(str(error)) from None
        raise AdminError(f"violation: {error}", EXIT_FAILED) from None
    if args.config is not None:
        reasons = drift(verified, _facts(args.config, config_from(args.config)))
        if reasons:
            for reason in reasons:
                print(f"violation: {reason}", file=sys.stderr)
            return EXIT_FAILED
    checked = "signature and config" if args.config is not None else "signature"
    print(f"✓ {args.manifest}: {checked} ok (key {verified['key_id'][:16]})")
    return 0


def _facts(config_path: Path, config: GatewayConfig) -> LockFacts:
    try:
        return facts_for(config_path, config)
    except OSError as exc:
        raise AdminError(f"cannot read {exc.filename or config_path}: {exc.strerror}") from None
