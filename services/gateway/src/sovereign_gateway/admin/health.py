"""`admin health`: the running gateway's /health, over TLS when the config says so.

Exit 0 when every component is ready, 1 when one is not or nothing answers, 2 bad input.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path

import httpx

from sovereign_gateway import tls
from sovereign_gateway.admin.base import EXIT_FAILED, AdminError, config_from
from sovereign_gateway.contract import GatewayConfig, resolve

TIMEOUT_S = 10.0


def run(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.url is None):
        raise AdminError("give --config or --url, one of them")
    trusted: Path | None = args.ca
    if args.url is not None:
        base = str(args.url).rstrip("/")
    else:
        config = config_from(args.config)
        base = _base(config)
        trusted = trusted or _trusted(config, args.config)
    try:
        verify: ssl.SSLContext | bool = True if trusted is None else tls.client_context(trusted)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise AdminError(f"the CA to trust, {trusted}: {reason}") from None
    try:
        with httpx.Client(verify=verify, timeout=TIMEOUT_S, trust_env=False) as client:
            response = client.get(f"{base}/health")
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"✗ {base}: no answer: {exc}")
        return EXIT_FAILED
    if not isinstance(body, dict):
        print(f"✗ {base}: /health answered with no JSON object; is this a gateway?")
        return EXIT_FAILED
    ready = response.status_code == 200 and bool(body.get("ready"))
    mark = "✓" if ready else "✗"
    print(f"{mark} {base}: {'ready' if ready else 'not ready'} (profile {body.get('profile')})")
    for name, component in (body.get("components") or {}).items():
        sign = "✓" if component.get("ready") else "✗"
        print(f"  {sign} {name}: {component.get('detail', '')}")
    return 0 if ready else EXIT_FAILED


def _base(config: GatewayConfig) -> str:
    host = config.listen.host
    # A wildcard listen address is reached on loopback from the node itself.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    scheme = "http" if config.listen.tls is None else "https"
    return f"{scheme}://{host}:{config.listen.port}"


def _trusted(config: GatewayConfig, config_path: Path) -> Path | None:
    settings = config.listen.tls
    if settings is None:
        return None
    if settings.mode == "local_ca" and settings.ca_dir is not None:
        return resolve(config_path, settings.ca_dir) / tls.CA_CERTIFICATE
    return tls.server_files(settings, lambda value: resolve(config_path, value)).certificate
