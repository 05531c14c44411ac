"""`POST /v1/responses` (JSON, or SSE with `stream: true`) and `POST /v1/responses/compact`.

HTTP has no connection cache: `previous_response_id` resolves only against responses created with
`store: true`. WebSocket faults never apply here; `metadata.sim_http_fault` names HTTP ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

from app.simulator import errors, faults
from app.simulator.auth import auth_error, bearer_key
from app.simulator.errors import Json, SimError, json_response
from app.simulator.generate import Chain, Turn, build_compaction, build_turn, failed_event
from app.simulator.knobs import TurnKnobs, turn_knobs
from app.simulator.playback import cut_point, play, stamp, until_gone
from app.simulator.request import CreateRequest, create_fields, parse_compact, parse_create
from app.simulator.state import STATE, SimState, lowered_headers

_STATUS_FAULTS = {
    faults.HTTP_STATUS_401: 401,
    faults.HTTP_STATUS_429: 429,
    faults.HTTP_STATUS_500: 500,
}
_CUTTING_FAULTS = frozenset({faults.DROP, faults.HANG, faults.RESPONSE_FAILED})


async def handle_create(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _authorized_body(request, state)
        req = parse_create(create_fields(body), websocket=False)
        knobs = turn_knobs(
            req.metadata,
            state.options,
            fault_key="sim_http_fault",
            allowed=faults.HTTP_FAULTS,
            default_fault=lambda: None,
        )
        if knobs.fault in _STATUS_FAULTS:
            raise errors.refusal(_STATUS_FAULTS[knobs.fault], bearer_key(request))
        prev = _stored(state, req.previous_response_id)
        turn = build_turn(req, prev, now=time.time(), shaping=knobs.shaping)
    except SimError as err:
        return err.http_response()
    if req.stream:
        return await _stream(request, state, turn, req, knobs)
    return await _answer(request, state, turn, req, knobs)


async def handle_compact(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _authorized_body(request, state)
        req = parse_compact(body)
        prev = _stored(state, req.previous_response_id)
        return json_response(build_compaction(req, prev, now=time.time()))
    except SimError as err:
        return err.http_response()


async def _authorized_body(request: web.Request, state: SimState) -> Json:
    """The JSON object of the request, logged as received before any check."""
    raw = await request.read()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    state.log.record(
        "request",
        None,
        request,
        lowered_headers(request),
        raw.decode("utf-8", "replace") if body is None else body,
    )
    err = auth_error(request, state.options)
    if err is not None:
        raise err
    if not isinstance(body, dict):
        raise errors.invalid_json("the body must be one JSON object")
    return body


def _stored(state: SimState, response_id: str | None) -> Chain | None:
    if response_id is None:
        return None
    chain = state.store.get(response_id)
    if chain is None:
        raise errors.previous_response_not_found(response_id)
    return chain


async def _answer(
    request: web.Request, state: SimState, turn: Turn, req: CreateRequest, knobs: TurnKnobs
) -> web.StreamResponse:
    if knobs.fault in (faults.DROP, faults.HANG):
        await _strike(request, knobs.fault)
        return web.Response(status=504)  # never reaches the client
    if knobs.fault == faults.RESPONSE_FAILED:
        return json_response(failed_event(turn, 0, None)["response"])
    deltas = sum(1 for event in turn.events if event["type"].endswith(".delta"))
    await asyncio.sleep(knobs.delay_s * deltas)  # as long as streaming it would have taken
    _remember(state, turn, req)
    return json_response(stamp(turn.events[-1], sent_at=False)["response"])


async def _stream(
    request: web.Request, state: SimState, turn: Turn, req: CreateRequest, knobs: TurnKnobs
) -> web.StreamResponse:
    sse = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await sse.prepare(request)

    async def send(event: Json) -> None:
        stamp(event, state.options.sent_at)
        await sse.write(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event)))

    if knobs.fault not in _CUTTING_FAULTS:
        await play(
            turn.events[-1:] if knobs.terminal_only else turn.events, send, delay_s=knobs.delay_s
        )
        _remember(state, turn, req)
    else:
        cut = cut_point(turn.events, knobs.fault_after)
        await play(turn.events[:cut], send, delay_s=knobs.delay_s)
        if knobs.fault == faults.RESPONSE_FAILED:
            await send(failed_event(turn, cut, req.stream_id))
        else:
            await _strike(request, knobs.fault)
            return sse
    await sse.write_eof()
    return sse


async def _strike(request: web.Request, fault: str) -> None:
    if fault == faults.DROP and request.transport is not None:
        request.transport.abort()
    else:
        await until_gone(request.transport)


def _remember(state: SimState, turn: Turn, req: CreateRequest) -> None:
    if req.store:
        state.store.put(turn.chain)
