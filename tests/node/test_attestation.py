"""Attestation: the node's AK quotes the profile's PCRs over a nonce only this run knows.

The operator's side checks the quote (signature, nonce, PCR digest, golden values) with
`sovereign.attestation.verify_quote`; that a stale nonce or a changed PCR fails is shown
by the swtpm tests in tests/integration, since a healthy node cannot show it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from sovereign.attestation import verify_quote
from sovereign.verify import RoleVariables, VerifyContext

QUOTE_COMMAND = "/usr/local/sbin/sovereign-quote"
EXPORTS = ("ak.pub.pem", "ak.name", "golden-pcrs.json")


def test_quote_matches_golden_pcrs(
    output: Callable[[str], str],
    sudo: str,
    context: VerifyContext,
    variables: RoleVariables,
    observe: Callable[..., None],
) -> None:
    """The node's AK quotes the profile's PCRs over a fresh nonce; every value is golden"""
    assert context.exports is not None, "no exports: pass --exports DIR"
    missing = [name for name in EXPORTS if not (context.exports / name).is_file()]
    assert not missing, f"provisioning exported no {', '.join(missing)} in {context.exports}"
    pcrs = [int(pcr) for pcr in variables["tpm_attestation_pcrs"]]
    nonce = secrets.token_bytes(20)
    quote: dict[str, Any] = json.loads(output(f"{sudo}{QUOTE_COMMAND} {nonce.hex()}"))
    golden = json.loads((context.exports / "golden-pcrs.json").read_text())
    result = verify_quote(
        quote, context.exports / "ak.pub.pem", context.exports / "ak.name", nonce, golden, pcrs
    )
    observe(
        pcrs=pcrs,
        nonce=nonce.hex(),
        ak_name=quote.get("ak_name"),
        quoted={str(pcr): value for pcr, value in sorted(result.quoted.items())},
    )
    assert result.ok, result.reason
