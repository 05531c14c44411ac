"""The upstream wire: the only module that speaks to OpenAI.

One `UpstreamConn` per client socket (OpenAI keeps its `previous_response_id` cache on the
connection); `post_http` for the HTTP calls (the POST relay, compaction, the session's HTTP
fallback through `stream_http`). aiohttp's exceptions are translated here: into
`UpstreamHandshakeError` for the WebSocket, `UpstreamUnreachable` and `UpstreamHTTPError` over
HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from app import shed, sse
from app.redact import redact_bytes

USER_AGENT = "openai-ws-gateway/0.1"


class UpstreamHandshakeError(Exception):
    """The upstream WebSocket could not be opened; `detail` is safe to show a customer."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def new_http_session() -> aiohttp.ClientSession:
    # limit=0: aiohttp's default caps a session at 100 connections, one per upstream socket here.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        headers={"User-Agent": USER_AGENT},
    )


class UpstreamConn:
    __slots__ = ("closing", "opened_at", "served", "stale", "ws")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.opened_at = time.monotonic()
        self.served = 0  # requests sent on it; 0 means OpenAI's cache here is empty
        self.stale = False  # OpenAI said `websocket_connection_limit_reached`
        self.closing = False  # the gateway closes it: its reader ends quietly

    @property
    def age(self) -> float:
        return time.monotonic() - self.opened_at

    @property
    def usable(self) -> bool:
        return not (self.stale or self.ws.closed)

    async def send(self, body: dict[str, Any]) -> None:
        self.served += 1
        # orjson's UTF-8 as the text frame's payload: no decode to str and encode back.
        await self.ws.send_frame(orjson.dumps(body), aiohttp.WSMsgType.TEXT)

    async def close(self) -> None:
        self.closing = True
        if not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), timeout=2.0)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass


async def open_upstream(
    http: aiohttp.ClientSession,
    url: str,
    credential: str,
    *,
    timeout: float,
    max_msg_size: int,
) -> UpstreamConn:
    headers = {
        "Authorization": f"Bearer {credential}",
        "OpenAI-Beta": "responses_websockets=2026-02-06",
    }
    try:
        async with asyncio.timeout(timeout):
            ws = await http.ws_connect(
                url,
                headers=headers,
                max_msg_size=max_msg_size,
                autoping=True,
                autoclose=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
    except TimeoutError:
        raise UpstreamHandshakeError(f"upstream handshake timed out after {timeout:g} s") from None
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamHandshakeError(
            f"upstream refused the handshake with HTTP {exc.status}", exc.status
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamHandshakeError(f"upstream unreachable ({type(exc).__name__})") from None
    shed.client_handshake(ws)
    return UpstreamConn(ws)


# What aiohttp raises when OpenAI cannot be reached or its answer breaks off (its own errors wrap
# the socket's OSError; a read past `sock_read` is a TimeoutError).
UNREACHABLE = (aiohttp.ClientError, OSError, TimeoutError)


class UpstreamUnreachable(Exception):
    """OpenAI could not be reached over HTTP, or its answer broke off; `reason` names what
    aiohttp raised (a class name, safe to show a customer)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HttpReply:
    """OpenAI's answer to a POST: its status line and headers, the body read on demand."""

    __slots__ = ("_credential", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, credential: str) -> None:
        self._resp = resp
        self._credential = credential

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def content_type(self) -> str:
        return self._resp.content_type

    async def body(self) -> bytes:
        """The whole body. An error's has key-looking text redacted: OpenAI's 401 quotes the key
        it refused (masked but for 12 characters), never ours to pass on. A response's is the
        customer's own content, left as it came."""
        try:
            raw = await self._resp.read()
        except UNREACHABLE as exc:
            raise UpstreamUnreachable(type(exc).__name__) from exc
        return redact_bytes(raw, (self._credential,)) if self._resp.status >= 400 else raw

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each chunk as it was read: aiohttp's own iterator (a relay's
        hot loop; no generator of ours in between), so a break-off raises what aiohttp raises,
        one of `UNREACHABLE`."""
        return self._resp.content.iter_any()

    async def events(self) -> AsyncIterator[sse.Event]:
        """The body's server-sent events, in order, as they arrive."""
        # `sse.parse` inlined: a generator less for every event to pass through.
        lines, decoder = sse.Lines(), sse.Decoder()
        try:
            async for chunk in self._resp.content.iter_any():
                for raw in lines.feed(chunk):
                    event = decoder.line(raw)
                    if event is not None:
                        yield event
        except UNREACHABLE as exc:
            raise UpstreamUnreachable(type(exc).__name__) from exc


@contextlib.asynccontextmanager
async def post_http(
    http: aiohttp.ClientSession,
    url: str,
    credential: str,
    body: dict[str, Any],
    *,
    connect: float,
    sock_read: float | None,
    accept: str | None = None,
) -> AsyncIterator[HttpReply]:
    """`POST url` with `body` as JSON, authorized by `credential`: OpenAI's reply, once its
    status line and headers are in; `UpstreamUnreachable` when it could not be reached.
    `connect`: the connection's timeout; `sock_read`: the longest silence while reading."""
    headers = {"Authorization": f"Bearer {credential}"}
    if accept is not None:
        headers["Accept"] = accept
    headers["Content-Type"] = "application/json"
    try:
        resp = await http.post(
            url,
            data=orjson.dumps(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=sock_read),
        )
    except UNREACHABLE as exc:
        raise UpstreamUnreachable(type(exc).__name__) from exc
    async with resp:
        yield HttpReply(resp, credential)


class UpstreamHTTPError(Exception):
    """OpenAI answered an HTTP request with an error status; `body` is its JSON (or a stand-in)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _error_body(status: int, raw: bytes) -> dict[str, Any]:
    """The error OpenAI sent (`raw`, already redacted: `HttpReply.body`), or a stand-in."""
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), dict):
        return value
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = f"OpenAI answered HTTP {status}."
    return {"error": {"type": kind, "code": None, "message": message, "param": None}}


async def stream_http(
    http: aiohttp.ClientSession,
    base_url: str,
    credential: str,
    body: dict[str, Any],
    *,
    timeout: float,
) -> AsyncIterator[str]:
    """`POST {base}/responses` with `stream: true`: each SSE event's data, in order."""
    try:
        async with post_http(
            http,
            f"{base_url}/responses",
            credential,
            {**body, "stream": True},
            connect=timeout,
            sock_read=None,
            accept="text/event-stream",
        ) as reply:
            if reply.status >= 400:
                raise UpstreamHTTPError(reply.status, _error_body(reply.status, await reply.body()))
            async for event in reply.events():
                if event.data != "[DONE]":
                    yield event.data
    except UpstreamUnreachable as exc:
        raise UpstreamHTTPError(502, _error_body(502, b"")) from exc
