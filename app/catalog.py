"""The customer's model list: `GET /v1/models`, `GET /v1/gateway/models` and
`GET /v1/models/{provider}/{model}` (CONTRACT.md §2), for a gateway key.

A key sees the models its team may route and this node can serve: allowed, priced, and the
team's upstream credential set here; each in OpenAI's model shape.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app import metrics
from app.errors import Code, GatewayError
from app.models import Team
from app.node import NODE, Node
from app.protocol import PROVIDER_PREFIX

OWNER = PROVIDER_PREFIX.rstrip("/")


def servable_models(node: Node, team: Team) -> list[str]:
    """What the team may route and this node can serve: allowed, priced, credential set."""
    if not node.credential(team.upstream_credential):
        return []
    return sorted(m for m in node.view.view.catalog if team.allows(m))


def model_object(name: str) -> dict[str, Any]:
    """OpenAI's model object."""
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def _json(data: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _customer(request: web.Request) -> tuple[Node, Team]:
    node = request.app[NODE]
    try:
        _principal, _key, team = await node.auth.authenticate(request)
    except GatewayError as err:
        metrics.count_error(err.code)
        raise
    return node, team


async def customer_models(request: web.Request) -> web.Response:
    node, team = await _customer(request)
    data = [model_object(m) for m in servable_models(node, team)]
    return _json({"object": "list", "data": data})


async def customer_model(request: web.Request) -> web.Response:
    node, team = await _customer(request)
    name = f"{request.match_info['provider']}/{request.match_info['model']}"
    if request.match_info["provider"] != OWNER or name not in servable_models(node, team):
        raise GatewayError(Code.NOT_FOUND, f"No model {name!r} for this key.", param="model")
    return _json(model_object(name))
