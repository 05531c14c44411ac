"""The SSE reader (app/sse.py) against WHATWG HTML §9.2: the same events however the stream is
cut into chunks (a CRLF cut between its CR and its LF included), and linear work on one line of
many MiB arriving a byte at a time."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from app import sse
from app.upstream import post_http

# Every line end the specification knows (CRLF, CR alone, LF alone), next to each other, ending
# blank lines and field lines, around multi-byte UTF-8.
STREAM = (
    b": keep-alive\r\n"
    b"event: response.created\r\n"
    b'data: {"a":1}\r\n'
    b"\r\n"
    b"data: line1\r\n"
    b"data: line2\r"
    b"\r\n"
    b"id: 7\n"
    b"data:no-space\r\n"
    b"\r"
    b"data\r\n"
    b"data: h\xc3\xa9llo \xe2\x9c\x93\r"
    b"\n"
    b"\n"
    b"event: no-data-no-event\r\n\r\n"
    b"data: a\r\rdata: b\n\n"
    b"data: tail-without-blank-line\r\n"
)
EXPECTED = [
    sse.Event(data='{"a":1}', event="response.created"),
    sse.Event(data="line1\nline2"),
    sse.Event(data="no-space", id="7"),
    sse.Event(data="\nhéllo ✓", id="7"),
    sse.Event(data="a", id="7"),
    sse.Event(data="b", id="7"),
]

BIG = 16 * 1024 * 1024
# CPU seconds (not wall time: the load of other processes does not count) for one 16 MiB line.
# A linear reader needs about 15 s fed byte by byte on this project's hosts; the old reader, which
# re-split its whole buffer on every chunk, needed hours (about 2 * n**2 bytes copied).
CPU_BUDGET_S = 90.0


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _events(parts: Iterable[bytes]) -> list[sse.Event]:
    return [event async for event in sse.parse(_chunks(parts))]


def _cut(stream: bytes, *at: int) -> list[bytes]:
    bounds = [0, *at, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


async def test_sse_parse_follows_the_spec() -> None:
    events = await _events(
        [
            b": comment\n",
            b'event: response.created\ndata: {"a":',
            b"1}\n\n",
            b"data: line1\r\ndata: line2\r\n\r\n",
            b"id: 7\ndata:no-space\n\n",
            b"data: trailing-without-blank-line",
        ]
    )
    assert events == [
        sse.Event(data='{"a":1}', event="response.created"),
        sse.Event(data="line1\nline2"),
        sse.Event(data="no-space", id="7"),
    ]


async def test_sse_encode_round_trip() -> None:
    raw = sse.encode("a\nb", "ev")
    assert raw == b"event: ev\ndata: a\ndata: b\n\n"
    assert await _events([raw]) == [sse.Event(data="a\nb", event="ev")]


async def test_crlf_cr_and_lf_line_ends() -> None:
    assert await _events([STREAM]) == EXPECTED


async def test_every_cut_in_two_parses_like_the_whole() -> None:
    wrong = [at for at in range(len(STREAM) + 1) if await _events(_cut(STREAM, at)) != EXPECTED]
    assert wrong == [], f"cuts at these offsets change the events: {wrong}"


async def test_every_cut_in_three_parses_like_the_whole() -> None:
    wrong: list[tuple[int, int]] = []
    for first in range(len(STREAM) + 1):
        for second in range(first, len(STREAM) + 1):
            if await _events(_cut(STREAM, first, second)) != EXPECTED:
                wrong.append((first, second))
    assert wrong == [], f"{len(wrong)} cuts change the events, the first: {wrong[:5]}"


async def test_one_byte_chunks_parse_like_the_whole() -> None:
    assert await _events(STREAM[i : i + 1] for i in range(len(STREAM))) == EXPECTED


async def test_an_event_ended_by_a_cr_is_not_held_for_the_next_chunk() -> None:
    """The CR ends the blank line whether or not an LF follows: the event is out at once."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await queue.get():
            yield chunk

    events = sse.parse(chunks())
    queue.put_nowait(b"data: first\r\r")
    async with asyncio.timeout(5):
        assert await anext(events) == sse.Event(data="first")
    queue.put_nowait(b"\ndata: second\r\n\r\n")
    queue.put_nowait(b"")
    assert [event async for event in events] == [sse.Event(data="second")]


def _completed_event(size: int) -> tuple[bytes, str]:
    """A `response.completed` event of about `size` bytes, with CRLF line ends, and its data."""
    head = b'{"type":"response.completed","response":{"id":"resp_1","output":[{"text":"'
    tail = b'"}]}}'
    data = head + b"x" * (size - len(head) - len(tail)) + tail
    return b"event: response.completed\r\ndata: " + data + b"\r\n\r\n", data.decode()


async def _within_cpu_budget(stream: bytes, step: int) -> AsyncIterator[bytes]:
    started = time.process_time()
    every = max(1, 4096 // step)
    for index, offset in enumerate(range(0, len(stream), step)):
        if index % every == 0:
            spent = time.process_time() - started
            assert spent < CPU_BUDGET_S, (
                f"{spent:.0f} s of CPU for the first {offset} of {len(stream)} bytes "
                f"in {step}-byte chunks: the reader is not linear"
            )
        yield stream[offset : offset + step]


async def _one_big_event(step: int) -> None:
    stream, data = _completed_event(BIG)
    events = [event async for event in sse.parse(_within_cpu_budget(stream, step))]
    assert len(events) == 1
    assert events[0].event == "response.completed"
    assert len(events[0].data) == len(data)
    assert events[0].data == data
    assert orjson.loads(events[0].data)["type"] == "response.completed"


async def test_a_16_mib_event_in_64_kib_chunks() -> None:
    await _one_big_event(64 * 1024)


async def test_a_16_mib_event_in_1_byte_chunks_in_linear_time() -> None:
    await _one_big_event(1)


async def _chunks_read(aiohttp_server: Any, chunks: list[bytes]) -> list[Any]:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(chunk)
            await asyncio.sleep(0.05)  # each its own read
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/responses", stream)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        url = str(server.make_url("/responses"))
        async with post_http(http, url, "k", {}, connect=5, sock_read=5) as reply:
            return [(c, [(e.event, e.data) for e in b]) async for c, b in reply.chunks()]


async def test_chunks_come_as_they_came_with_the_events_they_complete(
    aiohttp_server: Any,
) -> None:
    """`HttpReply.chunks` (app/upstream.py): each chunk unchanged, with the events it completes,
    in order, a line cut across chunks and CRLF line ends included."""
    chunks = [
        b"event: a\ndata: 1\n\nevent: b\nda",
        b"ta: 2\n\nevent: response.comp",
        b"leted\ndata: {}\n\ndata: 3\r",
        b"\n\r\n",
    ]
    read = await _chunks_read(aiohttp_server, chunks)
    assert [c for c, _ in read] == chunks
    assert [b for _, b in read] == [
        [("a", "1")],
        [("b", "2")],
        [("response.completed", "{}")],
        [("message", "3")],
    ]
