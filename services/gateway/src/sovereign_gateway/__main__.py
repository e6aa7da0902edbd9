"""`sovereign-gateway --config FILE`: load the rendered config and serve it with uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from sovereign_gateway.app import create_app
from sovereign_gateway.config import load_config


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
    uvicorn.run(
        create_app(config),
        host=config.listen.host,
        port=config.listen.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
