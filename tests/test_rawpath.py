"""The raw hot path (app/rawpath.py): frames forwarded as bytes, in order, unchanged.

The splitter is tested in front of aiohttp's own reader (its Cython `WebSocketReader` and
`WebSocketDataQueue`, fed bytes the way aiohttp's client protocol feeds them), with byte streams
cut at every place; the session's use of it over real sockets through the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WebSocketError, WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.client_proto import ResponseHandler
from conftest import (
    MODEL,
    UPSTREAM_KEY,
    Connect,
    Gateway,
    Sim,
    create,
    eventually,
    recv,
    send,
    until_terminal,
)

from app import rawpath, upstream, upstreamlink
from app.bench.load import Shape, agent_fields
from app.metrics import REGISTRY
from app.rawpath import RAW_MAX, RawForwarder
from app.upstream import UpstreamConn


def frame(opcode: int, payload: bytes, *, fin: bool = True, wide: bool = False) -> bytes:
    """A server frame (unmasked); `wide`: a 64-bit length where 16 bits would do."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if wide:
        head = struct.pack("!BBQ", b0, 127, n)
    elif n < 126:
        head = struct.pack("!BB", b0, n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    return head + payload


def event(kind: str, i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"type": kind, "sequence_number": i, "delta": "x" * pad})


SOURCE = object()  # what the forwarder says its frames come from (the upstream socket)

STREAM = [
    frame(0x9, b"ping"),  # control: aiohttp answers it, the session never sees it
    frame(0x1, event("response.created", 0)),  # inspected
    frame(0x1, event("response.output_text.delta", 1)),
    frame(0x1, event("response.output_text.delta", 2, 200)),  # 16-bit length
    frame(0x1, event("response.output_text.delta", 3, RAW_MAX + 10)),  # too large: aiohttp's
    frame(0x1, event("response.output_text.delta", 4)),
    frame(0x1, event("response.output_text.delta", 5)[:20], fin=False),  # fragmented
    frame(0x0, event("response.output_text.delta", 5)[20:]),
    frame(0x1, event("response.output_text.delta", 6), wide=True),  # not minimal: aiohttp's
    frame(0x1, event("response.output_text.delta", 7)),
    frame(0x1, event("response.output_text.delta", 8)),
    frame(0x1, event("response.completed", 9)),  # inspected
]


def split(chunk: bytes) -> list[tuple[bytes, bytes]]:
    """The frames in `chunk` (small unmasked ones, as the raw path sends), with their payloads."""
    frames = []
    while chunk:
        length, head = chunk[1] & 0x7F, 2
        if length == 126:
            length, head = struct.unpack("!H", chunk[2:4])[0], 4
        frames.append((chunk[: head + length], chunk[head : head + length]))
        chunk = chunk[head + length :]
    return frames


class Replay:
    """What a replay of STREAM gave: the sequence numbers in the order the client would see
    them, those that went raw, the writes the raw path made, and the pings aiohttp saw."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.raw: list[int] = []
        self.writes = 0
        self.pings = 0


async def _replay(cuts: list[int], accept: bool) -> Replay:
    """Feed STREAM cut at `cuts`; the sink takes what is not inspected when `accept`."""
    loop = asyncio.get_running_loop()
    protocol = ResponseHandler(loop)
    queue = WebSocketDataQueue(protocol, 2**16, loop=loop)
    inner = WebSocketReader(queue, 2**20, False, True)
    out = Replay()
    taken: list[int] = []  # taken by the sink, not written yet

    def sink(source: object, data: bytes, start: int, payload: int, end: int) -> bool:
        assert source is SOURCE, "the sink is told the forwarder's source"
        assert forwarder.pending == 0, "a raw frame would overtake one on aiohttp's path"
        body = orjson.loads(data[payload:end])
        if not accept or body["type"] in ("response.completed",):
            return False
        taken.append(body["sequence_number"])
        return True

    def write(frames: bytes, count: int, received: float) -> None:
        assert received <= time.perf_counter()
        out.writes += 1
        sent = split(frames)
        assert len(sent) == count and all(f in STREAM for f, _ in sent)  # the bytes as they came
        numbers = [orjson.loads(payload)["sequence_number"] for _, payload in sent]
        assert numbers == taken[:count]
        del taken[:count]
        out.seen += numbers
        out.raw += numbers

    wakes = [0]

    def woken(source: object) -> None:
        assert source is SOURCE
        wakes[0] += 1

    forwarder = RawForwarder(inner, sink, write, woken, SOURCE)
    stream = b"".join(STREAM)
    edges = [0, *sorted(cuts), len(stream)]
    for start, end in itertools.pairwise(edges):
        before = wakes[0]
        error, _ = forwarder.feed_data(stream[start:end])
        assert not error
        assert not taken, "the sink took frames the forwarder did not write in the same read"
        # No reader runs until woken: whatever aiohttp queued in this read woke one.
        assert not queue._buffer or wakes[0] > before, "a message queued with no reader woken"
        # The session's reader: handles what aiohttp queued, one message at a time.
        while queue._buffer:
            msg = await queue.read()
            if msg.type is WSMsgType.PING:
                out.pings += 1
                continue
            out.seen.append(orjson.loads(msg.data)["sequence_number"])
            forwarder.pending -= 1
    assert forwarder.pending == 0 and forwarder.forwarded == len(out.raw)
    return out


async def test_frames_reach_the_client_in_order_whatever_the_cuts() -> None:
    stream_length = len(b"".join(STREAM))
    rng = random.Random(6)
    for trial in range(300):
        if trial < 40:  # a cut at each place near the start (headers split byte by byte)
            cuts = [trial + 1]
        else:
            cuts = rng.sample(range(1, stream_length), rng.randint(1, 30))
        for accept in (True, False):
            got = await _replay(cuts, accept)
            assert got.seen == list(range(10)), (cuts, accept, got.seen)
            assert got.pings == 1
            if not accept:
                assert got.raw == [] and got.writes == 0
    # Fed whole: what comes before the first frame aiohttp must have (3, too large) goes raw,
    # in one write, the rest waits behind it.
    got = await _replay([], True)
    assert got.raw == [0, 1, 2] and got.writes == 1
    # Fed a frame at a time, the session's reader draining in between: the unfragmented, small,
    # minimal, non-terminal ones go raw, a write each; 3 (too large), 5 (fragmented), 6 (not
    # minimal) and the terminal 9 do not.
    boundaries = list(itertools.accumulate(len(f) for f in STREAM))[:-1]
    got = await _replay(boundaries, True)
    assert got.raw == [0, 1, 2, 4, 7, 8] and got.writes == 6


async def test_odd_frames_are_aiohttps_to_judge() -> None:
    """A masked frame (servers do not mask) is never sent on as it came; a frame aiohttp
    refuses (reserved bits without an extension) is its protocol error to report."""
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(ResponseHandler(loop), 2**16, loop=loop)
    forwarder = RawForwarder(
        WebSocketReader(queue, 2**20, False, True), lambda o, d, s, p, e: True, lambda f, c, r: None
    )
    masked = bytes([0x81, 0x80 | 2]) + b"\x01\x02\x03\x04" + bytes([ord("h") ^ 1, ord("i") ^ 2])
    error, _ = forwarder.feed_data(masked)
    assert not error and forwarder.forwarded == 0 and forwarder.pending == 1
    assert (await queue.read()).data == "hi"
    error, _ = forwarder.feed_data(bytes([0xC1, 2]) + b"hi")
    assert error
    with pytest.raises(WebSocketError, match="reserved bits"):
        await queue.read()  # what the session's `receive()` turns into an ERROR message


async def test_deltas_go_raw_through_the_gateway_and_arrive_whole(
    gateway: Gateway, connect: Connect
) -> None:
    async with connect() as ws:
        for _ in range(2):
            await send(ws, create(metadata={"sim_deltas": "60"}))
            events = await until_terminal(ws)
            numbers = [e["sequence_number"] for e in events]
            assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
            assert events[-1]["type"] == "response.completed"
            deltas = "".join(
                e["delta"] for e in events if e["type"] == "response.output_text.delta"
            )
            done = next(e for e in events if e["type"] == "response.output_text.done")
            assert deltas == done["text"]
        (session,) = gateway.sessions
        assert session.upstream is not None
        assert session.upstream.raw is not None
        # Most deltas: not the first event of a turn, not the inspected ones (created,
        # completed), nor those that came in one read behind one of those (order first).
        assert session.upstream.raw.forwarded > 60, session.upstream.raw.forwarded


async def test_terminal_events_go_raw_and_end_their_turns(
    gateway: Gateway, connect: Connect
) -> None:
    """A terminal event whose turn can end at once goes to the client as it came and the turn
    ends in the same call, as on aiohttp's path: the turn counted, its response remembered for
    the chain, the next `response.create` accepted the moment the event is in."""

    def completed() -> float:
        labels = {"model": MODEL, "status": "completed"}
        return REGISTRY.get_sample_value("gateway_responses_total", labels) or 0.0

    before = completed()
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "3"}))  # opens the upstream socket
        await until_terminal(ws)
        (session,) = gateway.sessions
        assert session.upstream is not None and session.upstream.raw is not None
        raw = session.upstream.raw
        forwarded = raw.forwarded
        previous: str | None = None
        for _ in range(5):
            chained = {} if previous is None else {"previous_response_id": previous}
            await send(ws, create(**chained, metadata={"sim_terminal_only": "true"}))
            (event,) = await until_terminal(ws)  # the terminal event alone
            assert event["type"] == "response.completed"
            previous = event["response"]["id"]
        assert raw.forwarded == forwarded + 5  # every one raw
        assert session.upstream.memory.chain_for(previous) is not None
        assert session.turn is None and not session.in_flight
    assert completed() == before + 6


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_RAW_FORWARDING": False}])
async def test_raw_forwarding_off_takes_aiohttps_path(gateway: Gateway, connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "30"}))
        events = await until_terminal(ws)
        assert events[-1]["type"] == "response.completed"
        (session,) = gateway.sessions
        assert session.upstream is not None
        assert session.upstream.raw is None


async def test_a_model_check_still_answers_while_deltas_go_raw(
    gateway: Gateway, connect: Connect
) -> None:
    """A refused frame mid-stream gets its error; the stream goes on, whole and in order."""
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "200", "sim_delay_ms": "2"}))
        first = await recv(ws)
        assert first["type"] == "response.created"
        await send(ws, create())  # a second response.create while one is in flight
        events = [first]
        while events[-1]["type"] != "response.completed":  # the error is not this turn's end
            events.append(await recv(ws))
        errors = [e for e in events if e["type"] == "error"]
        assert [e["error"]["code"] for e in errors] == ["response_already_in_flight"]
        rest = [e for e in events if e["type"] != "error"]
        numbers = [e["sequence_number"] for e in rest]
        assert numbers == list(range(len(rest)))
        assert rest[-1]["type"] == "response.completed"


# -- aiohttp's internals not as expected: the forwarder stays out ----------------------------------

_MISSING = object()


class Reader:
    """aiohttp's WebSocketDataQueue as another aiohttp might have it: its queue of messages
    (`_buffer`) gone or of another type; everything else is the real queue's."""

    def __init__(self, inner: Any, buffer: Any = _MISSING) -> None:
        self._inner = inner
        self._replacement = buffer

    def __getattr__(self, name: str) -> Any:
        if name == "_buffer":
            if self._replacement is _MISSING:
                raise AttributeError(name)
            return self._replacement
        return getattr(self._inner, name)


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.rawpath"]


@pytest.fixture
def fresh_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind of refusal is logged once per process: start this test with none logged."""
    monkeypatch.setattr(rawpath, "_LOGGED", set(), raising=False)


@pytest.fixture
async def upstream_ws(sim: Sim) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A real aiohttp client WebSocket, as the session opens them (to the simulator)."""
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        async with http.ws_connect(sim.base_url + "/responses", headers=headers) as ws:
            yield ws


@pytest.mark.parametrize("buffer", [_MISSING, [], None], ids=["missing", "list", "none"])
async def test_install_refuses_a_reader_without_its_queue(
    upstream_ws: aiohttp.ClientWebSocketResponse,
    fresh_refusals: None,
    caplog: pytest.LogCaptureFixture,
    buffer: Any,
) -> None:
    """Without the reader's queue the forwarder cannot know what aiohttp holds already: frames
    sent raw would overtake it. It stays out, and says so once."""
    ws = upstream_ws
    protocol = ws._conn.protocol  # type: ignore[union-attr]
    parser = protocol._payload_parser  # type: ignore[union-attr]
    ws._reader = Reader(ws._reader, buffer)  # type: ignore[assignment]
    for _ in range(2):
        assert RawForwarder.install(ws, lambda o, d, s, p, e: True, lambda f, c, r: None) is None
    assert protocol._payload_parser is parser  # type: ignore[union-attr]
    (line,) = refusals(caplog)
    assert line.levelno == logging.WARNING and "_buffer" in line.__dict__["reason"]
    await send(ws, create(model="gpt-test"))  # aiohttp's own path still reads every event
    events = await until_terminal(ws)
    assert events[-1]["type"] == "response.completed"


async def test_install_takes_a_reader_as_expected(
    upstream_ws: aiohttp.ClientWebSocketResponse,
    fresh_refusals: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    forwarder = RawForwarder.install(upstream_ws, lambda o, d, s, p, e: False, lambda f, c, r: None)
    assert forwarder is not None and not refusals(caplog)


async def test_a_session_whose_reader_lacks_its_queue_forwards_every_event_in_order(
    gateway: Gateway,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    fresh_refusals: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    opened = upstream.open_upstream

    async def open_without_queue(*args: Any, **kwargs: Any) -> UpstreamConn:
        conn = await opened(*args, **kwargs)
        conn.ws._reader = Reader(conn.ws._reader)  # type: ignore[assignment]
        return conn

    monkeypatch.setattr(upstreamlink, "open_upstream", open_without_queue)
    async with connect() as ws:
        for _ in range(2):
            await send(ws, create(metadata={"sim_deltas": "60"}))
            events = await until_terminal(ws)
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            assert events[-1]["type"] == "response.completed"
            deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
            assert len(deltas) == 60
            done = next(e for e in events if e["type"] == "response.output_text.done")
            assert "".join(deltas) == done["text"]
        (live,) = gateway.sessions
        assert live.upstream is not None
        assert live.upstream.raw is None  # aiohttp's path: the reader's queue could not be seen
    assert len(refusals(caplog)) == 1


@pytest.mark.parametrize("sim_options", [{"max_connection_seconds": 1.0}], indirect=True)
async def test_an_idle_upstream_socket_keeps_no_reader_and_its_end_is_still_seen(
    gateway: Gateway, connect: Connect
) -> None:
    """While every frame goes raw no task reads the upstream socket (an idle socket's memory);
    what the forwarder hands on while the socket is idle (here OpenAI's connection limit: an
    error frame, then a close) starts one, which sees the socket end, and the next turn goes
    out on a new socket."""
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "3"}))
        await until_terminal(ws)
        (session,) = gateway.sessions
        link = session.upstream
        assert link is not None and link.raw is not None
        first = link.conn
        assert first is not None
        # The turn's tail: a reader of what went aiohttp's way, if any, ends with it.
        await eventually(lambda: link._reader is None, timeout=1.0)
        await eventually(lambda: link.conn is not first, timeout=10.0)  # the limit, the close
        assert link.conn is None and link._reader is None
        assert link.last_close[0] is not None
        await send(ws, create(metadata={"sim_deltas": "3"}))
        events = await until_terminal(ws)
        assert events[-1]["type"] == "response.completed"
        assert link.conn is not None and link.conn is not first


def _created(response: dict[str, Any], *, response_first: bool = False) -> bytes:
    kind = "response.created"
    if response_first:
        return orjson.dumps({"type": kind, "response": response, "sequence_number": 0})
    return orjson.dumps({"type": kind, "sequence_number": 0, "response": response})


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (_created({"id": "resp_1", "object": "response"}), "resp_1"),
        (_created({"id": "resp_2", "object": "response"}, response_first=True), "resp_2"),
        # What the request echoes cannot pass for the event's own `response`:
        (_created({"id": "resp_3", "instructions": '"response":{"id":"no"}'}), "resp_3"),
        # Not in the usual form: the caller parses the event.
        (_created({"object": "response", "id": "resp_4"}), None),
        (_created({"object": "response", "tools": [{"response": {"id": "no"}}], "id": "r"}), None),
        (b'{"type":"response.created","response":{"id":"resp_\\u0035"}}', None),
        (b'{"type":"response.created","response":{"id":"resp_6', None),
    ],
)
def test_a_created_event_s_response_id_is_read_without_parsing_it(
    frame: bytes, expected: str | None
) -> None:
    assert upstreamlink._leading_response_id(frame, 0, len(frame)) == expected


def test_the_leading_response_id_is_the_parsed_one_or_none() -> None:
    """Whatever the order of keys and whatever the request echoes, the id read from the bytes is
    the one a parse finds, or there is none (and the event is parsed)."""
    rng = random.Random(20)
    words = ["id", "response", "object", "tools", '"response":{"id":"x"}', "é", "\\"]
    for _ in range(2000):
        fields: dict[str, Any] = {rng.choice(words): rng.choice(words) for _ in range(3)}
        fields[rng.choice(words)] = {rng.choice(words): rng.choice(words)}
        fields["id"] = rng.choice(["resp_a", "resp_\u00e9", 'resp_"q', "resp_\\b", 7])
        keys = list(fields)
        rng.shuffle(keys)
        response = {key: fields[key] for key in keys}
        frame = _created(response, response_first=rng.random() < 0.5)
        start = rng.randint(0, 3)
        frame = b"\x81\x7e\x00\x00"[:start] + frame
        parsed = upstreamlink._response_id(orjson.loads(frame[start:]))
        found = upstreamlink._leading_response_id(frame, start, len(frame))
        assert found is None or found == parsed, (frame, found, parsed)


async def test_an_agent_s_turn_with_echoed_instructions_and_tools(
    gateway: Gateway, connect: Connect
) -> None:
    """The bench's agent-shaped turn (`--agent-request-kb`): the request's instructions and
    tools come back in `response.created` and the terminal event, whole, through the raw path;
    the created event's id, read from its bytes, is the turn's."""
    fields = agent_fields(20)
    frame = Shape.of_events(MODEL, 20, request_kb=20).frame()
    assert 19_000 < len(frame) < 23_000
    async with connect() as ws:
        await ws.send_str(frame)
        events = await until_terminal(ws)
        created, completed = events[0], events[-1]
        assert created["type"] == "response.created"
        assert created["response"]["tools"] == fields["tools"]
        assert completed["response"]["instructions"] == fields["instructions"]
        (session,) = gateway.sessions
        link = session.upstream
        assert link is not None and link.raw is not None and link.raw.forwarded == len(events)
        assert link.memory.remembers(created["response"]["id"])
        assert completed["response"]["id"] == created["response"]["id"]
