"""The upstream wire: the only module that speaks to OpenAI.

One `UpstreamConn` per client socket (OpenAI keeps its `previous_response_id` cache on the
connection). aiohttp's exceptions are translated here into `UpstreamHandshakeError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from app import sse
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
        await self.ws.send_str(orjson.dumps(body).decode())

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
    return UpstreamConn(ws)


class UpstreamHTTPError(Exception):
    """OpenAI answered an HTTP request with an error status; `body` is its JSON (or a stand-in)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _error_body(status: int, raw: bytes, credential: str = "") -> dict[str, Any]:
    """The error OpenAI sent, with any key-looking text redacted: it goes to the customer."""
    try:
        value = orjson.loads(redact_bytes(raw, (credential,)))
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
    headers = {"Authorization": f"Bearer {credential}", "Accept": "text/event-stream"}
    try:
        async with http.post(
            f"{base_url}/responses",
            data=orjson.dumps({**body, "stream": True}),
            headers={**headers, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=None),
        ) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                raise UpstreamHTTPError(resp.status, _error_body(resp.status, raw, credential))
            async for event in sse.parse(resp.content.iter_any()):
                if event.data != "[DONE]":
                    yield event.data
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise UpstreamHTTPError(502, _error_body(502, b"")) from exc
