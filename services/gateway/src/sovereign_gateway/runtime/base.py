"""What every engine replica takes and gives, whatever runs behind it.

A replica answers an `InferenceRequest` with a `Completion` or an `EventStream` of complete
SSE events. `ReplicaDown` means it never accepted the request, so the router may try
another replica; anything after acceptance is the request's own outcome.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from sovereign_gateway.contract import ModelRoute

ReplicaState = Literal["ready", "starting", "down", "refused"]


class ReplicaDown(Exception):
    """The replica did not take the request (unreachable, restarting, overloaded)."""


@dataclass
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    # "engine" when the engine reported it; "counted" when the gateway counted stream chunks.
    source: Literal["engine", "counted"] = "engine"

    def as_dict(self) -> dict[str, Any]:
        total = (
            None
            if self.prompt_tokens is None or self.completion_tokens is None
            else self.prompt_tokens + self.completion_tokens
        )
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
            "source": self.source,
        }


@dataclass(frozen=True)
class InferenceRequest:
    request_id: str
    route: ModelRoute
    payload: dict[str, Any]
    include_usage: bool
    created: int = 0

    @classmethod
    def chat(
        cls, request_id: str, route: ModelRoute, payload: dict[str, Any], include_usage: bool
    ) -> InferenceRequest:
        return cls(request_id, route, payload, include_usage, int(time.time()))


@dataclass
class Completion:
    status: int
    body: bytes
    content_type: str
    usage: Usage | None


class EventStream(ABC):
    """Complete SSE events (each ends with a blank line) from one accepted request."""

    usage: Usage | None = None
    failed: str | None = None

    @abstractmethod
    def events(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class Replica(ABC):
    label: str

    @abstractmethod
    def state(self) -> tuple[ReplicaState, str]:
        """The state and a line saying why."""

    @abstractmethod
    async def complete(self, request: InferenceRequest) -> Completion: ...

    @abstractmethod
    async def stream(self, request: InferenceRequest) -> EventStream: ...

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def probe(self, busy: bool = False) -> None:
        """Refresh `state()` by asking the engine; called by the router's health loop.

        `busy`: requests are running on it right now.
        """
        return

    def describe(self) -> dict[str, Any]:
        state, detail = self.state()
        return {"replica": self.label, "state": state, "detail": detail}
