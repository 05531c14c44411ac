"""One customer socket: the per-socket rules of CONTRACT.md §3 as an explicit state machine.

    IDLE --accepted response.create--> IN_FLIGHT --terminal event / error--> IDLE
    IDLE | IN_FLIGHT --close (either side), revocation, drain--> CLOSING --> CLOSED

`_transition` is the one place that changes state. The client reader runs in the handler's task;
each upstream socket has one reader task that forwards events in order (the hot path).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from app import ids, metrics, turnpolicy
from app.clientlink import ClientLink
from app.errors import Code, GatewayError
from app.keystore import Principal, secret_status
from app.ledger.rows import SocketClosed, SocketOpened, TurnRecord
from app.memory import ConversationMemory, as_items
from app.node import Node
from app.protocol import ClientFrame, Ignored, parse_client_frame, stream_id_of
from app.rawpath import RawForwarder
from app.routing import check_route
from app.turn import Turn
from app.turnpolicy import INSPECTED, NOT_FOUND, TERMINAL, Action, Chain, unchained_input
from app.upstream import (
    UpstreamConn,
    UpstreamHandshakeError,
    UpstreamHTTPError,
    open_upstream,
    stream_http,
)
from app.usage import charge

log = logging.getLogger("gateway.session")

# The events whose handling awaits (the turn's end, retries): never on the raw path.
_AWAITED_BYTES = frozenset(kind.encode() for kind in (*TERMINAL, "error"))
_TYPE_PREFIX = '{"type":"'
_TYPE_BYTES = _TYPE_PREFIX.encode()

# The socket limits close at a turn boundary with 1000, the code OpenAI closes its own sockets
# with at its 60-minute limit (UPSTREAM.md): clients written for OpenAI's WebSocket mode already
# open a new socket for the next turn after it. 1001 stays the node's shutdown alone (CONTRACT.md
# §6), so a dashboard tells a drain from these; the reason (and the ledger) tells them apart.
LIMIT_CLOSE_CODE = 1000
IDLE_REASON = "idle timeout"
LIFETIME_REASON = "socket lifetime reached"
DRAIN_REASON = "server shutting down"


class State(enum.Enum):
    IDLE = "idle"
    IN_FLIGHT = "in_flight"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED = {
    State.IDLE: {State.IN_FLIGHT, State.CLOSING},
    State.IN_FLIGHT: {State.IDLE, State.CLOSING},
    State.CLOSING: {State.CLOSED},
    State.CLOSED: set(),
}


class IllegalTransition(RuntimeError):
    pass


def now_utc() -> datetime:
    return datetime.now(UTC)


def event_type(text: str) -> str | None:
    """The event's type without parsing it when the frame starts with its `type` (the norm)."""
    if text.startswith(_TYPE_PREFIX):
        end = text.find('"', 9)
        if end > 0:
            return text[9:end]
    try:
        value = orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def with_stream_id(text: str, stream_id: str) -> str:
    """One event (a JSON object) with `"stream_id":<stream_id>` (already JSON) added at its top
    level: spliced in before its closing brace, never parsed or serialized again."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        return text  # not an object: passed on as it came, for the checks to judge
    if '"' in body:  # it has members: the lane follows them
        return f'{body[:-1]},"stream_id":{stream_id}}}'
    return f'{{"stream_id":{stream_id}}}'


class Session:
    def __init__(
        self,
        node: Node,
        ws: web.WebSocketResponse,
        principal: Principal,
        socket_id: str,
        model: str | None,
    ) -> None:
        self.node = node
        self.principal = principal
        self.id = socket_id
        self.model = model  # locked model, `openai/<model>`
        self.state = State.IDLE
        self.turn: Turn | None = None
        self.turns = 0
        self.opened_at = now_utc()
        self.upstream: UpstreamConn | None = None
        self._upstream_reader: asyncio.Task[None] | None = None
        self.last_upstream_close: tuple[int | None, str | None] = (None, None)
        self.closed_by: Literal["client", "gateway"] = "client"  # as recorded, once closed
        self.close_code: int | None = None
        self.close_reason = ""
        self.client = ClientLink(
            ws,
            max_pending=node.settings.max_pending_bytes,
            socket_id=socket_id,
            key_prefix=principal.key_prefix,
            close_session=self.close,
        )
        self.memory = ConversationMemory(node.settings.context_bytes, node.memory_budget)
        self._last_upstream_frame = time.perf_counter()
        self._close_after_turn: tuple[int, str] | None = None
        # The last client frame or the end of the last turn (the idle timeout), and one timer
        # for both socket limits, re-armed when it fires (never per frame).
        self._last_activity = self._opened_monotonic = time.monotonic()
        self._limits: asyncio.TimerHandle | None = None
        self._limits_close: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._silence: asyncio.Task[None] | None = None
        # The current upstream socket's raw forwarder (app/rawpath.py). Kept here, not on the
        # UpstreamConn: the forwarder's sink holds the conn, so conn.raw would be a cycle.
        self.raw: RawForwarder | None = None

    @property
    def ws(self) -> web.WebSocketResponse:
        return self.client.ws

    # -- state ----------------------------------------------------------------------------------

    def _transition(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {new.value}")
        self.state = new
        if new is State.IDLE:
            self._last_activity = time.monotonic()  # an idle period starts when a turn ends

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node.id,
            "key_prefix": self.principal.key_prefix,
            "team_id": self.principal.team_id,
            "model": self.model,
            "opened_at": self.opened_at.isoformat(),
            "turns": self.turns,
        }

    # -- the client side ------------------------------------------------------------------------

    async def run(self) -> None:
        """Read client frames until the socket ends; always leaves a closed, recorded session."""
        self.node.ledger.record(
            SocketOpened(
                socket_id=self.id,
                node=self.node.id,
                key_id=self.principal.key_id,
                key_prefix=self.principal.key_prefix,
                team_id=self.principal.team_id,
                model=self.model,
                opened_at=self.opened_at,
            )
        )
        self._check_limits()  # arms the socket limits' timer
        try:
            async with self.client.reading():
                await self._read_client()
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.debug("client socket %s failed: %s", self.id, exc)
        finally:
            await self._finish()

    async def _read_client(self) -> None:
        client = self.client
        while True:
            msg = await client.receive()
            self._last_activity = time.monotonic()
            if msg.type is WSMsgType.TEXT:
                # The socket hands text frames over undecoded (`decode_text=False`): the size is
                # judged before the UTF-8, so a frame over the limit closes 1009 whatever it
                # holds. aiohttp lets a compressed frame of limit + 1 bytes through (it checks
                # `>` there and `>=` for plain frames), and decoded it first: 1007.
                data: bytes = msg.data
                if len(data) > self.node.settings.max_frame_bytes:
                    await self.close(1009, "frame larger than the limit")
                    return
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    await self.close(1007, "Invalid UTF-8 text message")
                    return
                await self.on_text(text)
            elif msg.type is WSMsgType.BINARY:
                if len(msg.data) > self.node.settings.max_frame_bytes:
                    await self.close(1009, "frame larger than the limit")
                    return
                await self.refuse(
                    GatewayError(
                        Code.INVALID_RESPONSE_CREATE,
                        "Expected a text frame holding one JSON object, got a binary frame.",
                    )
                )
            elif msg.type is WSMsgType.CLOSE:  # the client's close frame; aiohttp answered it
                client.peer_closed(int(msg.data), str(msg.extra or ""))
                return
            elif msg.type is WSMsgType.ERROR:
                # aiohttp closed it for a bad frame (1009 too large, 1007 bad UTF-8, 1002); any
                # other error is the connection failing under it: the client's side.
                if isinstance(msg.data, aiohttp.WebSocketError):
                    client.refused(msg.data)
                return
            else:  # CLOSING (this gateway's own close, handed over), CLOSED (connection gone)
                return
            if self.state in (State.CLOSING, State.CLOSED):
                return

    async def on_text(self, data: str) -> None:
        """Checks 1-8 of CONTRACT.md §3 in order, then the turn goes upstream (check 9)."""
        try:
            frame = parse_client_frame(data)  # checks 1-4
            team = self.node.view.view.teams.get(self.principal.team_id)
            check_route(self.node, team, frame.model)  # 5
            if self.state is State.IN_FLIGHT:  # 6
                raise GatewayError(Code.RESPONSE_ALREADY_IN_FLIGHT)
            if self.model is not None and frame.model != self.model:  # 7
                raise GatewayError(
                    Code.MODEL_MISMATCH,
                    f"This socket is locked to {self.model}; got {frame.model}.",
                    param="model",
                )
            limit = team.limits.responses_per_minute_per_key if team else 0
            if not await self.node.store.allow_response(self.principal.key_id, limit):  # 8
                raise GatewayError(Code.RATE_LIMIT_EXCEEDED)
        except Ignored:
            return
        except GatewayError as err:
            await self.refuse(err, stream_id_of(data), model=_model_of(err, data))
            return
        if self.state is not State.IDLE:  # closed while waiting on the rate limit
            return
        self._accept(frame)

    def _accept(self, frame: ClientFrame) -> None:
        self.model = frame.model
        self.turns += 1
        turn = Turn(frame)
        self.turn = turn
        self._transition(State.IN_FLIGHT)
        turn.task = asyncio.create_task(self._start_turn(turn), name=f"turn-{self.id}")

    async def refuse(
        self, err: GatewayError, stream_id: Any = None, model: str | None = None
    ) -> None:
        """An error frame for a refused frame; the socket stays open (or closes, per the code)."""
        metrics.count_error(err.code)
        self._record(model=model, received_at=now_utc(), accepted=False, error_code=str(err.code))
        await self._send_error(err, stream_id)

    def _record(self, **fields: Any) -> None:
        """One ledger row for a `response.create` received on this socket."""
        self.node.ledger.record(
            TurnRecord(
                socket_id=self.id,
                node=self.node.id,
                key_id=self.principal.key_id,
                key_prefix=self.principal.key_prefix,
                team_id=self.principal.team_id,
                transport="ws",
                **fields,
            )
        )

    async def _send_error(self, err: GatewayError, stream_id: Any = None) -> None:
        await self.client.send(err.ws_frame(stream_id))
        if err.spec.close_code is not None:
            await self.close(err.spec.close_code, err.code)

    def watch_outbound(self, transport: asyncio.BaseTransport | None) -> None:
        """The client's transport, for the slow-client guard (app/clientlink.py)."""
        self.client.watch(transport)

    async def close(self, code: int, reason: str = "") -> None:
        """The gateway closes the client socket, from any task: CLOSING, then the close handshake
        (`ClientLink.close`, which hands it to the reader when that waits for a frame)."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self._transition(State.CLOSING)
        await self.client.close(code, reason)

    # -- turns ----------------------------------------------------------------------------------

    async def _start_turn(self, turn: Turn) -> None:
        try:
            conn = await self._ensure_upstream()
        except UpstreamHandshakeError as exc:
            verdict = turnpolicy.on_handshake_failure(exc.detail)
            await self._end_turn(turn, verdict.status, error=verdict.error)
            return
        body = turn.frame.upstream_body()
        previous = turn.frame.previous_response_id
        if conn.served == 0 and previous is not None:
            # A new upstream socket has an empty cache: continue the chain from memory.
            items = unchained_input(self.memory.chain_for(previous), as_items(turn.frame.input))
            if items is not None:
                body["previous_response_id"] = None
                body["input"] = items
        await self._send_upstream(turn, conn, body)

    async def _send_upstream(self, turn: Turn, conn: UpstreamConn, body: dict[str, Any]) -> None:
        turn.conn = conn
        turn.sent_previous_id = body.get("previous_response_id")
        turn.sent_input = as_items(body.get("input")) or []
        self._last_upstream_frame = time.perf_counter()
        self._arm_watchdog()
        try:
            await conn.send(body)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass  # the upstream reader sees the close and ends the turn

    async def _ensure_upstream(self) -> UpstreamConn:
        conn = self.upstream
        settings = self.node.settings
        if conn is not None and conn.usable and conn.age < settings.upstream_max_age_seconds:
            return conn
        if conn is not None:
            self.upstream = self.raw = None
            if not conn.ws.closed:
                self.last_upstream_close = (1000, "replaced by the gateway at a turn boundary")
            await conn.close()
        team = self.node.view.view.teams.get(self.principal.team_id)
        credential = self.node.credential(team.upstream_credential) if team else None
        if not credential:
            raise UpstreamHandshakeError("no upstream credential on this node")
        conn = await self.node.pool.take(team.upstream_credential) if team else None
        if conn is None:  # no warm one: pay the handshake
            conn = await open_upstream(
                self.node.upstream_http,
                settings.upstream_ws_url,
                credential,
                timeout=settings.upstream_handshake_seconds,
                max_msg_size=settings.upstream_max_frame_bytes,
            )
        self.upstream = conn
        raw = None
        if settings.raw_forwarding:
            raw = RawForwarder.install(
                conn.ws, functools.partial(self.raw_frame, conn), self.raw_write
            )
        self.raw = raw
        self._upstream_reader = asyncio.create_task(
            self._read_upstream(conn, raw), name=f"upstream-{self.id}"
        )
        return conn

    async def _end_turn(
        self,
        turn: Turn,
        status: str,
        *,
        error: GatewayError | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished turn, then (if the socket is open) tell the client and go IDLE."""
        if self.turn is not turn:
            return
        self.turn = None
        if self.state is State.IN_FLIGHT:
            self._transition(State.IDLE)
        if error is not None:
            metrics.count_error(error.code)
            await self._send_error(error, turn.frame.stream_id)
        self._record_turn(turn, status, response)
        if self._close_after_turn is not None and self.state is State.IDLE:
            await self.close(*self._close_after_turn)

    def _record_turn(self, turn: Turn, status: str, response: dict[str, Any] | None) -> None:
        duration = time.perf_counter() - turn.started
        model = turn.frame.model
        usage = response.get("usage") if response else None
        usage_fields = charge(self.node.view.view.catalog, model, self.principal.team_id, usage)
        metrics.responses(model, status).inc()
        metrics.RESPONSE_DURATION.observe(duration)
        tally = turn.tally
        tally.flush()
        ttfe = None if tally.first_event_at is None else tally.first_event_at - turn.started
        log.info(
            "response",
            extra={
                "socket_id": self.id,
                "key_prefix": self.principal.key_prefix,
                "model": model,
                "status": status,
                "response_id": turn.response_id,
                "duration_ms": round(duration * 1000, 1),
            },
        )
        self._record(
            model=model,
            received_at=turn.received_at,
            accepted=True,
            response_id=turn.response_id,
            status=status,
            previous_response_id=turn.frame.previous_response_id,
            retried=turn.retried,
            http_fallback=turn.http_fallback,
            memory_bound_exceeded=turn.memory_bound_exceeded,
            **usage_fields,
            ttfe_ms=None if ttfe is None else ttfe * 1000,
            duration_ms=duration * 1000,
        )
        self.node.store.update_session(self.id, self.info())  # the listing's model and turns

    # -- the upstream side (hot path) -----------------------------------------------------------

    def _arm_watchdog(self) -> None:
        """One timer per idle period, not one per frame (a timer per frame cost 20% of the
        hot path under load): it re-arms itself until the upstream has been silent too long."""
        if self._watchdog is None:
            idle = self.node.settings.upstream_idle_seconds
            self._watchdog = asyncio.get_running_loop().call_later(idle, self._watchdog_fired)

    def _watchdog_fired(self) -> None:
        self._watchdog = None
        turn = self.turn
        if turn is None or turn.conn is None or self.state is not State.IN_FLIGHT:
            return
        idle = self.node.settings.upstream_idle_seconds
        silent = time.perf_counter() - self._last_upstream_frame
        if silent < idle:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(idle - silent, self._watchdog_fired)
            return
        reason = f"upstream silent for {idle:g} s"
        self._silence = asyncio.create_task(
            self._upstream_lost(turn.conn, 1006, reason, abort=True), name=f"silent-{self.id}"
        )

    def raw_frame(
        self, conn: UpstreamConn, data: bytes, start: int, payload: int, end: int
    ) -> bool:
        """The raw hot path (app/rawpath.py): may the upstream text frame `data[start:end]` go to
        the client as it came? Yes if it is an event of the turn under way that needs nothing
        awaited (not a terminal event, not an error) and the client's buffer has room; it then
        goes out with the others of its read in `raw_write`. False: it takes aiohttp's path."""
        turn = self.turn
        if turn is None or turn.conn is not conn or not data.startswith(_TYPE_BYTES, payload):
            return False
        kind = data[payload + 9 : data.find(b'"', payload + 9, end)]
        if kind in _AWAITED_BYTES:
            return False
        client = self.client
        transport = client.transport
        if (  # ClientLink's room for it: its guard's test, inlined (a call per frame costs)
            transport is None
            or transport.is_closing()
            or self.state is not State.IN_FLIGHT
            or client.ws.closed  # a close frame went out (aiohttp's answer to the client's)
            or transport.get_write_buffer_size() + (end - start) > client.max_pending
        ):
            return False
        if kind == b"response.created":
            try:
                turn.response_id = _response_id(orjson.loads(data[payload:end]))
            except orjson.JSONDecodeError:
                return False
        return True

    def raw_write(self, frames: bytes, count: int, received: float) -> None:
        """The frames `raw_frame` took from one read, to the client in one write."""
        self._last_upstream_frame = received
        transport = self.client.transport
        turn = self.turn
        assert transport is not None and turn is not None  # raw_frame checked, nothing since
        transport.write(frames)
        turn.tally.forwarded(received, count)

    async def _read_upstream(self, conn: UpstreamConn, raw: RawForwarder | None = None) -> None:
        ws = conn.ws
        handled = False
        while True:
            if handled and raw is not None and raw.pending:
                raw.pending -= 1  # the last message is done with: raw frames may pass again
            handled = True
            try:
                msg = await ws.receive()
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                await self._upstream_lost(conn, 1006, "upstream connection dropped")
                return
            if msg.type is WSMsgType.TEXT:
                # The hot path is app/rawpath.py; frames here are the few it hands on.
                if not await self._on_upstream_text(conn, msg.data):
                    return
            elif msg.type is WSMsgType.BINARY:
                self._last_upstream_frame = time.perf_counter()
                await self.client.send(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                await self._upstream_lost(conn, int(msg.data), str(msg.extra or ""))
                return
            else:  # CLOSING, CLOSED, ERROR: the connection went without a close frame
                code = ws.close_code if ws.close_code and ws.close_code != 1000 else 1006
                reason = "upstream connection dropped"
                if msg.type is WSMsgType.ERROR:
                    reason = f"upstream connection failed ({type(msg.data).__name__})"
                await self._upstream_lost(conn, code, reason)
                return

    async def _on_upstream_text(self, conn: UpstreamConn | None, text: str) -> bool:
        """Forward one upstream event; False when the client is gone."""
        received = self._last_upstream_frame = time.perf_counter()
        turn = self.turn
        kind = event_type(text)
        if kind in INSPECTED:
            handled = await self._inspect(conn, turn, kind, text, received)
            if handled is not None:
                return handled
        return await self._deliver(turn, text, received)

    async def _deliver(self, turn: Turn | None, text: str, received: float) -> bool:
        """An event to the client, then counted (as `raw_write` does for the raw path)."""
        if not await self.client.send(text):
            return False
        if turn is not None:
            turn.tally.forwarded(received)
        else:
            metrics.OVERHEAD.observe(time.perf_counter() - received)
        return True

    async def _inspect(
        self,
        conn: UpstreamConn | None,
        turn: Turn | None,
        kind: str | None,
        text: str,
        received: float,
    ) -> bool | None:
        """The few events that matter to the turn. None: forward it as usual."""
        event = orjson.loads(text)
        if kind == "response.created":
            if turn is not None:
                turn.response_id = _response_id(event)
            return None
        if kind in TERMINAL:
            if turn is None:
                return None
            found = event.get("response")
            response: dict[str, Any] = found if isinstance(found, dict) else {}
            turn.response_id = _response_id(event) or turn.response_id
            if not await self._deliver(turn, text, received):
                return False
            verdict = turnpolicy.on_terminal(kind, response)
            output = response.get("output")
            self._settle_memory(turn, verdict.chain, output if isinstance(output, list) else [])
            await self._end_turn(turn, verdict.status, response=response)
            return True
        return await self._on_upstream_error(conn, turn, event, received)

    async def _on_upstream_error(
        self,
        conn: UpstreamConn | None,
        turn: Turn | None,
        event: dict[str, Any],
        received: float,
    ) -> bool | None:
        found = event.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        code = error.get("code")
        previous = turn.frame.previous_response_id if turn is not None else None
        verdict = turnpolicy.on_error(
            code,
            None if turn is None else turn.facts(),
            over_websocket=conn is not None,
            remembered=self.memory.chain_for(previous) is not None,
        )
        if verdict.action is Action.SWALLOW:
            if conn is not None:
                conn.stale = True  # the next turn opens a new upstream socket
            return True
        if verdict.action is Action.RETRY:
            assert turn is not None and conn is not None
            await self._retry(conn, turn)
            return True
        patched = "status" not in event
        if patched:  # Codex hangs on an error without status (CONTRACT.md §3)
            event["status"] = turnpolicy.error_status(error)
        if turn is None:
            return await self.client.send(orjson.dumps(event).decode()) if patched else None
        self._settle_memory(turn, verdict.chain)
        if code == NOT_FOUND and self.memory.was_dropped(previous):
            turn.memory_bound_exceeded = True
        ok = await self._deliver(turn, orjson.dumps(event).decode(), received)
        metrics.count_error(str(code or "upstream_error"))
        await self._end_turn(turn, verdict.status)
        return ok

    def _settle_memory(self, turn: Turn, chain: Chain, output: list[Any] | None = None) -> None:
        if chain is Chain.FORGET:
            self.memory.forget(turn.frame.previous_response_id)
        elif chain is Chain.EXTEND and turn.response_id:
            self.memory.record(
                turn.sent_previous_id, turn.sent_input, turn.response_id, output or []
            )

    async def _retry(self, conn: UpstreamConn, turn: Turn) -> None:
        """The one retry of a `previous_response_not_found`, with the remembered chain."""
        own = turn.frame.input
        items = unchained_input(
            self.memory.chain_for(turn.frame.previous_response_id),
            own if isinstance(own, list) else None,
        )
        assert items is not None  # turnpolicy.may_retry
        turn.retried = True
        metrics.UPSTREAM_RETRIES_TOTAL.labels(reason=NOT_FOUND).inc()
        body = turn.frame.upstream_body(previous_response_id=None, input=items)
        await self._send_upstream(turn, conn, body)

    async def _upstream_lost(
        self, conn: UpstreamConn, code: int, reason: str, *, abort: bool = False
    ) -> None:
        """The upstream socket ended (close frame, drop or silence)."""
        if conn.closing:
            return  # the gateway closed it (replaced, or the client left)
        metrics.count_close("upstream", code)
        self.last_upstream_close = (code, reason)
        if self.upstream is conn:
            self.upstream = self.raw = None
        turn = self.turn
        if turn is not None and turn.conn is conn and self.state is State.IN_FLIGHT:
            verdict = turnpolicy.on_close(
                code, reason, turn.facts(), fallback_enabled=self.node.settings.http_fallback
            )
            if verdict.action is Action.HTTP_FALLBACK:
                await self._http_fallback(turn, code, reason)
            else:
                await self._end_turn(turn, verdict.status, error=verdict.error)
        if abort:  # after the client has its answer: a silent upstream may not answer a close
            await conn.close()

    async def _http_fallback(self, turn: Turn, code: int, reason: str) -> None:
        """Serve the same turn over `POST /responses` (SSE), events sent as WebSocket frames."""
        turn.conn = None
        turn.http_fallback = True
        metrics.UPSTREAM_RETRIES_TOTAL.labels(reason="http_fallback").inc()
        body = turn.frame.upstream_body()
        del body["type"]
        # `stream_id` is WebSocket-only, no field of `POST /responses`: the gateway puts it on
        # every event of the turn itself, as OpenAI's WebSocket would (CONTRACT.md §3).
        stream_id = body.pop("stream_id", None)
        stamp = None if stream_id is None else orjson.dumps(stream_id).decode()
        previous = turn.frame.previous_response_id
        if previous is not None:
            items = unchained_input(self.memory.chain_for(previous), as_items(turn.frame.input))
            if items is None:
                verdict = turnpolicy.on_unremembered_fallback(previous)
                await self._end_turn(turn, verdict.status, error=verdict.error)
                return
            body["previous_response_id"] = None
            body["input"] = items
        turn.sent_previous_id = None
        turn.sent_input = as_items(body.get("input")) or []
        team = self.node.view.view.teams.get(self.principal.team_id)
        credential = (self.node.credential(team.upstream_credential) if team else None) or ""
        settings = self.node.settings
        try:
            async for data in stream_http(
                self.node.upstream_http,
                settings.openai_base_url,
                credential,
                body,
                timeout=settings.upstream_handshake_seconds,
            ):
                if stamp is not None:
                    data = with_stream_id(data, stamp)
                if self.turn is not turn or not await self._on_upstream_text(None, data):
                    return
        except UpstreamHTTPError as exc:
            event = {"type": "error", "status": exc.status, "error": exc.body["error"]}
            if stream_id is not None:
                event["stream_id"] = stream_id
            await self._on_upstream_text(None, orjson.dumps(event).decode())
        if self.turn is turn:  # the stream ended without a terminal event
            await self._end_turn(turn, "error", error=turnpolicy.closed_error(code, reason))

    # -- lifecycle ------------------------------------------------------------------------------

    async def expel(self, code: Code) -> None:
        """The key was revoked or expired, or the team disabled: error frame, then 1008."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        turn = self.turn
        metrics.count_error(code)
        self._abort_turn("error")
        await self._send_error(GatewayError(code), turn.frame.stream_id if turn else None)

    def principal_status(self) -> Code | None:
        """Checked about 4 times a second by the node: revocation, expiry, team disable."""
        if self.state in (State.CLOSING, State.CLOSED):
            return None
        team = self.node.view.view.teams.get(self.principal.team_id)
        if team is not None and not team.active:
            return Code.TEAM_DISABLED
        key = self.node.key_cache.get(self.principal.key_id)
        if key is None:
            return None
        status = secret_status(key, self.principal.secret_hash, now_utc())
        if status is Code.INVALID_API_KEY:
            return Code.API_KEY_EXPIRED
        return status

    def _abort_turn(self, status: str) -> None:
        turn = self.turn
        if turn is None:
            return
        self.turn = None
        if turn.task is not None and not turn.task.done():
            turn.task.cancel()
        if self.state is State.IN_FLIGHT:
            self._transition(State.IDLE)
        self._record_turn(turn, status, None)

    async def drain(self) -> None:
        """SIGTERM: close at once when idle, right after the terminal event when in flight."""
        self._close_after_turn = (1001, DRAIN_REASON)
        if self.state is State.IDLE:
            await self.close(1001, DRAIN_REASON)

    async def drain_deadline(self) -> None:
        if self.state is State.IN_FLIGHT:
            turn = self.turn
            metrics.count_error(Code.SERVER_SHUTTING_DOWN)
            self._abort_turn("error")
            await self._send_error(
                GatewayError(Code.SERVER_SHUTTING_DOWN),
                turn.frame.stream_id if turn else None,
            )

    # -- socket limits: idle timeout, lifetime --------------------------------------------------

    def _check_limits(self) -> str | None:
        """Why the socket must close now (idle too long, lifetime reached), else None.

        When nothing is due it re-arms the one timer for the nearest deadline, as the upstream
        watchdog does: a client frame or a turn's end only stores a time. A response in flight is
        never cut: the idle deadline counts from the end of the turn, and a lifetime reached
        mid-response closes the socket right after its terminal event (like a drain).
        """
        self._limits = None
        if self.state is not State.IDLE and self.state is not State.IN_FLIGHT:
            return None
        settings = self.node.settings
        now = time.monotonic()
        waits: list[float] = []
        if settings.max_socket_seconds > 0:
            left = self._opened_monotonic + settings.max_socket_seconds - now
            if left <= 0:
                if self.state is State.IDLE:
                    return LIFETIME_REASON
                if self._close_after_turn is None:
                    self._close_after_turn = (LIMIT_CLOSE_CODE, LIFETIME_REASON)
                return None
            waits.append(left)
        if settings.idle_socket_seconds > 0:
            left = settings.idle_socket_seconds
            if self.state is State.IDLE:
                left += self._last_activity - now
                if left <= 0:
                    return IDLE_REASON
            waits.append(left)
        if waits:
            loop = asyncio.get_running_loop()
            self._limits = loop.call_later(min(waits), self._limits_fired)
        return None

    def _limits_fired(self) -> None:
        if self._check_limits() is not None:
            self._limits_close = asyncio.create_task(
                self._close_for_limits(), name=f"limits-{self.id}"
            )

    async def _close_for_limits(self) -> None:
        reason = self._check_limits()  # again: a frame may have come in since the timer fired
        if reason is not None:
            await self.close(LIMIT_CLOSE_CODE, reason)

    async def _finish(self) -> None:
        """After the client loop: cancel the turn, record the socket, close upstream.

        Everything is recorded before the one await: aiohttp may cancel this task when the
        client's connection is lost, and a cancelled task must not lose its ledger row.
        """
        if self.state is not State.CLOSING and self.state is not State.CLOSED:
            self._transition(State.CLOSING)
        self._abort_turn("cancelled")
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._limits is not None:
            self._limits.cancel()
        # Nothing the session holds may point back at it once it ends, so that it, its sockets
        # and all they hold are freed by reference counting, not left to the cyclic collector
        # (whose full passes over that garbage held the loop for 90-140 ms under load): the
        # reader task's CancelledError holds its frame (the session), the forwarder holds the
        # session's methods, and the client link its `close`.
        self.client.detach()
        reader, self._upstream_reader = self._upstream_reader, None
        if reader is not None:
            reader.cancel()
        conn, self.upstream, self.raw = self.upstream, None, None
        if conn is not None and not conn.ws.closed:
            self.last_upstream_close = (1000, "closed by the gateway with the client socket")
        self.memory.clear()
        self._transition(State.CLOSED)
        self.closed_by, code, reason = self.client.outcome()
        self.close_code, self.close_reason = code, reason
        metrics.count_close(self.closed_by, code)
        self.node.ledger.record(
            SocketClosed(
                socket_id=self.id,
                closed_at=now_utc(),
                closed_by=self.closed_by,
                close_code=code,
                close_reason=reason,
                upstream_close_code=self.last_upstream_close[0],
                upstream_close_reason=self.last_upstream_close[1],
                turns=self.turns,
                model=self.model,
            )
        )
        if conn is not None:
            await conn.close()


def _response_id(event: dict[str, Any]) -> str | None:
    response = event.get("response")
    if isinstance(response, dict):
        value = response.get("id")
        return value if isinstance(value, str) else None
    return None


def _model_of(err: GatewayError, data: str) -> str | None:
    """The model a refused frame named, when it is a valid one (for the ledger)."""
    if err.code is Code.INVALID_RESPONSE_CREATE:
        return None
    try:
        return parse_client_frame(data).model
    except (GatewayError, Ignored):
        return None


def new_socket_id() -> str:
    return "ws_" + ids.uuid4().hex
