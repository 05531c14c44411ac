"""One customer socket: the per-socket rules of CONTRACT.md §3 as an explicit state machine.

    IDLE --accepted response.create--> IN_FLIGHT --terminal event / error--> IDLE
    IDLE | IN_FLIGHT --close (either side), revocation, drain--> CLOSING --> CLOSED

`_transition` is the one place that changes state. The client reader runs in the handler's task
and checks each frame in the contract's order (`on_text`); an accepted turn goes to the session's
`UpstreamLink` (app/upstreamlink.py), which forwards its events (the hot path), judges the few
that end or redirect it by app/turnpolicy.py, and hands the turn back to `end_turn`. Every write
and close to the client goes through the `ClientLink` (app/clientlink.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
from aiohttp import WSMsgType, web

from app import ids, logs, metrics
from app.auth.principal import Principal
from app.clientlink import ClientLink
from app.errors import Code, GatewayError
from app.ledger.rows import SocketClosed, SocketOpened, TurnRecord
from app.node import Node
from app.protocol import ClientFrame, Ignored, parse_client_frame, stream_id_of
from app.routing import check_route
from app.turn import Turn
from app.upstreamlink import UpstreamLink
from app.usage import charge

log = logging.getLogger("gateway.session")

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

    # By identity, in C: members are singletons, and Enum's own hash (of the name, in Python)
    # ran four times a turn in `_transition`'s lookups.
    __hash__ = object.__hash__


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


class Session:
    __slots__ = (
        "__weakref__",
        "_close_after_turn",
        "_last_activity",
        "_limits",
        "_limits_close",
        "_opened_monotonic",
        "client",
        "close_code",
        "close_reason",
        "closed_by",
        "id",
        "in_flight",
        "model",
        "node",
        "opened_at",
        "principal",
        "state",
        "turn",
        "turns",
        "upstream",
    )

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
        self.in_flight = False  # state is IN_FLIGHT, for the upstream link's hot path
        self.turn: Turn | None = None
        self.turns = 0
        self.opened_at = now_utc()
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
        self.upstream: UpstreamLink | None = UpstreamLink(
            self, node, self.client, principal.team_id
        )
        self._close_after_turn: tuple[int, str] | None = None
        # The last client frame or the end of the last turn (the idle timeout), and the node's
        # slot of time the next check of both socket limits is in (never one per frame).
        self._last_activity = self._opened_monotonic = time.monotonic()
        self._limits: int | None = None  # `DueSlots`' key
        self._limits_close: asyncio.Task[None] | None = None

    @property
    def ws(self) -> web.WebSocketResponse:
        return self.client.ws

    # -- state ----------------------------------------------------------------------------------

    def _transition(self, new: State) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {new.value}")
        self.state = new
        self.in_flight = new is State.IN_FLIGHT
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
        client, ws = self.client, self.client.ws
        # The loop that reads client frames is here, not in a coroutine of its own: an idle
        # socket keeps every frame of the chain it waits in for its whole life.
        try:
            async with client.reading():
                while True:
                    # ClientLink.close hands a close over to the reader parked here.
                    client.parked = True
                    msg = await ws.receive()
                    client.parked = False
                    self._last_activity = time.monotonic()
                    if msg.type is WSMsgType.TEXT:
                        # The socket hands text frames over undecoded (`decode_text=False`):
                        # the size is judged before the UTF-8, so a frame over the limit closes
                        # 1009 whatever it holds. aiohttp lets a compressed frame of limit + 1
                        # bytes through (it checks `>` there and `>=` for plain frames), and
                        # decoded it first: 1007.
                        data: bytes = msg.data
                        if len(data) > self.node.settings.max_frame_bytes:
                            await self.close(1009, "frame larger than the limit")
                            return
                        try:
                            text = data.decode("utf-8")
                        except UnicodeDecodeError:
                            await self.close(1007, "Invalid UTF-8 text message")
                            return
                        del data
                        await self.on_text(text)
                        del text
                    elif not await self._other_frame(msg):
                        return
                    # An idle socket waits in `receive` for weeks: it keeps no frame it read.
                    del msg
                    if self.state in (State.CLOSING, State.CLOSED):
                        return
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.debug("client socket %s failed: %s", self.id, exc)
        finally:
            await self._finish()

    async def _other_frame(self, msg: aiohttp.WSMessage) -> bool:
        """A client message other than a text frame; False when the socket is done."""
        if msg.type is WSMsgType.BINARY:
            if len(msg.data) > self.node.settings.max_frame_bytes:
                await self.close(1009, "frame larger than the limit")
                return False
            await self.refuse(
                GatewayError(
                    Code.INVALID_RESPONSE_CREATE,
                    "Expected a text frame holding one JSON object, got a binary frame.",
                )
            )
            return True
        if msg.type is WSMsgType.CLOSE:  # the client's close frame; aiohttp answered it
            self.client.peer_closed(int(msg.data), str(msg.extra or ""))
        elif msg.type is WSMsgType.ERROR:
            # aiohttp closed it for a bad frame (1009 too large, 1007 bad UTF-8, 1002); any
            # other error is the connection failing under it: the client's side.
            if isinstance(msg.data, aiohttp.WebSocketError):
                self.client.refused(msg.data)
        # else CLOSING (the gateway's own close, handed over), CLOSED (connection gone)
        return False

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
            await self.node.spend.check(self.principal, team)  # 8
        except Ignored:
            return
        except GatewayError as err:
            await self.refuse(err, stream_id_of(data), model=_model_of(err, data))
            return
        if self.state is not State.IDLE:  # closed while waiting on the rate limit
            return
        await self._accept(frame)

    async def refuse(
        self, err: GatewayError, stream_id: Any = None, model: str | None = None
    ) -> None:
        """An error frame for a refused frame; the socket stays open (or closes, per the code)."""
        metrics.count_error(err.code)
        principal = self.principal
        self.node.ledger.record(
            TurnRecord(
                socket_id=self.id,
                node=self.node.id,
                key_id=principal.key_id,
                key_prefix=principal.key_prefix,
                team_id=principal.team_id,
                transport="ws",
                model=model,
                received_at=now_utc(),
                accepted=False,
                error_code=str(err.code),
            )
        )
        await self._send_error(err, stream_id)

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

    async def _accept(self, frame: ClientFrame) -> None:
        upstream = self.upstream
        assert upstream is not None  # dropped by `_finish` alone, after the last turn
        self.model = frame.model
        self.turns += 1
        turn = Turn(frame)
        self.turn = turn
        self._transition(State.IN_FLIGHT)
        if upstream.connected:
            # Only a send: awaited here, not a task a turn (creating and stepping one cost more
            # than the send). Frames the client sends meanwhile wait in the socket's buffer.
            await upstream.serve(turn)
        else:  # a handshake first: the reader goes on (check 6 answers meanwhile)
            turn.task = asyncio.create_task(upstream.serve(turn), name=f"turn-{self.id}")

    async def end_turn(
        self,
        turn: Turn,
        status: str,
        *,
        error: GatewayError | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        """Record a finished turn, then (if the socket is open) tell the client and go IDLE."""
        if not self._leave(turn):
            return
        if error is not None:
            metrics.count_error(error.code)
            await self._send_error(error, turn.frame.stream_id)
        self._record_turn(turn, status, response)
        if self._close_after_turn is not None and self.state is State.IDLE:
            await self.close(*self._close_after_turn)

    @property
    def ends_quietly(self) -> bool:
        """A turn's end needs nothing awaited: no close is due after it (`end_turn_now`)."""
        return self._close_after_turn is None

    def end_turn_now(self, turn: Turn, status: str, response: dict[str, Any]) -> None:
        """`end_turn` of a turn whose terminal event went out on the raw path (no error to send;
        the raw path checked `ends_quietly` in the same call)."""
        if self._leave(turn):
            self._record_turn(turn, status, response)

    def _leave(self, turn: Turn) -> bool:
        """`turn` is no longer in flight (False: it was not the session's turn)."""
        if self.turn is not turn:
            return False
        self.turn = None
        if self.state is State.IN_FLIGHT:
            self._transition(State.IDLE)
        return True

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

    def _record_turn(self, turn: Turn, status: str, response: dict[str, Any] | None) -> None:
        """The ledger row of an accepted turn that ended, its cost counted (the metrics, the
        spend counters), its log line."""
        duration = time.perf_counter() - turn.started
        node, principal, frame = self.node, self.principal, turn.frame
        model = frame.model
        metrics.add(metrics.responses(model, status))
        metrics.DURATION_TALLY.observe(duration)
        first = turn.tally.first_event_at
        row = TurnRecord(
            socket_id=self.id,
            node=node.id,
            key_id=principal.key_id,
            key_prefix=principal.key_prefix,
            team_id=principal.team_id,
            transport="ws",
            model=model,
            received_at=turn.received_at,
            accepted=True,
            response_id=turn.response_id,
            status=status,
            previous_response_id=frame.previous_response_id,
            retried=turn.retried,
            http_fallback=turn.http_fallback,
            memory_bound_exceeded=turn.memory_bound_exceeded,
            ttfe_ms=None if first is None else (first - turn.started) * 1000,
            duration_ms=duration * 1000,
        )
        view = node.view.view
        if response:
            charge(view.catalog, row, response.get("usage"))
        logs.info(
            log,
            "response",
            {
                "socket_id": self.id,
                "key_prefix": principal.key_prefix,
                "model": model,
                "status": status,
                "response_id": turn.response_id,
                "duration_ms": round(duration * 10_000) / 10,  # to 0.1 ms; round(x, 1) cost 1 us
            },
        )
        node.ledger.record(row)
        team = view.teams.get(row.team_id)
        node.spend.count(row, team.limits if team else None)
        node.store.update_session(self.id, self.info)  # the listing's model and turns

    # -- lifecycle ------------------------------------------------------------------------------

    async def expel(self, code: Code) -> None:
        """The key was revoked or expired, or the team disabled: error frame, then 1008."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        turn = self.turn
        metrics.count_error(code)
        self._abort_turn("error")
        await self._send_error(GatewayError(code), turn.frame.stream_id if turn else None)

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

        When nothing is due it puts the session in the node's slot for the nearest deadline
        (`DueSlots`): a client frame or a turn's end only stores a time. A response in flight is
        never cut: the idle deadline counts from the end of the turn, and a lifetime reached
        mid-response closes the socket right after its terminal event (like a drain).
        """
        if self._limits is not None:  # a check made before its slot came: the slot lets go
            self.node.due.leave(self, self._limits)
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
            self._limits = self.node.due.add(self, min(waits))
        return None

    def limits_due(self) -> None:
        """The node's slot of `_check_limits`' time came (`DueSlots`)."""
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
        if self._limits is not None:
            self.node.due.leave(self, self._limits)
            self._limits = None
        # Nothing the session holds may point back at it once it ends, so that it, its sockets
        # and all they hold are freed by reference counting, not left to the cyclic collector
        # (whose full passes over that garbage held the loop for 90-140 ms under load): the
        # links point back at the session (the upstream link's reader task and raw forwarder,
        # the client link's slow-client close), so the session lets go of the one and detaches
        # the other.
        upstream, self.upstream = self.upstream, None
        conn = upstream.detach() if upstream is not None else None
        upstream_close = upstream.last_close if upstream is not None else (None, None)
        self.client.detach()
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
                upstream_close_code=upstream_close[0],
                upstream_close_reason=upstream_close[1],
                turns=self.turns,
                model=self.model,
                opened_at=self.opened_at,
            )
        )
        if conn is not None:
            await conn.close()


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
