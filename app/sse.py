"""Server-sent events, both ways (WHATWG HTML §9.2 "event stream" format).

Why not a library: the maintained SSE clients are built on httpx (httpx-sse) and would bring a
second HTTP stack next to aiohttp; aiohttp-sse-client2 has had no release since 2023. The format
needs only what is below, and tests/test_sse.py checks it against the specification's rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str | None = None


async def parse(chunks: AsyncIterable[bytes]) -> AsyncIterator[Event]:
    """Events of a byte stream; a trailing event without its blank line is dropped (as spec'd)."""
    buffer = b""
    data: list[str] = []
    event = ""
    last_id: str | None = None
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if not line:
                if data:
                    yield Event(data="\n".join(data), event=event or "message", id=last_id)
                data, event = [], ""
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                last_id = value


def encode(data: str, event: str | None = None) -> bytes:
    """One event: `event:` line (if any), one `data:` line per line of data, a blank line."""
    head = f"event: {event}\n" if event else ""
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + body + "\n").encode()
