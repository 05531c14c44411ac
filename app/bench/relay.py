"""A bare WebSocket relay: the floor the gateway's hot path is measured against.

    python -m app.bench.relay --port 8090 --upstream ws://127.0.0.1:8081/v1/responses

Each client socket gets one upstream socket, opened before the client's handshake is answered
(the client's `Authorization` header goes upstream with it). Frames are forwarded both ways as
they are, without being looked at: two pumps, the first to end closes the pair (as Home
Assistant's ingress proxy does). No auth, no checks, no ledger, no metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from app import eventloop


@dataclass
class Relay:
    """What every relayed socket shares."""

    upstream_url: str
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    http: aiohttp.ClientSession | None = None


RELAY = web.AppKey("relay", Relay)

# As the gateway's listen backlog (app/listener.py), not aiohttp's 128.
LISTEN_BACKLOG = 4096

# Anything a client could send the gateway fits; the relay sets no smaller limit than it.
MAX_MSG_BYTES = 256 * 1024 * 1024


def create_relay_app(upstream_url: str) -> web.Application:
    app = web.Application()
    app[RELAY] = Relay(upstream_url)
    app.cleanup_ctx.append(_http_session)
    app.on_shutdown.append(_close_sockets)
    for path in ("/v1/responses", "/v1/responses/ws"):
        app.router.add_get(path, relay_socket)
    return app


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # limit=0: aiohttp caps a session at 100 connections otherwise, one per upstream socket here.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        app[RELAY].http = http
        yield


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[RELAY].sockets):
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"relay shutting down")


async def relay_socket(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    assert relay.http is not None, "relay not started"
    headers = {}
    if auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    try:
        upstream = await relay.http.ws_connect(
            relay.upstream_url, headers=headers, max_msg_size=MAX_MSG_BYTES
        )
    except aiohttp.WSServerHandshakeError as exc:
        return web.Response(status=exc.status, text=f"upstream refused the handshake: {exc}")
    except (aiohttp.ClientError, OSError) as exc:
        return web.Response(status=502, text=f"upstream unreachable: {type(exc).__name__}")
    client = web.WebSocketResponse(max_msg_size=MAX_MSG_BYTES)
    try:
        await client.prepare(request)
        relay.sockets.add(client)
        await _pair(client, upstream)
    finally:
        relay.sockets.discard(client)
        await upstream.close()
    return client


async def _pair(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    pumps = {
        asyncio.create_task(_pump(client, upstream)),
        asyncio.create_task(_pump(upstream, client)),
    }
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
        async for msg in source:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
        await sink.close(code=_sendable(source.close_code))


def _sendable(code: int | None) -> int:
    """1005, 1006 and 1015 name what happened to a socket but may not be sent (RFC 6455)."""
    if code is None or code in (1005, 1006, 1015):
        return aiohttp.WSCloseCode.OK if code is None or code == 1005 else 1011
    return code


async def serve(app: web.Application, host: str, port: int, where: str) -> None:
    """Serve `app` until cancelled; print `where` (formatted with the bound host and port) once
    bound (port 0 picks a free port). The bench's relays share it."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        eventloop.freeze_startup()  # as the gateway does
        print(where.format(host=bound_host, port=bound_port), flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run_relay(host: str, port: int, upstream_url: str) -> None:
    await serve(
        create_relay_app(upstream_url),
        host,
        port,
        "relay listening on ws://{host}:{port}/v1/responses",
    )


def relay_main(
    argv: Sequence[str] | None,
    module: str,
    description: str | None,
    port: int,
    upstream: str,
    run: Callable[[str, int, str], Coroutine[Any, Any, None]],
) -> int:
    """The command line of a bench relay (`module`'s): --host, --port, --upstream, --loop."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--upstream", required=True, metavar=upstream)
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the event loop, as GATEWAY_EVENT_LOOP chooses the gateway's (default: auto)",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(run(args.host, args.port, args.upstream), args.loop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return relay_main(argv, "app.bench.relay", __doc__, 8090, "WS_URL", run_relay)


if __name__ == "__main__":
    sys.exit(main())
