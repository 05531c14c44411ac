"""The control API for tests (`/_sim/…`, no auth; not part of OpenAI's API)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from app.simulator import faults
from app.simulator.errors import SimError, json_response
from app.simulator.state import STATE, ArmedFaults, SimState

_ARMABLE: dict[str, tuple[str, ...]] = {
    "handshake": faults.HANDSHAKE_FAULTS,
    "turn": faults.TURN_FAULTS,
}


async def get_requests(request: web.Request) -> web.Response:
    return json_response({"data": request.app[STATE].log.snapshot()})


async def delete_requests(request: web.Request) -> web.Response:
    request.app[STATE].log.clear()
    return json_response({"data": []})


async def get_faults(request: web.Request) -> web.Response:
    return json_response(_armed(request.app[STATE]))


async def post_faults(request: web.Request) -> web.Response:
    """Arm `{"handshake": "401"|…, "count": N}` or `{"turn": "drop"|…, "count": N}`."""
    state = request.app[STATE]
    try:
        body: Any = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return _bad("the body must be one JSON object", None)
    count = body.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return _bad(f"count: expected a positive integer, got {count!r}", "count")
    kinds = [kind for kind in _ARMABLE if kind in body]
    if len(kinds) != 1:
        return _bad("name exactly one of 'handshake' or 'turn'", None)
    kind = kinds[0]
    fault = str(body[kind])
    if fault not in _ARMABLE[kind]:
        allowed = ", ".join(_ARMABLE[kind])
        return _bad(f"{kind}: expected one of {allowed}, got {body[kind]!r}", kind)
    queue: ArmedFaults = state.handshake_faults if kind == "handshake" else state.turn_faults
    queue.arm(fault, count)
    return json_response(_armed(state))


async def post_reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return json_response(_armed(request.app[STATE]))


async def get_connections(request: web.Request) -> web.Response:
    infos = request.app[STATE].connections.values()
    return json_response({"data": [info.as_json() for info in infos]})


async def post_drop(request: web.Request) -> web.Response:
    """Cut one upstream socket's TCP connection now, idle or not (the client sees 1006)."""
    info = request.app[STATE].connections.get(request.match_info["conn_id"])
    if info is None or info.drop is None:
        return SimError(404, "not_found", "No such open connection.", None).http_response()
    info.drop()
    return json_response({"dropped": info.id})


def _armed(state: SimState) -> dict[str, Any]:
    return {"handshake": state.handshake_faults.snapshot(), "turn": state.turn_faults.snapshot()}


def _bad(message: str, param: str | None) -> web.Response:
    return SimError(400, "invalid_value", message, param).http_response()


def add_control_routes(app: web.Application) -> None:
    app.router.add_get("/_sim/requests", get_requests)
    app.router.add_delete("/_sim/requests", delete_requests)
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", post_faults)
    app.router.add_post("/_sim/reset", post_reset)
    app.router.add_get("/_sim/connections", get_connections)
    app.router.add_post("/_sim/connections/{conn_id}/drop", post_drop)
