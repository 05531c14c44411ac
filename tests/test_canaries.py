"""Canaries: each private part of a dependency that the gateway relies on, checked on its own.

pyproject.toml holds aiohttp, prometheus-client and redis to the series these were written
against (hiredis and uvloop to their major series). After an upgrade, a part that moved fails
here, by name, with the code that depends on it in the message; the behaviour tests that would
fail too (tests/test_rawpath.py, tests/test_hot_path_parts.py, tests/test_uvloop.py) say less
clearly why.

`RawForwarder.install` must stay out (return None, leave aiohttp's parser in place) wherever
aiohttp's internals are not as expected: tests/test_rawpath.py checks a reader without its
queue (`test_install_refuses_a_reader_without_its_queue`), the test at the end here the other
refusals, on real client sockets.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import hiredis
import pytest
import uvloop
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from conftest import UPSTREAM_KEY, Sim, create, send, until_terminal
from prometheus_client import CollectorRegistry, Histogram
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import Connection

from app import shed
from app.rawpath import RawForwarder

RAWPATH = "app/rawpath.py RawForwarder.install/feed_data"
SHED = "app/shed.py"
TALLY = "app/metrics.py Tally"
HIREDIS_PACKING = "app/keystore.py _HiredisPacking/_hiredis_packing"
REPLIES = "app/keystore.py _replies"


@pytest.fixture
async def client_ws(sim: Sim) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A real aiohttp client WebSocket, as the session opens them upstream."""
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        async with http.ws_connect(sim.base_url + "/responses", headers=headers) as ws:
            yield ws


def _protocol(ws: aiohttp.ClientWebSocketResponse) -> Any:
    return getattr(getattr(ws, "_conn", None), "protocol", None)


# aiohttp: the client socket's parser slots (app/rawpath.py)


async def test_aiohttp_client_socket_has_its_connection_protocol(
    client_ws: aiohttp.ClientWebSocketResponse,
) -> None:
    assert isinstance(_protocol(client_ws), ResponseHandler), (
        f"aiohttp: ClientWebSocketResponse._conn.protocol is no ResponseHandler ({RAWPATH})"
    )


async def test_aiohttp_protocol_payload_parser_is_the_sockets_parser(
    client_ws: aiohttp.ClientWebSocketResponse,
) -> None:
    parser = getattr(_protocol(client_ws), "_payload_parser", None)
    assert parser is not None and parser is getattr(client_ws, "_parser", None), (
        f"aiohttp: ResponseHandler._payload_parser is not ClientWebSocketResponse._parser "
        f"({RAWPATH})"
    )


async def test_aiohttp_payload_parser_answers_protocol_error_and_tail(
    client_ws: aiohttp.ClientWebSocketResponse,
) -> None:
    parser: Any = client_ws._parser
    assert callable(getattr(parser, "feed_eof", None)), f"aiohttp: no feed_eof ({RAWPATH})"
    assert parser.feed_data(b"") == (False, b""), (
        f"aiohttp: WebSocketReader.feed_data no longer returns (protocol error, tail) ({RAWPATH})"
    )


async def test_aiohttp_reader_queue_is_a_deque(client_ws: aiohttp.ClientWebSocketResponse) -> None:
    queued = getattr(getattr(client_ws, "_reader", None), "_buffer", None)
    assert isinstance(queued, deque), (
        f"aiohttp: ClientWebSocketResponse._reader._buffer is no deque ({RAWPATH}: the messages "
        "aiohttp holds already)"
    )


class _Recording:
    """A payload parser in front of aiohttp's, as RawForwarder is: records, hands on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fed = 0

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.fed += len(data)
        result: tuple[bool, bytes] = self.inner.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self.inner.feed_eof()


async def test_aiohttp_feeds_received_bytes_to_the_payload_parser_slot(
    client_ws: aiohttp.ClientWebSocketResponse,
) -> None:
    protocol = _protocol(client_ws)
    recording = _Recording(protocol._payload_parser)
    protocol._payload_parser = recording
    await send(client_ws, create(model="gpt-test"))
    events = await until_terminal(client_ws)
    assert events[-1]["type"] == "response.completed"
    assert recording.fed > 0, (
        f"aiohttp: ResponseHandler.data_received no longer feeds _payload_parser ({RAWPATH})"
    )


async def test_aiohttp_client_socket_sheds_its_handshake_and_still_serves(
    client_ws: aiohttp.ClientWebSocketResponse,
) -> None:
    """`shed.client_handshake` finds the parts it drops (a False here means aiohttp moved them:
    every upstream socket would keep its handshake again), and the socket then serves turns,
    closes cleanly, and sees its connection end without the parser."""
    moved = f"aiohttp: a client socket's handshake parts moved ({SHED})"
    assert shed.client_handshake(client_ws), moved
    assert _protocol(client_ws)._parser is None
    assert not client_ws._response.headers and not client_ws._response.request_info.headers
    for _ in range(2):
        await send(client_ws, create())
        assert (await until_terminal(client_ws))[-1]["type"] == "response.completed"
    await client_ws.close()
    assert client_ws.close_code == 1000


async def test_aiohttp_client_socket_shed_of_its_handshake_survives_a_dropped_connection(
    sim: Sim,
) -> None:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        ws = await http.ws_connect(sim.base_url + "/responses", headers=headers)
        assert shed.client_handshake(ws)
        _protocol(ws).transport.abort()  # connection_lost, with no parser to feed the end to
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
        assert ws.closed


# aiohttp: the server side (app/handlers.py, app/listener.py, app/cli.py)


async def test_aiohttp_server_socket_sheds_its_handshake_parser_and_still_serves(
    aiohttp_client: Any,
) -> None:
    """`shed.server_handshake` finds the parser it drops, and the socket then echoes, closes
    cleanly, and ends without it when its client drops the connection."""
    shed_done: list[bool] = []
    ended: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        shed_done.append(shed.server_handshake(request))
        shed_done.append(request.protocol._parser is None)
        try:
            async for msg in ws:
                await ws.send_str(f"echo {msg.data}")
        finally:  # the end of its connection may cancel the handler
            ended.append("ended")
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.ws_connect("/") as ws:
        for text in ("one", "two"):
            await ws.send_str(text)
            assert (await ws.receive()).data == f"echo {text}"
    assert ws.close_code == 1000
    dropped = await client.ws_connect("/")
    await dropped.send_str("three")
    assert (await dropped.receive()).data == "echo three"
    dropped._conn.protocol.transport.abort()
    for _ in range(50):
        if len(ended) == 2:
            break
        await asyncio.sleep(0.05)
    assert shed_done == [True, True, True, True], f"aiohttp: the server's parser moved ({SHED})"
    assert ended == ["ended", "ended"]


async def test_aiohttp_server_socket_hands_text_over_undecoded(aiohttp_client: Any) -> None:
    got: list[Any] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(decode_text=False)
        await ws.prepare(request)
        got.append((await ws.receive()).data)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    async with client.ws_connect("/") as ws:
        await ws.send_str("héllo")
        await ws.receive()
    assert got == ["héllo".encode()], (
        "aiohttp: WebSocketResponse(decode_text=False) no longer gives text frames as bytes "
        "(app/handlers.py; app/session.py judges the size before the UTF-8)"
    )


async def test_aiohttp_server_keeps_its_handler_options_in_kwargs() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler, keepalive_timeout=7.0)
    assert getattr(server, "_kwargs", None) == {"keepalive_timeout": 7.0}, (
        "aiohttp: web.Server._kwargs no longer holds the RequestHandler options "
        "(app/listener.py _DeadlineServer passes them on)"
    )
    assert getattr(server, "_loop", None) is asyncio.get_running_loop(), (
        "aiohttp: web.Server._loop is gone (app/listener.py _DeadlineServer arms its timers on it)"
    )


async def test_aiohttp_runner_builds_its_server_in_make_server() -> None:
    made: list[web.Server] = []

    class Runner(web.AppRunner):
        async def _make_server(self) -> web.Server:
            made.append(await super()._make_server())
            return made[-1]

    runner = Runner(web.Application())
    await runner.setup()
    try:
        assert made and runner.server is made[0], (
            "aiohttp: AppRunner.setup no longer takes its server from _make_server "
            "(app/listener.py GatewayRunner)"
        )
    finally:
        await runner.cleanup()


async def test_aiohttp_runner_cleanup_reads_shutdown_timeout() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    assert isinstance(getattr(runner, "_shutdown_timeout", None), float)
    waited: list[float] = []
    server: Any = runner.server
    shutdown = server.shutdown

    async def recorded(timeout: float | None = None) -> None:
        waited.append(timeout if timeout is not None else math.nan)
        await shutdown(timeout)

    server.shutdown = recorded
    runner._shutdown_timeout = 0.25
    await runner.cleanup()
    assert waited == [0.25], (
        "aiohttp: AppRunner.cleanup no longer waits _shutdown_timeout for handlers "
        "(app/cli.py gives them what is left of the drain)"
    )


async def test_aiohttp_tcp_site_keeps_its_listening_server() -> None:
    runner = web.AppRunner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        sockets = getattr(getattr(site, "_server", None), "sockets", None)
        assert sockets and sockets[0].getsockname()[1] > 0, (
            "aiohttp: TCPSite._server.sockets is gone (app/cli.py prints the bound port)"
        )
    finally:
        await runner.cleanup()


# prometheus-client: Histogram internals (app/metrics.py Tally)


def _histogram() -> Histogram:
    return Histogram("canary_seconds", "x", buckets=(0.1, 1.0), registry=CollectorRegistry())


def test_prometheus_histogram_upper_bounds() -> None:
    bounds = getattr(_histogram(), "_upper_bounds", None)
    assert bounds == [0.1, 1.0, math.inf], (
        f"prometheus-client: Histogram._upper_bounds is not the sorted bucket list ({TALLY})"
    )


def test_prometheus_histogram_buckets_count_each_bucket_alone() -> None:
    histogram = _histogram()
    histogram.observe(0.5)
    counts = [bucket.get() for bucket in getattr(histogram, "_buckets", [])]
    assert counts == [0.0, 1.0, 0.0], (
        "prometheus-client: Histogram._buckets are not one value per bucket, non-cumulative, "
        f"with .get/.inc ({TALLY} adds to them)"
    )


def test_prometheus_histogram_sum_is_a_value() -> None:
    histogram = _histogram()
    total: Any = getattr(histogram, "_sum", None)
    total.inc(2.5)
    (family,) = histogram.collect()
    sums = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert sums == [2.5], f"prometheus-client: Histogram._sum is not its sum's value ({TALLY})"


# redis-py and hiredis (app/keystore.py, app/dsn.py)


def test_redis_pool_makes_connections_of_its_connection_class() -> None:
    pool = BlockingConnectionPool.from_url("redis://127.0.0.1:1/0")

    class Marked(pool.connection_class):  # type: ignore[name-defined,misc]
        pass

    pool.connection_class = Marked
    assert isinstance(pool.make_connection(), Marked), (  # type: ignore[no-untyped-call]
        f"redis-py: ConnectionPool.make_connection ignores connection_class ({HIREDIS_PACKING})"
    )


async def test_redis_connection_sends_through_pack_command() -> None:
    packed: list[tuple[Any, ...]] = []
    sent: list[Any] = []

    class Counting(Connection):
        def pack_command(self, *args: Any) -> list[bytes]:
            packed.append(args)
            return super().pack_command(*args)

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent.append(command)

    conn = Counting()
    await conn.send_command("GET", "k")
    conn.pack_commands([("PING",), ("GET", "k")])
    assert packed == [("GET", "k"), ("PING",), ("GET", "k")] and sent, (
        "redis-py: send_command/pack_commands no longer go through Connection.pack_command "
        f"({HIREDIS_PACKING} overrides it)"
    )


async def test_redis_hiredis_parser_hands_replies_as_the_batcher_reads_them(
    redis_url: str,
) -> None:
    """app/keystore.py `_replies` reads a batch's replies off the connection's hiredis reader:
    `_parser._reader` (a `hiredis.Reader`), `_parser._connected`, `read_from_socket` (feeds the
    reader what the socket has) and NOT_ENOUGH_DATA (what the reader gives while a reply is not
    whole); an error reply comes back as redis-py's exception, not raised."""
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
    from redis.exceptions import ResponseError

    pool = BlockingConnectionPool.from_url(redis_url)
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        parser = conn._parser
        reader = getattr(parser, "_reader", None)
        assert isinstance(reader, hiredis.Reader) and parser._connected is True, (
            f"redis-py: the parser's hiredis reader moved ({REPLIES})"
        )
        assert reader.gets() is NOT_ENOUGH_DATA, f"redis-py: NOT_ENOUGH_DATA changed ({REPLIES})"
        await conn.send_packed_command(
            hiredis.pack_command(("PING",)) + hiredis.pack_command(("NOSUCHCOMMAND",)),
            check_health=False,
        )
        replies: list[Any] = []
        while len(replies) < 2:
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                assert await parser.read_from_socket(), f"redis-py: read_from_socket ({REPLIES})"
            else:
                replies.append(reply)
        assert replies[0] == b"PONG" and isinstance(replies[1], ResponseError), (
            f"redis-py: the hiredis reader's replies changed ({REPLIES}): {replies!r}"
        )
    finally:
        await pool.release(conn)
        await pool.disconnect()


def test_redis_writes_without_wait_for_when_a_connection_has_no_socket_timeout() -> None:
    """app/keystore.py `_Batcher._take` lifts the held connection's `socket_timeout` so that
    `send_packed_command` writes without `asyncio.wait_for` (a task per write); the batch has a
    timeout of its own. A series that reads the timeout elsewhere would wrap the writes again
    (slower, not wrong)."""
    import inspect

    source = inspect.getsource(Connection.send_packed_command)
    assert "if self.socket_timeout:" in source and "check_health" in source, (
        "redis-py: Connection.send_packed_command no longer skips wait_for without a socket "
        "timeout, or lost check_health (app/keystore.py _Batcher._take)"
    )


def test_uuid_keeps_its_value_in_two_slots() -> None:
    """app/ids.py `uuid4` builds a UUID by setting its `int` and `is_safe` slots, as
    `UUID.__init__` does, without its argument checks."""
    import uuid

    from app import ids

    made = ids.uuid4()
    assert uuid.UUID.__slots__ == ("int", "is_safe", "__weakref__"), (
        "CPython: uuid.UUID's slots changed (app/ids.py uuid4)"
    )
    assert made == uuid.UUID(str(made)) and hash(made) == hash(uuid.UUID(str(made))), (
        "CPython: a UUID with only its slots set is not the UUID it prints (app/ids.py uuid4)"
    )


def test_hiredis_packs_a_command_tuple() -> None:
    packed = hiredis.pack_command(("SET", b"k\xff", -7))  # type: ignore[arg-type]  # its stub's tuple is too narrow
    assert packed == b"*3\r\n$3\r\nSET\r\n$2\r\nk\xff\r\n$2\r\n-7\r\n", (
        f"hiredis: pack_command no longer packs a tuple of str, bytes and int ({HIREDIS_PACKING})"
    )


def test_redis_connection_refuses_an_unknown_url_option_by_name() -> None:
    pool = BlockingConnectionPool.from_url("redis://127.0.0.1/0?no_such_option=1")
    with pytest.raises(TypeError, match="argument 'no_such_option'"):
        pool.make_connection()  # type: ignore[no-untyped-call]


# uvloop (app/session.py watch_outbound: a capability check, not asyncio's classes)


def test_uvloop_transports_report_their_write_buffer() -> None:
    async def main() -> Any:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        transport = writer.transport
        writer.close()
        server.close()
        return transport

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        transport = runner.run(main())
    assert all(
        callable(getattr(transport, name, None))
        for name in ("get_write_buffer_size", "set_write_buffer_limits", "is_closing", "abort")
    ), "uvloop: a TCP transport lacks the write-buffer calls app/session.py uses"


# RawForwarder.install stays out where aiohttp's internals differ (the queue: test_rawpath.py)


class _NoFeed:
    """A payload parser without feed_data/feed_eof."""


# (the socket's attribute, its odd value, whether the protocol's parser is that value too)
ODD_SOCKETS = {
    "no connection protocol": ("_conn", None, False),
    "payload parser not the socket's": ("_parser", object(), False),
    "parser without feed_data": ("_parser", _NoFeed(), True),
}


@pytest.mark.parametrize("case", list(ODD_SOCKETS))
async def test_install_stays_out_of_a_socket_unlike_aiohttp_314s(
    client_ws: aiohttp.ClientWebSocketResponse, case: str
) -> None:
    name, odd, in_protocol = ODD_SOCKETS[case]
    protocol = _protocol(client_ws)
    parser, saved = protocol._payload_parser, getattr(client_ws, name)
    setattr(client_ws, name, odd)
    if in_protocol:
        protocol._payload_parser = odd
    try:
        forwarder = RawForwarder.install(
            client_ws, lambda o, d, s, p, e: True, lambda f, c, r: None
        )
        assert forwarder is None
        assert protocol._payload_parser is (odd if in_protocol else parser)
    finally:
        setattr(client_ws, name, saved)
        protocol._payload_parser = parser
    await send(client_ws, create(model="gpt-test"))  # aiohttp's own path still reads the turn
    assert (await until_terminal(client_ws))[-1]["type"] == "response.completed"
