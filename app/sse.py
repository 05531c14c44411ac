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
