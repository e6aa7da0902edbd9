"""`sovereign-gateway --config FILE` serves the gateway; `sovereign-gateway admin ...` runs the
node operator's commands.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    # Only what the command runs is imported: an admin command does not wait the seconds
    # that the server's engines take to import.
    if arguments[:1] == ["admin"]:
        sys.exit(importlib.import_module("sovereign_gateway.admin").main(arguments[1:]))
    importlib.import_module("sovereign_gateway.serve").main(arguments)


if __name__ == "__main__":
    main()
