"""The listening side of `gateway serve`: an aiohttp runner with a deadline on request headers.

aiohttp's server has no header-read timeout: a client that opens a TCP connection and sends its
request line and headers a byte at a time (slowloris), or nothing at all, holds a connection and
its buffers for as long as it likes (aiohttp 3.14 arms `keepalive_timeout` on a fresh connection,
3630 s under `AppRunner` unless it is set). `GatewayRunner` gives every new connection until
`GATEWAY_HANDSHAKE_SECONDS` to finish its first request's headers, or closes it.

How, at no cost per request: the runner's server (the protocol factory) is `_DeadlineServer`.
Its `connection_made` (aiohttp calls it from each connection's protocol) arms one `call_later`;
the request factory, which aiohttp calls once the headers of a request are parsed, cancels it the
first time (later requests find nothing to cancel: one dict lookup); `connection_lost` cancels it
too. When it fires, the connection is force-closed and counted in
`gateway_errors_total{code="handshake_timeout"}`. A WebSocket or a POST body, once the headers
are in, is the handler's business (frame size, idle timeouts), not this deadline's.

The listen backlog is `LISTEN_BACKLOG` (the kernel caps it at `net.core.somaxconn`), not
aiohttp's 128: when 200 clients connect at once, the connections past the accept queue had their
SYN dropped and retried by the client's kernel a second later, so a burst's p99 first event took
over a second where its p50 took 0.3 s (`TcpExtListenOverflows` counted the drops).

Later requests on a keep-alive connection are bounded by aiohttp's `keepalive_timeout`, which
runs from the end of the previous response until the next request's headers are in (a client
trickling them is closed when it fires): `KEEPALIVE_SECONDS`, aiohttp's `run_app` default, instead
of `AppRunner`'s 3630 s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_runner import BaseSite
from aiohttp.web_server import Server

from app import metrics

KEEPALIVE_SECONDS = 75.0
LISTEN_BACKLOG = 4096
TIMEOUT_CODE = "handshake_timeout"


class _DeadlineServer(Server):
    """aiohttp's server, the same handlers and options, plus the first-request deadline."""

    def __init__(self, inner: Server, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self._seconds = seconds
        self._inner_factory = inner.request_factory
        self._deadlines: dict[RequestHandler, asyncio.TimerHandle] = {}
        super().__init__(
            inner.request_handler,
            request_factory=self._request_started,
            handler_cancellation=inner.handler_cancellation,
            loop=loop,
            **inner._kwargs,  # the handler options the app and runner chose
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._deadlines[handler] = self._loop.call_later(self._seconds, self._overdue, handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        timer = self._deadlines.pop(handler, None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(handler, exc)

    def _request_started(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        if self._deadlines:
            timer = self._deadlines.pop(protocol, None)
            if timer is not None:
                timer.cancel()
        return self._inner_factory(message, payload, protocol, writer, task)

    def _overdue(self, handler: RequestHandler) -> None:
        if self._deadlines.pop(handler, None) is not None:
            metrics.count_error(TIMEOUT_CODE)
            handler.force_close()


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections must send their first request's headers in time."""

    __slots__ = ("_handshake_seconds",)

    def __init__(self, app: web.Application, *, handshake_seconds: float, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_SECONDS)
        super().__init__(app, **kwargs)
        self._handshake_seconds = handshake_seconds

    def _reg_site(self, site: BaseSite) -> None:
        # Every site's `start()` registers here before it listens: the one place that sees
        # the site `gateway serve` makes (aiohttp's TCPSite takes `backlog` only at creation).
        if site._backlog < LISTEN_BACKLOG:
            site._backlog = LISTEN_BACKLOG
        super()._reg_site(site)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if self._handshake_seconds <= 0:
            return server
        return _DeadlineServer(server, self._handshake_seconds, asyncio.get_running_loop())
