"""`sovereign-gateway admin`: the node operator's commands, where only the gateway is installed.

The toolkit's audit, keys, memory, lock and token commands delegate here: exit 0 done or
intact, 1 a finding or a failure, 2 bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from sovereign_gateway.admin.base import AdminError

ROTATE_DESCRIPTION = (
    "Wrap every document's data key under a new KEK from the config's key source; "
    "ciphertexts are not touched. The old KEK opens the keys (its passphrase from "
    "SOVEREIGN_MEMORY_PASSPHRASE); the new one comes from the memory settings: a new key "
    "file, a passphrase (SOVEREIGN_MEMORY_NEW_PASSPHRASE, or asked twice on a terminal), or "
    "a key sealed to the TPM's PCRs as they are now. A config whose key_source changed "
    "(file to tpm, say) migrates with one rotation."
)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="sovereign-gateway admin", description="The node operator's commands."
    )
    groups = root.add_subparsers(dest="group", required=True, metavar="COMMAND")

    audit = _group(groups, "audit", "check the tamper-evident audit log")
    verify = _command(
        audit, "verify", "audit:run_verify", "verify every record, the chain, the checkpoints "
        "and HEAD.json; name the first bad seq"
    )  # fmt: skip
    verify.add_argument("path", type=Path, help="audit log directory, or one segment file")
    verify.add_argument(
        "--public-key",
        type=Path,
        help="trusted Ed25519 public key (PEM); else the log's own audit.pub, which whoever "
        "can rewrite the log can also replace",
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    memory = _group(groups, "memory", "check and repair the encrypted memory")
    check = _command(
        memory, "check", "memory:run_check",
        "compare the catalog's ciphertexts with the vector index; name every orphan",
    )  # fmt: skip
    _config(check)
    check.add_argument(
        "--repair", action="store_true", help="remove orphans and re-index lost vectors"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    keys = _group(groups, "keys", "manage the memory's key-encryption keys")
    rotate = _command(
        keys, "rotate", "memory:run_rotate",
        "wrap every data key under a new KEK from the config's key source",
    )  # fmt: skip
    rotate.description = ROTATE_DESCRIPTION
    _config(rotate)

    lock = _group(groups, "lock", "create and verify the signed compliance lock")
    keygen = _command(
        lock, "keygen", "lock:run_keygen",
        "write a new Ed25519 signing key (lock.key, 0600) and lock.pub",
    )  # fmt: skip
    keygen.add_argument("--out", "-o", type=Path, required=True, help="directory for the keys")
    create = _command(
        lock, "create", "lock:run_create",
        "pin the models, policy bundle, gateway config and egress mode, and sign",
    )  # fmt: skip
    _config(create)
    create.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM)")
    create.add_argument("--out", "-o", type=Path, required=True, help="where the manifest goes")
    verify = _command(
        lock, "verify", "lock:run_verify",
        "check the manifest's signature and, with --config, the node's drift",
    )  # fmt: skip
    verify.add_argument("manifest", type=Path, help="the lock manifest")
    verify.add_argument("--public-key", type=Path, required=True, help="Ed25519 public key (PEM)")
    verify.add_argument("--config", type=Path, help="also check this config and what it names")

    token = _command(
        groups, "token", "token:run",
        "print an access token signed by the local issuer (oidc.provider local)",
    )  # fmt: skip
    _config(token)
    token.add_argument("--user", default="", help="the token's subject")
    token.add_argument(
        "--role", action="append", default=[], help="a role from the config (repeatable)"
    )
    token.add_argument("--ttl", default="1h", help="lifetime: 3600s, 30m, 1h, ... 30d")
    token.add_argument("--client", default="sovereign-cli", help="the azp (client id)")

    health = _command(groups, "health", "health:run", "ask the running gateway whether it is ready")
    health.add_argument("--config", type=Path, help="the rendered gateway config")
    health.add_argument("--url", help="the gateway's base URL, instead of the config's address")
    health.add_argument(
        "--ca",
        type=Path,
        help="the CA to trust for https; default the local CA's ca.pem, or the served chain",
    )
    return root


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    # Each command imports only what it runs: memory's engines take seconds to import, and
    # a token or a health check need not wait for them.
    module, _, function = str(args.run).partition(":")
    run: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f"sovereign_gateway.admin.{module}"), function
    )
    try:
        return run(args)
    except AdminError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code


def _group(
    groups: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    group = groups.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    return group.add_subparsers(dest="command", required=True, metavar="COMMAND")


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, run: str, help: str
) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
    command.set_defaults(run=run)
    return command


def _config(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config", type=Path, required=True, help="the rendered gateway config (config.json)"
    )
