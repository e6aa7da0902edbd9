"""`GET /v1/models`: the models this caller's roles may use, as the policy decides."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sovereign_gateway.contract import ModelRoute
from sovereign_gateway.endpoints import Endpoints
from sovereign_gateway.guard import Call
from sovereign_gateway.policy import Decision


class ModelEndpoints(Endpoints):
    def routes(self) -> list[Route]:
        return [self.guard.route("/v1/models", "models:read", None, self.list, "GET")]

    async def list(
        self, call: Call, body: None, route: ModelRoute | None, decision: Decision
    ) -> Response:
        visible = []
        for model in self.parts.config.models:
            verdict = await self.guard.ask(call.principal, "chat", model, [], call.resource)
            if verdict.allow:
                visible.append(
                    {"id": model.name, "object": "model", "created": 0, "owned_by": "sovereign"}
                )
        return JSONResponse({"object": "list", "data": visible})
