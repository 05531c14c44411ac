"""A session's upstream side: a turn's request out, every event of it back to the client, in order.

The wire is app/upstream.py; this is what a session does with it:
- `serve(turn)` reuses the upstream socket or opens one (warm from the pool, or a new one when the
  last is gone, retired or too old), continues the chain from the conversation memory on a new
  socket, and sends the request (CONTRACT.md §3 check 9).
- Each upstream socket has one reader task (`_read`) that forwards its events (`_forward`): the
  hot path. The raw path (app/rawpath.py) calls `raw_frame` and `raw_write` for the frames it
  takes as bytes, and aiohttp's reader hands `_read` only the rest, in order.
- The few events and closes that end or redirect a turn are judged by app/turnpolicy.py and the
  verdict is carried out here: a retry, the HTTP fallback, the memory forgetting or growing, and
  the turn's end, which the session records (`TurnOwner.end_turn`).
- The node's silence sweep (`check_silence`) ends a turn whose upstream has been silent for
  `GATEWAY_UPSTREAM_IDLE_SECONDS`.

Every write to the client goes through the session's `ClientLink` (app/clientlink.py); each
forwarded event is counted once, by its turn's `EventTally.forwarded` (app/metrics.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import WSMsgType

from app import metrics, turnpolicy
from app.clientlink import ClientLink
from app.errors import GatewayError
from app.memory import ConversationMemory, as_items
from app.node import Node
from app.rawpath import RawForwarder
from app.turn import Turn
from app.turnpolicy import INSPECTED, NOT_FOUND, TERMINAL, Action, Chain, unchained_input
from app.upstream import (
    UpstreamConn,
    UpstreamHandshakeError,
    UpstreamHTTPError,
    open_upstream,
    stream_http,
)

# The events that end a turn: on the raw path only when the turn can end at once (`raw_frame`).
_TERMINAL_BYTES = frozenset(kind.encode() for kind in TERMINAL)
_ERROR_BYTES = b"error"
_TYPE_PREFIX = '{"type":"'
_TYPE_BYTES = _TYPE_PREFIX.encode()


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


class TurnOwner(Protocol):
    """What the link needs of its session (app/session.py)."""

    id: str
    turn: Turn | None  # the turn in flight (or closing with the socket)
    in_flight: bool  # the session's state is IN_FLIGHT

    @property
    def ends_quietly(self) -> bool: ...  # a turn's end needs nothing awaited (no close due)

    def end_turn_now(self, turn: Turn, status: str, response: dict[str, Any]) -> None: ...

    async def end_turn(
        self,
        turn: Turn,
        status: str,
        *,
        error: GatewayError | None = None,
        response: dict[str, Any] | None = None,
    ) -> None: ...


class UpstreamLink:
    __slots__ = (
        "_ending",
        "_last_frame_at",
        "_reader",
        "_silence",
        "client",
        "conn",
        "last_close",
        "memory",
        "node",
        "owner",
        "raw",
        "team_id",
    )

    def __init__(self, owner: TurnOwner, node: Node, client: ClientLink, team_id: str) -> None:
        # The session points at this link and this link at the session: the session drops the
        # link when it ends (`Session._finish`), so refcounting frees both.
        self.owner = owner
        self.node = node
        self.client = client
        self.team_id = team_id
        self.memory = ConversationMemory(node.settings.context_bytes, node.memory_budget)
        self.conn: UpstreamConn | None = None
        # The current socket's raw forwarder. Kept here, not on the UpstreamConn: the
        # forwarder's sink holds the conn, so conn.raw would be a cycle.
        self.raw: RawForwarder | None = None
        self._reader: asyncio.Task[None] | None = None
        self.last_close: tuple[int | None, str | None] = (None, None)  # for the ledger
        self._last_frame_at = time.perf_counter()
        self._silence: asyncio.Task[None] | None = None
        # A terminal event `raw_frame` took: the turn ends in `raw_write`, once it is written.
        self._ending: tuple[Turn, str, dict[str, Any]] | None = None

    # -- a turn's request -----------------------------------------------------------------------

    async def serve(self, turn: Turn) -> None:
        """The turn's request upstream, on the socket there is or a new one (check 9)."""
        conn = self._current()
        if conn is None:
            try:
                conn = await self._replace()
            except UpstreamHandshakeError as exc:
                verdict = turnpolicy.on_handshake_failure(exc.detail)
                await self.owner.end_turn(turn, verdict.status, error=verdict.error)
                return
        body = turn.frame.upstream_body()
        previous = turn.frame.previous_response_id
        if conn.served == 0 and previous is not None:
            # A new upstream socket has an empty cache: continue the chain from memory.
            items = unchained_input(self.memory.chain_for(previous), as_items(turn.frame.input))
            if items is not None:
                body["previous_response_id"] = None
                body["input"] = items
        await self._send(turn, conn, body)

    async def _send(self, turn: Turn, conn: UpstreamConn, body: dict[str, Any]) -> None:
        turn.conn = conn
        turn.sent_previous_id = body.get("previous_response_id")
        turn.sent_input = as_items(body.get("input")) or []
        self._last_frame_at = time.perf_counter()
        self.node.watched.add(self)
        try:
            await conn.send(body)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass  # the upstream reader sees the close and ends the turn

    @property
    def connected(self) -> bool:
        """The next turn goes out on the socket there is: `serve` then only sends (no
        handshake), so the session may await it instead of running it as a task."""
        return self._current() is not None

    def _current(self) -> UpstreamConn | None:
        """The upstream socket the next turn goes out on, if it may (open, not retired, not
        too old); None: `_replace` opens another."""
        conn = self.conn
        if (
            conn is not None
            and conn.usable
            and conn.age < self.node.settings.upstream_max_age_seconds
        ):
            return conn
        return None

    async def _replace(self) -> UpstreamConn:
        """A new upstream socket in place of the one there is (if any): warm from the pool, or
        opened now."""
        conn = self.conn
        settings = self.node.settings
        if conn is not None:
            self.conn = self.raw = None
            if not conn.ws.closed:
                self.last_close = (1000, "replaced by the gateway at a turn boundary")
            await conn.close()
        team = self.node.view.view.teams.get(self.team_id)
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
        self.conn = conn
        raw = None
        if settings.raw_forwarding:
            raw = RawForwarder.install(conn.ws, self.raw_frame, self.raw_write, self._wake, conn)
        self.raw = raw
        if raw is None or _unread(conn.ws):
            self._start_reader(conn)
        return conn

    # -- silence --------------------------------------------------------------------------------

    def check_silence(self, now: float, idle: float) -> bool:
        """The node's sweep (`Node.watched`; no timer per socket, none per frame): ends the turn
        in flight when its upstream has been silent `idle` seconds. False: nothing to watch
        any more (no turn in flight on an upstream socket, or it was just ended)."""
        turn = self.owner.turn
        if turn is None or turn.conn is None or not self.owner.in_flight:
            return False
        if now - self._last_frame_at < idle:
            return True
        reason = f"upstream silent for {idle:g} s"
        self._silence = asyncio.create_task(
            self._lost(turn.conn, 1006, reason, abort=True), name=f"silent-{self.owner.id}"
        )
        return False

    # -- the raw path (app/rawpath.py) ----------------------------------------------------------

    def raw_frame(
        self, conn: UpstreamConn, data: bytes, start: int, payload: int, end: int
    ) -> bool:
        """May the upstream text frame `data[start:end]` go to the client as it came? Yes if it
        is an event of the turn under way that needs nothing awaited and the client's buffer has
        room; it then goes out with the others of its read in `raw_write`. A terminal event
        needs nothing awaited when the turn can end at once (no close is due after it): it is
        parsed here and the turn ends in `raw_write`, after the write, as `_inspect` would end
        it. Never an error (a retry, a swallow, a patch), nor anything after a terminal event.
        False: it takes aiohttp's path (`_read`)."""
        owner = self.owner
        turn = owner.turn
        if (
            turn is None
            or turn.conn is not conn
            or self._ending is not None
            or not data.startswith(_TYPE_BYTES, payload)
        ):
            return False
        kind = data[payload + 9 : data.find(b'"', payload + 9, end)]
        terminal = kind in _TERMINAL_BYTES
        if kind == _ERROR_BYTES or (terminal and not owner.ends_quietly):
            return False
        client = self.client
        transport = client.transport
        if (  # ClientLink's room for it: its guard's test, inlined (a call per frame costs)
            transport is None
            or transport.is_closing()
            or not owner.in_flight
            or client.ws.closed  # a close frame went out (aiohttp's answer to the client's)
            or transport.get_write_buffer_size() + (end - start) > client.max_pending
        ):
            return False
        if kind == b"response.created":
            found = _leading_response_id(data, payload, end)
            if found is None:  # not in the usual form: read the event whole
                try:
                    found = _response_id(orjson.loads(data[payload:end]))
                except orjson.JSONDecodeError:
                    return False
            turn.response_id = found
        elif terminal:
            try:
                event = orjson.loads(data[payload:end])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(event, dict):
                return False
            self._ending = (turn, kind.decode(), event)
        return True

    def raw_write(self, frames: bytes, count: int, received: float) -> None:
        """The frames `raw_frame` took from one read, to the client in one write."""
        self._last_frame_at = received
        transport = self.client.transport
        turn = self.owner.turn
        assert transport is not None and turn is not None  # raw_frame checked, nothing since
        transport.write(frames)
        turn.tally.forwarded(received, count)
        if self._ending is not None:
            ended, kind, event = self._ending
            self._ending = None
            response = _response_of(event)
            self.owner.end_turn_now(ended, self._settle_terminal(ended, kind, response), response)

    # -- aiohttp's path -------------------------------------------------------------------------

    def _wake(self, conn: UpstreamConn) -> None:
        """The raw forwarder handed something to aiohttp's reader: read it (`_read`)."""
        raw = self.raw
        if (
            raw is not None
            and not raw.reading
            and self.conn is conn
            and not conn.closing
            and _unread(conn.ws)  # not for a part of a large frame: no message yet
        ):
            self._start_reader(conn)

    def _start_reader(self, conn: UpstreamConn) -> None:
        raw = self.raw
        if raw is not None:
            raw.reading = True
        reader = asyncio.create_task(self._read(conn, raw), name=f"upstream-{self.owner.id}")
        reader.add_done_callback(self._reader_ended)
        self._reader = reader

    def _reader_ended(self, reader: asyncio.Task[None]) -> None:
        if self._reader is reader:
            self._reader = None

    async def _read(self, conn: UpstreamConn, raw: RawForwarder | None) -> None:
        """aiohttp's path: the messages the raw forwarder handed on, and the connection's end.
        With a forwarder, it ends once aiohttp holds nothing more (`_wake` starts it again):
        an idle socket keeps no task, no coroutine frames and no waiter for its upstream."""
        try:
            await self._read_messages(conn, raw)
        finally:
            if raw is not None:
                raw.reading = False  # now: a hand-on from here on starts a reader again

    async def _read_messages(self, conn: UpstreamConn, raw: RawForwarder | None) -> None:
        ws = conn.ws
        handled = False
        while True:
            if handled and raw is not None and raw.pending:
                raw.pending -= 1  # the last message is done with: raw frames may pass again
            if raw is not None and not _unread(ws):
                return
            handled = True
            try:
                msg = await ws.receive()
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                await self._lost(conn, 1006, "upstream connection dropped")
                return
            if msg.type is WSMsgType.TEXT:
                # The hot path is app/rawpath.py; frames here are the few it hands on.
                if not await self._forward(conn, msg.data):
                    return
            elif msg.type is WSMsgType.BINARY:
                self._last_frame_at = time.perf_counter()
                await self.client.send(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                await self._lost(conn, int(msg.data), str(msg.extra or ""))
                return
            else:  # CLOSING, CLOSED, ERROR: the connection went without a close frame
                code = ws.close_code if ws.close_code and ws.close_code != 1000 else 1006
                reason = "upstream connection dropped"
                if msg.type is WSMsgType.ERROR:
                    reason = f"upstream connection failed ({type(msg.data).__name__})"
                await self._lost(conn, code, reason)
                return
            del msg  # an idle socket keeps no event (the last was the terminal one, the largest)

    async def _forward(self, conn: UpstreamConn | None, text: str) -> bool:
        """One upstream event (`conn` None: from the HTTP fallback); False when the client is
        gone."""
        received = self._last_frame_at = time.perf_counter()
        turn = self.owner.turn
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
            response = _response_of(event)
            if not await self._deliver(turn, text, received):
                return False
            status = self._settle_terminal(turn, kind, response)
            await self.owner.end_turn(turn, status, response=response)
            return True
        return await self._on_error(conn, turn, event, text, received)

    async def _on_error(
        self,
        conn: UpstreamConn | None,
        turn: Turn | None,
        event: dict[str, Any],
        text: str,
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
            remembered=self.memory.remembers(previous),
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
            text = orjson.dumps(event).decode()
        if turn is None:
            return await self.client.send(text) if patched else None
        self._settle_memory(turn, verdict.chain)
        if code == NOT_FOUND and self.memory.was_dropped(previous):
            turn.memory_bound_exceeded = True
        ok = await self._deliver(turn, text, received)  # unchanged unless patched
        metrics.count_error(str(code or "upstream_error"))
        await self.owner.end_turn(turn, verdict.status)
        return ok

    def _settle_terminal(self, turn: Turn, kind: str, response: dict[str, Any]) -> str:
        """A terminal event of `turn` (either path): its response id, the memory; the status."""
        found = response.get("id")
        if isinstance(found, str):
            turn.response_id = found  # else the one `response.created` gave, if any
        verdict = turnpolicy.on_terminal(kind, response)
        output = response.get("output")
        self._settle_memory(turn, verdict.chain, output if isinstance(output, list) else [])
        return verdict.status

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
        await self._send(turn, conn, body)

    # -- the upstream socket ends ---------------------------------------------------------------

    async def _lost(
        self, conn: UpstreamConn, code: int, reason: str, *, abort: bool = False
    ) -> None:
        """The upstream socket ended (close frame, drop or silence)."""
        if conn.closing:
            return  # the gateway closed it (replaced, or the client left)
        metrics.count_close("upstream", code)
        self.last_close = (code, reason)
        if self.conn is conn:
            self.conn = self.raw = None
        turn = self.owner.turn
        if turn is not None and turn.conn is conn and self.owner.in_flight:
            verdict = turnpolicy.on_close(
                code, reason, turn.facts(), fallback_enabled=self.node.settings.http_fallback
            )
            if verdict.action is Action.HTTP_FALLBACK:
                await self._http_fallback(turn, code, reason)
            else:
                await self.owner.end_turn(turn, verdict.status, error=verdict.error)
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
                await self.owner.end_turn(turn, verdict.status, error=verdict.error)
                return
            body["previous_response_id"] = None
            body["input"] = items
        turn.sent_previous_id = None
        turn.sent_input = as_items(body.get("input")) or []
        team = self.node.view.view.teams.get(self.team_id)
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
                if self.owner.turn is not turn or not await self._forward(None, data):
                    return
        except UpstreamHTTPError as exc:
            if exc.status == 401:
                await self.owner.end_turn(turn, "error", error=turnpolicy.credential_refused())
                return
            event = {"type": "error", "status": exc.status, "error": exc.body["error"]}
            if stream_id is not None:
                event["stream_id"] = stream_id
            await self._forward(None, orjson.dumps(event).decode())
        if self.owner.turn is turn:  # the stream ended without a terminal event
            await self.owner.end_turn(turn, "error", error=turnpolicy.closed_error(code, reason))

    def detach(self) -> UpstreamConn | None:
        """The session ended: stop reading and watching, let the memory go. Returns the socket
        still to close (after the session is recorded), if one is open."""
        self.node.watched.discard(self)
        # The reader task's CancelledError holds its frame (this link, and so the session).
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        conn, self.conn, self.raw = self.conn, None, None
        if conn is not None and not conn.ws.closed:
            self.last_close = (1000, "closed by the gateway with the client socket")
        self.memory.clear()
        return conn


_RESPONSE_KEY = b'"response":{'
_ID_FIRST = b'"id":"'


def _leading_response_id(data: bytes, start: int, end: int) -> str | None:
    """The id of the event's `response` when that object starts with it, as OpenAI's and the
    simulator's do, found without parsing the event: `response.created` echoes the request's
    instructions and tools (kilobytes for Codex), which parsing whole costs for one field.
    The first `"response":{` of the event is its top-level `response`: the keys before it
    (`type`, `sequence_number`, `stream_id`) hold a string or a number, where such bytes can
    only stand escaped. None when the object does not start with `"id"` or the id holds an
    escape: the caller parses the event."""
    at = data.find(_RESPONSE_KEY, start, end)
    if at < 0 or not data.startswith(_ID_FIRST, at + len(_RESPONSE_KEY)):
        return None
    first = at + len(_RESPONSE_KEY) + len(_ID_FIRST)
    last = data.find(b'"', first, end)
    if last < 0:
        return None
    found = data[first:last]
    if b"\\" in found:
        return None
    try:
        return found.decode()
    except UnicodeDecodeError:
        return None


def _unread(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether aiohttp's reader holds a message or the connection's end, not read yet. The
    queue's `_buffer` is private (RawForwarder.install checks it is there, else no forwarder)."""
    queue: Any = ws._reader
    return bool(queue._buffer) or queue.is_eof()


def _response_of(event: dict[str, Any]) -> dict[str, Any]:
    found = event.get("response")
    return found if isinstance(found, dict) else {}


def _response_id(event: dict[str, Any]) -> str | None:
    value = _response_of(event).get("id")
    return value if isinstance(value, str) else None
