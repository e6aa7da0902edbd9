"""The gateway's endpoints, one module per group; each group gives its routes."""

from __future__ import annotations

from starlette.routing import Route

from sovereign_gateway.components import Components
from sovereign_gateway.guard import Guard


class Endpoints:
    """A group of routes over the gateway's running parts; an API route passes the guard."""

    def __init__(self, parts: Components, guard: Guard) -> None:
        self.parts = parts
        self.guard = guard

    def routes(self) -> list[Route]:
        raise NotImplementedError
