"""The raw hot path: upstream frames the session needs no task for go to the client as bytes.

OpenAI's frames to the gateway are server frames, unmasked, and so are the gateway's frames to its
client: an upstream text frame is already a valid frame for the client, byte for byte. aiohttp's
path parses it, decodes its payload to `str`, wakes the session's reader task, and the session
encodes it back and builds a new frame around it. `RawForwarder` sits in front of aiohttp's
`WebSocketReader` (as the upstream connection's payload parser) and, for each complete frame,
asks the session (`UpstreamLink.raw_frame`, app/upstreamlink.py) whether it may go to the client's
transport as it came.

The session says yes for an unfragmented text frame of at most `RAW_MAX` bytes of the turn under
way that needs nothing awaited (every event but `error`, and a terminal event only when its turn
can end at once: `response.created` and the terminal event are read on the spot, a write's events
are counted with it, and the turn ends right after the write that carries its terminal event),
while the client's buffer has room, and while no earlier frame is still on aiohttp's path
(`pending`): frames reach the client in the order OpenAI sent them. Frames that go raw one after
another in the bytes of one read are one run of those bytes, and go to the client in one write
(`Write`): OpenAI sent them together, and a write per frame was a send(2) per event, most of the
gateway's CPU at saturation.

Everything else (control frames, fragments, errors, terminal events whose turn has a close due
after it, whatever follows a terminal event in its read, large frames, anything when the session
is not streaming) is handed to aiohttp's reader unchanged, in order,
contiguous runs in one call, and takes the usual path: `UpstreamLink._read`.

`pending` counts the messages handed to aiohttp that the session's reader has not finished with;
the reader lowers it after each message it has handled (`UpstreamLink._read`). While everything
goes raw no reader runs: `Woken` is called after each hand-on (and at the connection's end), and
the session starts its reader then, which ends once aiohttp holds nothing more to read.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway.rawpath")

# Frames over this size take aiohttp's path (which enforces the upstream frame limit); small
# frames are buffered here until complete.
RAW_MAX = 64 * 1024
_FIN = 0x80
_OPCODE = 0x0F
_MASKED = 0x80
# Opcodes whose final frame the reader sees as a message: continuation, text, binary, close.
_MESSAGES = frozenset({0x0, 0x1, 0x2, 0x8})
_TEXT_FINAL = 0x81  # FIN, no RSV bits (no compression), text
_PINGS = frozenset({0x9, 0xA})

# (the forwarder's source, data, frame start, payload start, frame end) -> True when the frame
# may go to the client as it came (then it is part of the next `Write`).
Sink = Callable[[Any, bytes, int, int, int], bool]
# (bytes of consecutive frames the sink took, how many frames, when their read came in, from
# time.perf_counter): to the client, in one write.
Write = Callable[[bytes, int, float], None]
# Something was handed to aiohttp's reader (or the connection ended): it needs reading. Given
# the forwarder's source.
Woken = Callable[[Any], None]

# The reasons `install` stayed out that were logged already: once each per process, not once
# per upstream socket (after an aiohttp upgrade every socket would say the same).
_LOGGED: set[str] = set()


class RawForwarder:
    """The upstream connection's payload parser: splits frames, forwards or hands them on."""

    __slots__ = (
        "_buf",
        "_inner",
        "_sink",
        "_skip",
        "_source",
        "_woken",
        "_write",
        "forwarded",
        "pending",
        "reading",
    )

    def __init__(
        self,
        inner: Any,
        sink: Sink,
        write: Write,
        woken: Woken | None = None,
        source: Any = None,
    ) -> None:
        self._inner = inner  # aiohttp's WebSocketReader
        # What `sink` and `woken` are told the frames come from (the upstream socket): passed
        # with each call rather than bound into a partial each, two objects a socket less.
        self._source = source
        self._sink = sink
        self._write = write
        self._woken = woken
        self._buf = b""  # the start of a frame not complete yet
        self._skip = 0  # bytes of a frame already handed on in part, still to come
        self.pending = 0
        # The session's reader of what was handed on is running (`UpstreamLink._read` sets and
        # clears it, the latter as it returns, not a loop step later when its task is done).
        self.reading = False
        self.forwarded = 0  # frames that went to the client as bytes

    @classmethod
    def install(
        cls, ws: Any, sink: Sink, write: Write, woken: Woken | None = None, source: Any = None
    ) -> RawForwarder | None:
        """Put a forwarder in front of `ws`'s reader; None (aiohttp's path) where aiohttp's
        internals are not as expected. Each of them is needed: without the reader's queue, say,
        raw frames would overtake the messages aiohttp holds already."""
        protocol = getattr(getattr(ws, "_conn", None), "protocol", None)
        inner = getattr(protocol, "_payload_parser", None)
        queued = getattr(getattr(ws, "_reader", None), "_buffer", None)
        if protocol is None:
            reason = "no connection protocol at ws._conn.protocol"
        elif inner is None or inner is not getattr(ws, "_parser", None):
            reason = "the protocol's _payload_parser is not the socket's _parser"
        elif not all(callable(getattr(inner, name, None)) for name in ("feed_data", "feed_eof")):
            reason = "the payload parser has no feed_data/feed_eof"
        elif not isinstance(queued, deque):
            reason = "ws._reader._buffer is missing or not a deque"
        else:
            forwarder = cls(inner, sink, write, woken, source)
            forwarder.pending = len(queued)  # what aiohttp holds already comes first
            protocol._payload_parser = forwarder
            return forwarder
        if reason not in _LOGGED:
            _LOGGED.add(reason)
            log.warning(
                "raw forwarding off for this upstream socket: aiohttp is not as expected",
                extra={"reason": reason},
            )
        return None

    def feed_eof(self) -> None:
        self._inner.feed_eof()
        if self._woken is not None:
            self._woken(self._source)

    def _hand_on(self, data: bytes) -> bool:
        """`data` to aiohttp's reader; True on a protocol error."""
        failed: bool = self._inner.feed_data(data)[0]
        if self._woken is not None:
            self._woken(self._source)
        return failed

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """aiohttp's parser contract: (protocol error, tail)."""
        received = time.perf_counter()
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            if self._hand_on(data[:n]):
                return True, b""
            data = data[n:]
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos, end = 0, len(data)
        run = -1  # start of a run of frames to hand on together
        out, taken = -1, 0  # start and length of a run of frames the sink took
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
                minimal = length >= 126
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
                minimal = length > 0xFFFF
            else:
                minimal = True
            total = head + length
            small_text = b0 == _TEXT_FINAL and not b1 & _MASKED and minimal and length <= RAW_MAX
            if small_text and end - pos < total:
                break  # wait for the rest of a small frame
            if (
                small_text
                and run < 0
                and not self.pending
                and self._sink(self._source, data, pos, pos + head, pos + total)
            ):
                if out < 0:
                    out = pos
                taken += 1
                pos += total
                continue
            if out >= 0:  # what the sink took so far goes before anything else
                self._flush(data[out:pos], taken, received)
                out, taken = -1, 0
            if run < 0 and b0 & _OPCODE in _PINGS and end - pos >= total:
                # A ping or pong is aiohttp's to answer and never a message: handed on alone,
                # it holds nothing up.
                if self._hand_on(data[pos : pos + total]):
                    return True, b""
                pos += total
                continue
            # aiohttp's: joins the run handed on in one call (the rest of this frame, if it is
            # not all here, goes straight on as it comes).
            if run < 0:
                run = pos
            if b0 & _FIN and b0 & _OPCODE in _MESSAGES:
                self.pending += 1
            if end - pos < total:
                self._skip = total - (end - pos)
                pos = end
                break
            pos += total
        if out >= 0:
            self._flush(data[out:pos], taken, received)
        if run >= 0 and self._hand_on(data[run:pos]):
            return True, b""
        if pos < end:
            self._buf = data[pos:]
        return False, b""

    def _flush(self, frames: bytes, count: int, received: float) -> None:
        self.forwarded += count
        self._write(frames, count, received)
