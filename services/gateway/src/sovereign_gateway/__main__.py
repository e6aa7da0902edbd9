"""`sovereign-gateway --config FILE`: load the rendered config and serve it with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from sovereign_gateway.app import create_app
from sovereign_gateway.config import load_config

GRACE_SECONDS = 30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sovereign-gateway")
    parser.add_argument("--config", type=Path, required=True, help="rendered gateway config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except OSError as exc:
        print(f"sovereign-gateway: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as exc:
        details = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '<config>'}: {e['msg']}" for e in exc.errors()
        )
        print(
            f"sovereign-gateway: {args.config} is not a valid gateway config:\n{details}",
            file=sys.stderr,
        )
        sys.exit(2)
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
    )


if __name__ == "__main__":
    main()
