"""Server-sent events: split a byte stream into whole events, and build OpenAI's events.

Takes the chunks an engine sends, cut wherever TCP cut them; gives each event whole, with
its terminating blank line, so the gateway never relays half an event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventSplitter:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk
        while (match := _BOUNDARY.search(self._buffer)) is not None:
            event = self._buffer[: match.end()]
            self._buffer = self._buffer[match.end() :]
            yield event

    @property
    def leftover(self) -> bytes:
        return self._buffer


def data_of(event: bytes) -> str | None:
    """The event's data (data lines joined by newlines), or None for a comment-only event."""
    lines = event.decode("utf-8", errors="replace").splitlines()
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_event(message: str, code: str, error_type: str = "server_error") -> bytes:
    """OpenAI's in-stream error; its SDKs raise it as an APIError."""
    return event({"error": {"message": message, "type": error_type, "param": None, "code": code}})
