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
import pytest
from aiohttp import web

from app import sse
from app.relay import _AWAITED, _read
from app.turnpolicy import TERMINAL
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
            sieve = sse.Sieve(TERMINAL, _AWAITED, hold=0)
            return [(c, [(e.event, e.data) for e in sieve.feed(c)]) async for c in reply.chunks()]


async def test_chunks_come_as_they_came(aiohttp_server: Any) -> None:
    """`HttpReply.chunks` (app/upstream.py): each chunk unchanged, as it was read; a sieve fed
    them as they come (nothing held) gives the events that may matter as their chunk ends them
    (the first, the marked ones; `b` is skipped unread), a line cut across chunks and CRLF line
    ends included."""
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
        [],
        [("response.completed", "{}")],
        [("message", "3")],
    ]


# A stream as OpenAI and the simulator send it (LF line ends, an `event:` line each), with what a
# sieve must not miss: a terminal event without an `event:` line, one spelt with a JSON escape, an
# error, and a delta whose text holds a marker (decoded for nothing, but harmless).
SIEVE_STREAM = b"".join(
    [
        b": keep-alive\n\n",
        b'event: response.created\ndata: {"type":"response.created","response":{"error":null}}\n\n',
        *(
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"delta":"%d"}\n\n' % i
            for i in range(6)
        ),
        b'event: response.output_text.delta\ndata: {"delta":"an error here"}\n\n',
        b'data: {"type":"response.failed","response":{"status":"failed","n":1}}\n\n',
        b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n',
        b'data: {"type":"response.\\u0066ailed","response":{"n":2}}\n\n',
        b'event: error\ndata: {"type":"error"}\n\n',
    ]
)
COMPLETED = (
    b"event: response.completed\n"
    b'data: {"type":"response.completed","response":{"status":"completed"}}\n\n'
)
ERROR = b'event: error\ndata: {"type":"error","error":{"code":"server_error"}}\n\n'
# What a reader folds over: the first event, then (status, response) as app/relay.py reads them.
Folded = tuple[list[sse.Event], tuple[str | None, dict[str, Any] | None]]


def _folded(events: list[sse.Event]) -> Folded:
    return events[:1], _read(events, None, None)


def _sieved(parts: Iterable[bytes], hold: int) -> Folded:
    sieve = sse.Sieve(TERMINAL, _AWAITED, hold)
    return _folded([event for part in parts for event in sieve.feed(part)] + sieve.finish())


@pytest.mark.parametrize("hold", [0, 64, 64 * 1024])
async def test_the_sieve_folds_like_every_event_however_cut(hold: int) -> None:
    """`sse.Sieve` against the full parser: the first event, and the status and response the POST
    relay reads off what it returns, for every cut of the stream in two and in three (every 11th
    offset): streams ending in a terminal event, in an error after one, in an error after an
    escaped terminal, in no event that matters, LF and CRLF line ends (a CR turns the sieve into
    the parser from there on); chunks searched as they come, a few together, or all at the end."""
    streams = [
        SIEVE_STREAM + COMPLETED,
        SIEVE_STREAM + COMPLETED + ERROR,
        SIEVE_STREAM,
        STREAM,
        SIEVE_STREAM + STREAM,
        STREAM + SIEVE_STREAM + COMPLETED,
    ]
    outcomes = set()
    for stream in streams:
        expected = _folded(await _events([stream]))
        outcomes.add(str(expected[1]))
        cuts: list[tuple[int, ...]] = [(at,) for at in range(len(stream) + 1)]
        cuts += [
            (first, second)
            for first in range(0, len(stream) + 1, 11)
            for second in range(first, len(stream) + 1, 11)
        ]
        wrong = [at for at in cuts if _sieved(_cut(stream, *at), hold) != expected]
        assert wrong == [], f"{len(wrong)} cuts change what the sieve gives: {wrong[:5]}"
        assert _sieved((stream[i : i + 1] for i in range(len(stream))), hold) == expected
    assert len(outcomes) == 4, outcomes  # completed, error with and without a response, none


@pytest.mark.parametrize(
    ("hold", "named", "decoded"), [(0, True, 6), (64 * 1024, True, 2), (64 * 1024, False, 2)]
)
def test_the_sieve_skips_the_deltas(hold: int, named: bool, decoded: int) -> None:
    """Of a stream's 14 events fed byte by byte, the sieve decodes the first and, searched as they
    come, the marked ones (the created event, whose response holds `"error":null`, is the first;
    the delta that says "error", failed, the escape, error, completed); searched at the end,
    only the last, completed, with or without an `event:` line."""
    sieve = sse.Sieve(TERMINAL, _AWAITED, hold)
    stream = SIEVE_STREAM + (COMPLETED if named else COMPLETED.split(b"\n", 1)[1])
    given = [event for i in range(len(stream)) for event in sieve.feed(stream[i : i + 1])]
    given += sieve.finish()
    assert len(given) == decoded, given
    assert orjson.loads(given[-1].data)["type"] == "response.completed"


async def test_the_sieve_is_linear_on_a_16_mib_event() -> None:
    """A 16 MiB terminal event with LF line ends in 1 KiB chunks, first as the stream's first
    event (decoded as it comes), then after one (held and searched 64 KiB at a time): each byte
    searched once (a sieve that searched its whole pending event on every chunk would copy about
    128 GiB)."""
    big, data = _completed_event(BIG)
    big = big.replace(b"\r\n", b"\n")
    for stream in (big, b"data: first\n\n" + big):
        sieve = sse.Sieve(TERMINAL, _AWAITED)
        events = [
            event async for part in _within_cpu_budget(stream, 1024) for event in sieve.feed(part)
        ]
        events += sieve.finish()
        assert (events[-1].event, events[-1].data) == ("response.completed", data)


def test_the_post_relay_s_markers_cover_the_events_it_reads() -> None:
    """app/relay.py reads the terminal events and errors: each name holds one of its markers."""
    assert all(any(marker in name.encode() for marker in _AWAITED) for name in (*TERMINAL, "error"))
