"""What every admin command shares: its exit codes, its refusal, and reading the config."""

from __future__ import annotations

from pathlib import Path

from sovereign_gateway.contract import ConfigError, GatewayConfig, load_config

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class AdminError(Exception):
    """A command that cannot go on; main prints `error: <message>` and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def config_from(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as error:
        raise AdminError(str(error)) from None
