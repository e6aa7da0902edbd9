"""`sovereign-gateway --config FILE`: load the rendered config and serve it with uvicorn,
over TLS 1.3 when the config says so (a local CA issues the certificate first).
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path

import uvicorn

from sovereign_gateway import tls
from sovereign_gateway.app import create_app
from sovereign_gateway.contract import ConfigError, GatewayConfig, load_config, resolve

GRACE_SECONDS = 30


def main(arguments: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sovereign-gateway",
        description="Serve the gateway, or run `sovereign-gateway admin --help`.",
    )
    parser.add_argument("--config", type=Path, required=True, help="rendered gateway config")
    args = parser.parse_args(arguments)
    try:
        config = load_config(args.config)
        context = server_context(config, args.config)
    except (ConfigError, tls.TlsError) as exc:
        print(f"sovereign-gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"sovereign-gateway: the local CA: {exc}", file=sys.stderr)
        sys.exit(1)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the grace
    # period), then runs the lifespan shutdown, which seals and fsyncs the audit log.
    uvicorn.run(
        create_app(config, args.config.resolve()),
        host=config.listen.host,
        port=config.listen.port,
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
        ssl_context_factory=None if context is None else lambda _config, _default: context,
    )


def server_context(config: GatewayConfig, config_path: Path) -> ssl.SSLContext | None:
    """TLS 1.3 for the listen address; in local_ca mode the certificate is issued first."""
    settings = config.listen.tls
    if settings is None:
        return None
    if settings.mode == "local_ca" and settings.ca_dir is not None:
        tls.ensure_local_ca(resolve(config_path, settings.ca_dir), settings.names, config.profile)
    return tls.server_context(tls.server_files(settings, lambda value: resolve(config_path, value)))
