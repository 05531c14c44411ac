"""Server-sent events, both ways (WHATWG HTML §9.2 "event stream" format).

Why not a library: the maintained SSE clients are built on httpx (httpx-sse) and would bring a
second HTTP stack next to aiohttp; aiohttp-sse-client2 has had no release since 2023. The format
needs only what is below, and tests/test_sse.py checks it against the specification's rules.

Reading is linear in the stream's length however it is cut into chunks: each chunk is scanned once
for line ends and the unfinished line is kept aside, so one `response.completed` line of many MiB
arriving in small chunks costs what one pass over it costs.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import orjson

_LINE_END = re.compile(rb"\r\n?|\n")  # the specification's three: CRLF, CR, LF


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


class Lines:
    """The lines of a byte stream, whatever its cuts, each line end CRLF, CR or LF.

    A CR is a line end at once, whether or not LF follows; if a chunk ends with CR, an LF that
    starts the next chunk is the rest of that CRLF, not an empty line of its own.
    """

    __slots__ = ("_after_cr", "_partial")

    def __init__(self) -> None:
        self._partial = bytearray()  # the line begun in earlier chunks, not yet ended
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines this chunk ends; only the chunk's own bytes are scanned."""
        if not chunk:
            return []
        if b"\n" not in chunk and b"\r" not in chunk:  # the common case inside a long line
            self._partial += chunk
            self._after_cr = False
            return []
        skip_lf = self._after_cr and chunk[0] == 0x0A  # the rest of a CRLF cut in two
        if b"\r" not in chunk:  # the norm (OpenAI ends lines with LF): one split, no regex
            lines = chunk.split(b"\n")
            self._after_cr = False
            rest = lines.pop()
            if skip_lf:
                del lines[0]  # the empty piece before that LF: its line ended at the CR
            elif self._partial:
                lines[0] = bytes(self._partial + lines[0])
                self._partial.clear()
            self._partial += rest
            return lines
        start = 1 if skip_lf else 0
        lines = []
        for end in _LINE_END.finditer(chunk, start):
            piece = chunk[start : end.start()]
            if self._partial:
                self._partial += piece
                piece = bytes(self._partial)
                self._partial.clear()
            lines.append(piece)
            start = end.end()
        self._partial += chunk[start:]
        self._after_cr = chunk.endswith(b"\r")
        return lines


class Decoder:
    """Events from lines (the specification's "interpret an event stream")."""

    __slots__ = ("_data", "_event", "_last_id")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None

    def line(self, raw: bytes) -> Event | None:
        """The event a line completes, if it is the blank line ending one with data."""
        if not raw:
            event = None
            if self._data:
                data = "\n".join(self._data)
                event = Event(data=data, event=self._event or "message", id=self._last_id)
            self._data, self._event = [], ""
            return event
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None


class Sieve:
    """The few events of a stream a reader folds over, found by byte searches instead of decoding
    every line: a relay that passes the bytes on unchanged needs the first event (its time) and
    the last terminal event and errors, and decoding every line of every delta cost more than
    relaying it.

    An event is named by its `event:` field, or by its data's JSON `type` when it has none.
    Every name the reader wants must hold one of `markers`; `resets` are the wanted names after
    which a reader folding over the stream in order no longer depends on anything before (for
    the relay: a terminal event replaces the status and the response).

    The stream's first event is decoded as it arrives (`feed` returns it). After it, chunks are
    held unread until `hold` bytes have come or `finish` is called (at the stream's end), then
    searched together (a search has a fixed cost, and a chunk is often one small event), cut at
    their last event boundary (a blank line). In that run of whole events the search goes
    backwards from the end: the last event holding a marker or a backslash (JSON may spell a name
    with escapes) is decoded, then the one before it, until one of `resets` is found. What is
    returned is those, in stream order: of the wanted events of the run, every one from its last
    `resets` event on (all of them if it has none), possibly with others beside them that held a
    marker. Folding over what `feed` and `finish` return gives what folding over every event
    gives. `Lines` and `Decoder` are in the same state at every event boundary, so decoding
    whole events out of order or skipping them changes nothing they read. Once a CR is seen the
    stream may end lines with it, and every event is decoded from then on. Linear in the
    stream's length however it is cut.
    """

    __slots__ = (
        "_decoder",
        "_every_line",
        "_held",
        "_held_bytes",
        "_hold",
        "_lines",
        "_markers",
        "_pending",
        "_resets",
        "seen",
    )

    def __init__(
        self,
        resets: frozenset[str],
        markers: tuple[bytes, ...],
        hold: int = 64 * 1024,
    ) -> None:
        self._resets = resets
        self._markers = (*markers, b"\\")
        self._hold = hold
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._pending = bytearray()  # the bytes of the event begun, not yet ended
        self._lines, self._decoder = Lines(), Decoder()
        self._every_line = False
        self.seen = False  # an event has been decoded (the stream's first, for its time)

    def feed(self, chunk: bytes) -> list[Event]:
        """Until the first event, that event; then, when `hold` bytes have been held, what a
        search of them gives (see the class); else nothing."""
        if self.seen and not self._every_line:
            self._held.append(chunk)
            self._held_bytes += len(chunk)
            if self._held_bytes < self._hold:
                return []
            chunk = b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
        return self._search(chunk)

    def finish(self) -> list[Event]:
        """What a search of the bytes still held gives (the stream has ended)."""
        if not self._held:
            return []
        chunk = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        return self._search(chunk)

    def _search(self, chunk: bytes) -> list[Event]:
        if self._every_line or b"\r" in chunk:
            if not self._every_line:
                self._every_line = True
                chunk = bytes(self._pending) + chunk
                self._pending.clear()
            return self._decode(chunk)
        if not self._pending and chunk.endswith(b"\n\n"):
            run: bytes | bytearray = chunk  # the norm: reads of whole events
        else:
            start = max(len(self._pending) - 1, 0)  # a blank line may straddle the two
            self._pending += chunk
            end = self._pending.rfind(b"\n\n", start)
            if end < 0:
                return []
            run = self._pending[: end + 2]
            del self._pending[: end + 2]
        return self._pick(run)

    def _pick(self, run: bytes | bytearray) -> list[Event]:
        """A run of whole events (LF line ends): the first event, until one has been seen (the
        rest of the run is held); then the marked events from the end back to the last of
        `resets`. Each marker's place is searched for again only once the search has passed
        it, so the work stays linear however many events hold one."""
        if not self.seen:
            first: list[Event] = []
            low = 0
            while not self.seen and low < len(run):
                end = run.find(b"\n\n", low) + 2
                first = self._decode(bytes(run[low:end]))
                low = end
            if not self.seen:  # comments only, so far
                return first
            # The rest waits, in order, with what comes after it.
            self._held += (bytes(run[low:]), bytes(self._pending))
            self._held_bytes += len(run) - low + len(self._pending)
            self._pending.clear()
            return first
        low = 0
        found: list[list[Event]] = []
        places = [run.rfind(marker, low) for marker in self._markers]
        while (hit := max(places)) >= 0:
            start = run.rfind(b"\n\n", low, hit)  # the end of the event before the hit
            start = low if start < 0 else start + 2
            events = self._decode(bytes(run[start : run.find(b"\n\n", hit) + 2]))
            found.append(events)
            if any(self._name(event) in self._resets for event in events):
                break
            places = [
                run.rfind(marker, low, start) if place >= start else place
                for marker, place in zip(self._markers, places, strict=True)
            ]
        return [event for events in reversed(found) for event in events]

    @staticmethod
    def _name(event: Event) -> str | None:
        if event.event != "message":
            return event.event
        try:
            value = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return None
        kind = value.get("type") if isinstance(value, dict) else None
        return kind if isinstance(kind, str) else None

    def _decode(self, data: bytes) -> list[Event]:
        events = []
        for raw in self._lines.feed(data):
            event = self._decoder.line(raw)
            if event is not None:
                events.append(event)
        if events:
            self.seen = True
        return events


async def parse(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Events of a byte stream; a trailing event without its blank line is dropped (as spec'd)."""
    lines, decoder = Lines(), Decoder()
    async for chunk in chunks:
        for raw in lines.feed(chunk):
            event = decoder.line(raw)
            if event is not None:
                yield event


def encode(data: str, event: str | None = None) -> bytes:
    """One event: `event:` line (if any), one `data:` line per line of data, a blank line."""
    head = f"event: {event}\n" if event else ""
    if "\n" not in data:  # the norm: one line of JSON
        return f"{head}data: {data}\n\n".encode()
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + body + "\n").encode()
