"""The upstream socket: `GET /v1/responses` with `Upgrade: websocket` (UPSTREAM.md).

One `UpstreamSocket` per connection: a reader that logs and queues each frame as it arrives, a
worker that answers the queued `response.create` frames one at a time (as OpenAI does), and a
watchdog that enforces the connection's age limit. The connection's cache holds only its most
recent response.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from app.simulator import errors, faults
from app.simulator.auth import auth_error, bearer_key
from app.simulator.errors import Json, SimError
from app.simulator.generate import Chain, Turn, build_turn, error_without_status, failed_event
from app.simulator.knobs import TurnKnobs, turn_knobs
from app.simulator.playback import cut_point, play, stamp, until_gone
from app.simulator.request import (
    CreateRequest,
    create_fields,
    has_decimal_sampling,
    parse_create,
    stream_id_of,
)
from app.simulator.state import STATE, ConnectionInfo, SimState, lowered_headers

log = logging.getLogger(__name__)

INTERNAL_ERROR_REASON = b"internal error"


async def handle_websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=state.options.max_message_bytes, autoping=True)
    if not ws.can_prepare(request).ok:
        return errors.websocket_upgrade_required().http_response({"Upgrade": "websocket"})
    conn_id = f"ws_{secrets.token_hex(8)}"
    headers = lowered_headers(request)
    state.log.record("handshake", conn_id, request, headers, None)
    refusal = await _handshake_refusal(request, state)
    if refusal is not None:
        return refusal
    await ws.prepare(request)
    info = ConnectionInfo(conn_id, time.time())
    transport = request.transport
    if transport is not None:
        info.drop = transport.abort
    state.connections[conn_id] = info
    state.sockets.add(ws)
    try:
        await UpstreamSocket(state, info, ws, request, headers).serve()
    finally:
        del state.connections[conn_id]
    return ws


async def _handshake_refusal(request: web.Request, state: SimState) -> web.StreamResponse | None:
    """Handshake faults (armed first, then run-wide), then the bearer check."""
    options = state.options
    if options.handshake_delay_ms:
        await asyncio.sleep(options.handshake_delay_ms / 1000)
    fault = state.handshake_faults.take() or options.handshake_fault
    if fault == faults.HANDSHAKE_HANG:
        await until_gone(request.transport)
        return web.Response(status=504)  # nobody is listening any more
    if fault is not None:
        retry = {"Retry-After": "1"} if fault == "429" else None
        return errors.refusal(int(fault), bearer_key(request)).http_response(retry)
    err = auth_error(request, options)
    return None if err is None else err.http_response()


class UpstreamSocket:
    def __init__(
        self,
        state: SimState,
        info: ConnectionInfo,
        ws: web.WebSocketResponse,
        request: web.Request,
        headers: dict[str, str],
    ) -> None:
        self._state = state
        self._options = state.options
        self._info = info
        self._ws = ws
        self._request = request
        self._headers = headers
        self._queue: asyncio.Queue[Json | SimError] = asyncio.Queue()
        self._in_flight_stream_id: str | None = None

    async def serve(self) -> None:
        worker = asyncio.create_task(self._work())
        watchdog = asyncio.create_task(self._age_limit(worker))
        try:
            async for message in self._ws:
                self._arrive(message)
        finally:
            worker.cancel()
            watchdog.cancel()
            await asyncio.gather(worker, watchdog, return_exceptions=True)

    def _arrive(self, message: WSMessage) -> None:
        """Log a frame the moment it arrives, and queue it for the worker."""
        if message.type is WSMsgType.BINARY:
            self._log(message.data.decode("utf-8", "replace"))
            self._queue.put_nowait(errors.invalid_json("binary frames are not accepted"))
            return
        if message.type is not WSMsgType.TEXT:
            return
        try:
            frame = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            self._log(message.data)
            self._queue.put_nowait(errors.invalid_json("a text frame must hold one JSON object"))
            return
        self._log(frame)
        if isinstance(frame, dict):
            self._queue.put_nowait(frame)
        else:
            self._queue.put_nowait(errors.invalid_json("a text frame must hold one JSON object"))

    def _log(self, body: object) -> None:
        self._state.log.record("request", self._info.id, self._request, self._headers, body)

    async def _work(self) -> None:
        try:
            while await self._answer(await self._queue.get()):
                pass
        except ConnectionError:
            return  # the client went away while we were sending
        except Exception:
            log.exception("simulator: a turn failed unexpectedly")
            await self._ws.close(code=WSCloseCode.INTERNAL_ERROR, message=INTERNAL_ERROR_REASON)

    async def _answer(self, item: Json | SimError) -> bool:
        """Answer one queued frame; False when the connection has ended."""
        if isinstance(item, SimError):
            await self._send(item.ws_frame())
            return True
        fields = create_fields(item)
        stream_id = stream_id_of(fields)
        self._in_flight_stream_id = stream_id
        try:
            return await self._turn(item, fields, stream_id)
        finally:
            self._in_flight_stream_id = None

    async def _turn(self, frame: Json, fields: Json, stream_id: str | None) -> bool:
        try:
            if frame.get("type") != "response.create":
                raise errors.unknown_event_type(frame.get("type"))
            if self._options.decimal_close and has_decimal_sampling(fields):
                await self._ws.close()  # fault 1: code 1000, empty reason, no events at all
                return False
            req = parse_create(fields, websocket=True)
            knobs = turn_knobs(
                req.metadata,
                self._options,
                fault_key="sim_fault",
                allowed=faults.TURN_FAULTS,
                default_fault=self._state.default_turn_fault,
            )
            if knobs.fault == faults.SILENT_CLOSE:
                await self._ws.close()
                return False
            if knobs.fault == faults.CONNECTION_LIMIT:
                await self._close_at_limit(stream_id)
                return False
            prev = self._previous(req.previous_response_id, forget=knobs.fault == faults.FORGET)
            turn = build_turn(req, prev, now=time.time(), shaping=knobs.shaping)
        except SimError as err:
            self._evict(fields.get("previous_response_id"))
            await self._send(err.ws_frame(stream_id))
            return True
        return await self._play(turn, req, knobs)

    def _previous(self, response_id: str | None, *, forget: bool) -> Chain | None:
        """The chain `response_id` names: this connection's last response, or a stored one."""
        if response_id is None:
            return None
        if forget:
            self._evict(response_id)
        else:
            last = self._info.last
            if last is not None and last.response_id == response_id:
                return last
            stored = self._state.store.get(response_id)
            if stored is not None:
                return stored
        raise errors.previous_response_not_found(response_id)

    def _evict(self, response_id: object) -> None:
        """A failed continuation of the cached response evicts it, as OpenAI does."""
        last = self._info.last
        if last is not None and last.response_id == response_id:
            self._info.last = None

    async def _play(self, turn: Turn, req: CreateRequest, knobs: TurnKnobs) -> bool:
        if knobs.fault not in faults.MID_RESPONSE_FAULTS:
            await self._play_events(turn.events, knobs)
            self._info.last = turn.chain
            self._info.turns += 1
            if req.store:
                self._state.store.put(turn.chain)
            return True
        cut = cut_point(turn.events, knobs.fault_after)
        await self._play_events(turn.events[:cut], knobs)
        if knobs.fault == faults.DROP:
            if self._request.transport is not None:
                self._request.transport.abort()  # no close frame: the client sees 1006
            return False
        if knobs.fault == faults.CLOSE_1011:
            await self._ws.close(code=WSCloseCode.INTERNAL_ERROR, message=INTERNAL_ERROR_REASON)
            return False
        if knobs.fault == faults.HANG:
            await asyncio.Event().wait()  # until the client leaves and the reader cancels us
        self._evict(req.previous_response_id)
        if knobs.fault == faults.ERROR_NO_STATUS:
            await self._send(error_without_status(cut, req.stream_id))
        else:
            await self._send(failed_event(turn, cut, req.stream_id))
        return True

    async def _play_events(self, events: list[Json], knobs: TurnKnobs) -> None:
        if knobs.terminal_only:
            events = events[-1:]
        await play(events, self._send, delay_s=knobs.delay_s)

    async def _send(self, event: Json) -> None:
        stamp(event, self._options.sent_at)
        await self._ws.send_frame(orjson.dumps(event), WSMsgType.TEXT)

    async def _age_limit(self, worker: asyncio.Task[None]) -> None:
        """At the connection's age limit: cut what is in flight, say why, close (1000)."""
        deadline = self._info.opened_at + self._options.max_connection_seconds
        await asyncio.sleep(max(0.0, deadline - time.time()))
        stream_id = self._in_flight_stream_id
        worker.cancel()
        await asyncio.wait({worker})
        if not self._ws.closed:
            try:
                await self._close_at_limit(stream_id)
            except ConnectionError:
                pass

    async def _close_at_limit(self, stream_id: str | None) -> None:
        await self._send(errors.connection_limit_reached().ws_frame(stream_id))
        await self._ws.close()
