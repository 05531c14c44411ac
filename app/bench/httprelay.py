"""A bare aiohttp HTTP relay: the floor the gateway's `POST /v1/responses` is measured against.

    python -m app.bench.httprelay --port 8091 --upstream http://127.0.0.1:8081/v1

`POST /v1/responses` goes upstream as it came (body and `Authorization`); the answer comes back
with its status and content type, its body copied chunk by chunk as it arrives (an SSE stream
stays a stream). No auth, no checks, no parsing, no ledger, no metrics.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from app.bench.relay import relay_main, serve


@dataclass
class HttpRelay:
    upstream_base: str
    http: aiohttp.ClientSession | None = None


HTTP_RELAY = web.AppKey("http_relay", HttpRelay)


def create_http_relay_app(upstream_base: str) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[HTTP_RELAY] = HttpRelay(upstream_base.rstrip("/"))
    app.cleanup_ctx.append(_http_session)
    app.router.add_post("/v1/responses", relay_post)
    return app


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    # limit=0: aiohttp caps a session at 100 connections otherwise.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        app[HTTP_RELAY].http = http
        yield


async def relay_post(request: web.Request) -> web.StreamResponse:
    relay = request.app[HTTP_RELAY]
    assert relay.http is not None, "relay not started"
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    if auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    body = await request.read()
    try:
        async with relay.http.post(
            relay.upstream_base + "/responses", data=body, headers=headers
        ) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            resp.content_type = upstream.content_type
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except (aiohttp.ClientError, OSError) as exc:
        return web.Response(status=502, text=f"upstream unreachable: {type(exc).__name__}")


async def run_http_relay(host: str, port: int, upstream_base: str) -> None:
    await serve(
        create_http_relay_app(upstream_base),
        host,
        port,
        "http relay listening on http://{host}:{port}/v1",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return relay_main(argv, "app.bench.httprelay", __doc__, 8091, "HTTP_BASE_URL", run_http_relay)


if __name__ == "__main__":
    sys.exit(main())
