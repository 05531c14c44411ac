"""The first request's headers have `GATEWAY_HANDSHAKE_SECONDS` (app/listener.py): slowloris.

The gateway runs under `GatewayRunner` on a real port, as `gateway serve` runs it (the last test
runs `gateway serve` itself); raw asyncio TCP clients play the slow client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Sim, Tenant, gateway_settings, make_tenant, turn
from test_ops_workers import serve_workers

from app.listener import KEEPALIVE_SECONDS, TIMEOUT_CODE, GatewayRunner
from app.metrics import REGISTRY
from app.node import NODE
from app.server import create_app

DEADLINE = 0.5
MARGIN = 1.0


@dataclass
class Listening:
    host: str
    port: int
    tenant: Tenant

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@pytest.fixture
def handshake_seconds() -> float:
    return DEADLINE


@pytest.fixture
async def listening(
    redis_url: str,
    redis_prefix: str,
    database_url: str,
    sim: Sim,
    tmp_path: Path,
    handshake_seconds: float,
) -> AsyncIterator[Listening]:
    settings = gateway_settings(
        redis_url,
        redis_prefix,
        database_url,
        sim.base_url,
        tmp_path / "spill",
        GATEWAY_HANDSHAKE_SECONDS=handshake_seconds,
    )
    app = create_app(settings)
    runner = GatewayRunner(
        app, handshake_seconds=settings.handshake_seconds, handle_signals=False, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        tenant = await make_tenant(app[NODE].store)
        yield Listening("127.0.0.1", site.port, tenant)
    finally:
        await runner.cleanup()


def timeouts_counted() -> float:
    return REGISTRY.get_sample_value("gateway_errors_total", {"code": TIMEOUT_CODE}) or 0.0


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closed the connection (EOF or reset); fails past `limit`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    return loop.time() - start


async def test_a_connection_that_sends_nothing_is_closed(listening: Listening) -> None:
    before = timeouts_counted()
    reader, writer = await asyncio.open_connection(listening.host, listening.port)
    took = await closed_after(reader, DEADLINE + MARGIN)
    assert DEADLINE - 0.1 <= took <= DEADLINE + MARGIN
    writer.close()
    assert timeouts_counted() - before == 1


@pytest.mark.parametrize("path", ["/v1/responses", "/healthz"])
async def test_headers_trickled_a_byte_at_a_time_are_cut_off(
    listening: Listening, path: str
) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Authorization: Bearer {listening.tenant.key}\r\nX-Padding: {'a' * 200}\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(listening.host, listening.port)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def trickle() -> None:
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            await asyncio.sleep(0.02)  # 200 bytes in the deadline: never the end of the headers

    sender = asyncio.create_task(trickle())
    try:
        await closed_after(reader, DEADLINE + MARGIN)
    finally:
        sender.cancel()
        writer.close()
    took = loop.time() - start
    assert DEADLINE - 0.1 <= took <= DEADLINE + MARGIN


async def test_a_request_in_time_keeps_its_keep_alive_connection(listening: Listening) -> None:
    reader, writer = await asyncio.open_connection(listening.host, listening.port)
    try:
        for _ in range(3):  # the second and third requests come after the deadline
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(DEADLINE * 2)
    finally:
        writer.close()
    assert KEEPALIVE_SECONDS == 75.0  # what bounds a keep-alive connection between requests


async def test_a_websocket_outlives_the_deadline(listening: Listening) -> None:
    headers = {"Authorization": f"Bearer {listening.tenant.key}"}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(listening.url("/v1/responses"), headers=headers) as ws:
            await asyncio.sleep(DEADLINE * 2.5)
            events = await turn(ws)
            assert events[-1]["type"] == "response.completed"


async def test_a_slow_body_is_not_the_deadlines_business(listening: Listening) -> None:
    """Headers in time, body slower than the deadline: the request is served."""
    body = b'{"model":"openai/gpt-test","input":"slow body"}'
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {listening.tenant.key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(listening.host, listening.port)
    try:
        writer.write(head + body[:10])
        await asyncio.sleep(DEADLINE * 2)
        writer.write(body[10:])
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 200"), status
    finally:
        writer.close()


@pytest.mark.parametrize("handshake_seconds", [0.0])
async def test_zero_means_no_deadline(listening: Listening) -> None:
    reader, writer = await asyncio.open_connection(listening.host, listening.port)
    try:
        with pytest.raises(TimeoutError):
            await closed_after(reader, DEADLINE * 3)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_gateway_serve_applies_the_deadline(
    tmp_path: Path, sim: Sim, redis_url: str, redis_prefix: str, database_url: str
) -> None:
    async with serve_workers(
        tmp_path,
        sim,
        redis_url,
        redis_prefix,
        database_url,
        workers=1,
        GATEWAY_HANDSHAKE_SECONDS=str(DEADLINE),
    ) as served:
        host, port = served.base.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /v1/responses HTTP/1.1\r\nHost: x\r\n")
        took = await closed_after(reader, DEADLINE + MARGIN)
        writer.close()
        assert took <= DEADLINE + MARGIN
        async with aiohttp.ClientSession() as http:
            ws_url = served.ws_url()
            async with http.ws_connect(ws_url, headers=served.headers) as ws:
                await asyncio.sleep(DEADLINE * 2)
                events: list[dict[str, Any]] = await turn(ws)
                assert events[-1]["type"] == "response.completed"
