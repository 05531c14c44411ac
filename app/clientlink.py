"""The customer's socket, from the gateway's side: the one owner of every write and close to it.

Every frame to the client goes out here: events and error frames (text) and an upstream binary
frame through `send`, and the raw path's bytes: `UpstreamLink.raw_write` (app/upstreamlink.py)
writes whole frames to `transport`, which this class owns, when `UpstreamLink.raw_frame` found
room for them (`send`'s test, inlined there: a call per frame costs on that path). One guard for
a client that stopped reading, in `send`: a frame that would take its outbound buffer past
`GATEWAY_MAX_PENDING_BYTES` closes the socket with 1008 instead; the raw path never closes, it
leaves such a frame to aiohttp's path and so to `send`.

The close hand-over. aiohttp's `close()`, called from another task while the reader waits in
`receive()`, sends the close frame and closes TCP at once, without the client's answer: a client
still sending then gets a reset, and aiohttp's own client reports 1006, not the code. So a close
started elsewhere (drain, revocation, a socket limit, a slow client, the end of a turn) is handed
to the reader: cancelled in `receive()` (`parked`), it calls `close()` itself, which discards
what the client still sends until its close frame comes (`CLOSE_HANDSHAKE_SECONDS` at most), and
the closing task waits for that. A reader busy with a frame needs no hand-over: aiohttp's
`close()` then waits for the answer by itself. `reading()` is the reader's side of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal, cast

import aiohttp
from aiohttp import web

from app import metrics

log = logging.getLogger("gateway.session")

# How long a close the gateway starts waits for the client's close frame before it drops the
# connection (aiohttp's close timeout, set in app/handlers.py; its default is 10 s). A client
# answers within a round trip; app/server.py's drain waits 2 s for close frames too.
CLOSE_HANDSHAKE_SECONDS = 2.0
# RFC 6455's code for a connection that ended without a close frame: recorded, never sent.
ABNORMAL_CLOSURE = 1006

CloseSession = Callable[[int, str], Awaitable[None]]


class ClientLink:
    __slots__ = (
        "_client_close",
        "_close_session",
        "_closed_by",
        "_closing",
        "_handed_over",
        "_reader",
        "_sent_close",
        "_sent_reason",
        "key_prefix",
        "max_pending",
        "parked",
        "socket_id",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        *,
        max_pending: int,
        socket_id: str,
        key_prefix: str,
        close_session: CloseSession,
    ) -> None:
        self.ws = ws
        self.max_pending = max_pending
        self.socket_id = socket_id
        self.key_prefix = key_prefix
        # The session's `close` (its state changes first), for the slow-client guard. It points
        # back at the session: `detach` drops it when the session ends.
        self._close_session: CloseSession | None = close_session
        # Set by `watch`: the client's transport, when it can report its buffer.
        self.transport: asyncio.WriteTransport | None = None
        self._closing = False  # the gateway started closing (a close frame is on its way)
        self._closed_by: Literal["client", "gateway"] = "client"
        self._sent_close: int | None = None  # aiohttp keeps the peer's reply code instead
        self._sent_reason = ""
        self._client_close: tuple[int, str] | None = None  # the client's close frame, if any
        # The task reading client frames, and whether it waits in `ws.receive()`: the reader
        # (Session.run) sets `parked` around that wait, with no coroutine of this class's in
        # between (one more frame a socket, kept for its whole life).
        self._reader: asyncio.Task[object] | None = None
        self.parked = False
        self._handed_over: asyncio.Event | None = None  # set once the reader has closed

    def watch(self, transport: asyncio.BaseTransport | None) -> None:
        """Let the client's buffer grow to the limit, so a full one is seen, not waited on.

        By what it can do, not by class: uvloop's transports are no `asyncio.WriteTransport`
        (an isinstance check here left a slow client unguarded on uvloop)."""
        if hasattr(transport, "set_write_buffer_limits") and hasattr(
            transport, "get_write_buffer_size"
        ):
            writable = cast(asyncio.WriteTransport, transport)
            writable.set_write_buffer_limits(high=self.max_pending)
            self.transport = writable

    # -- writes ---------------------------------------------------------------------------------

    async def send(self, data: str | bytes) -> bool:
        """One frame (text for a `str`, binary for `bytes`); False when the client is gone, or
        was dropped by the slow-client guard: a frame that would take the client's outbound
        buffer past the limit closes the socket with 1008 instead of going out."""
        if self.ws.closed:
            return False
        transport = self.transport
        if transport is not None and (
            transport.get_write_buffer_size() + len(data) > self.max_pending
        ):
            await self._drop_slow_client(transport)
            return False
        try:
            if isinstance(data, str):
                await self.ws.send_str(data)
            else:
                await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def _drop_slow_client(self, transport: asyncio.WriteTransport) -> None:
        log.warning(
            "client not reading: closing",
            extra={
                "socket_id": self.socket_id,
                "key_prefix": self.key_prefix,
                "pending_bytes": transport.get_write_buffer_size(),
            },
        )
        metrics.count_error("client_not_reading")
        close = self._close_session
        if close is None:  # the session has ended: its socket is closed or closing already
            return
        try:
            await asyncio.wait_for(close(1008, "client not reading"), timeout=1.0)
        except TimeoutError:
            transport.abort()  # its close frame sits behind what it would not read

    # -- reads and closes -----------------------------------------------------------------------

    def reading(self) -> ClientLink:
        """The reader's side of the close hand-over, around the loop that reads client frames
        (`async with link.reading():`): a cancellation that is `close`'s hand-over alone ends in
        the close it was for. The link is its own context manager, not a generator-based one:
        a generator would be kept, suspended, for the socket's whole life."""
        return self

    async def __aenter__(self) -> None:
        self._reader = asyncio.current_task()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            if exc_type is None or not issubclass(exc_type, asyncio.CancelledError):
                return False
            reader = self._reader
            # Not the hand-over (aiohttp cancelling the handler of a lost connection): go on.
            if self._handed_over is None or reader is None or reader.uncancel() != 0:
                return False
            await self._close_ws()
            return True
        finally:
            self.parked = False
            if self._handed_over is not None:
                self._handed_over.set()

    async def close(self, code: int, reason: str = "") -> None:
        """The gateway closes the client socket, with a whole close handshake, from any task."""
        if self._closing:
            return
        self._closing = True
        self._closed_by = "gateway"
        self._sent_close = code
        self._sent_reason = reason
        reader = self._reader
        if self.parked and reader is not None and reader is not asyncio.current_task():
            done = self._handed_over = asyncio.Event()
            reader.cancel()
            await done.wait()
            return
        await self._close_ws()

    async def _close_ws(self) -> None:
        assert self._sent_close is not None
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await self.ws.close(code=self._sent_close, message=self._sent_reason.encode()[:120])

    def peer_closed(self, code: int, reason: str) -> None:
        """The client's close frame came (aiohttp answered it)."""
        self._client_close = (code, reason)

    def refused(self, error: aiohttp.WebSocketError) -> None:
        """aiohttp closed the socket for a bad frame (1009 too large, 1007 bad UTF-8, 1002)."""
        self._closed_by = "gateway"
        self._sent_close = int(error.code)
        self._sent_reason = str(error)[:120]

    def outcome(self) -> tuple[Literal["client", "gateway"], int, str]:
        """Who closed the socket, with which code and reason, as the ledger records it."""
        if self._closed_by == "gateway":
            assert self._sent_close is not None
            return "gateway", self._sent_close, self._sent_reason
        if self._client_close is not None:
            return "client", *self._client_close
        return "client", ABNORMAL_CLOSURE, "connection lost without a close frame"

    def detach(self) -> None:
        """The session ended: drop what points back at it, so refcounting frees it."""
        self._close_session = None
        self._reader = None
