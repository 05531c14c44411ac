"""What aiohttp keeps of a WebSocket's handshake for the socket's life, let go once it is open.

An open socket, client or upstream, holds on to its handshake in aiohttp's objects long after
anything reads it:
- its connection protocol keeps the HTTP parser that read the handshake, and the parser keeps
  that message's header lists (the names and values as tuples, parsed and raw), though every
  byte from then on goes to the WebSocket reader (`_payload_parser`);
- an upstream socket's `ClientResponse` keeps the 101 answer's headers (parsed, raw and in its
  `reify` cache) and the request's, our credential among them, in its `request_info`.

About 1.5 KB of objects a socket on each side (tracemalloc, 1,000 sockets; docs/performance.md).
The functions here drop them. Each checks the parts it touches and changes nothing where
aiohttp's are not as expected (private parts: `_parser`, `_upgraded`, `_payload_parser` of the
connection protocols, `_response`, `_headers`, `_raw_headers`, `_request_info`, `_cache` of a
`ClientResponse`; tests/test_canaries.py checks them, tests/test_ws_upstream.py that sockets
shed this way still work and end cleanly). The HTTP parser is needed again only when an upgrade
is declined, and these run once it was accepted.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _parser(protocol: Any) -> bool:
    """Drop an upgraded connection's HTTP parser; False when it is not as expected."""
    if (
        protocol is None
        or getattr(protocol, "_upgraded", None) is not True
        or getattr(protocol, "_payload_parser", None) is None
        or not hasattr(protocol, "_parser")
    ):
        return False
    protocol._parser = None
    return True


def server_handshake(request: web.Request) -> bool:
    """After `WebSocketResponse.prepare`: the client connection's HTTP parser."""
    return _parser(request.protocol)


def client_handshake(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """After `ws_connect`: the upstream connection's HTTP parser, and the handshake's headers in
    the socket's `ClientResponse`."""
    resp = getattr(ws, "_response", None)
    info = getattr(resp, "_request_info", None)
    cache = getattr(resp, "_cache", None)
    if (
        resp is None
        or not isinstance(getattr(resp, "_headers", None), CIMultiDictProxy)
        or not isinstance(getattr(resp, "_raw_headers", None), tuple)
        or not isinstance(info, aiohttp.RequestInfo)
        or not isinstance(cache, dict)
    ):
        return False
    resp._headers = _NO_HEADERS
    resp._raw_headers = ()
    cache.clear()  # `reify`'s: the headers again (read anew from `_headers` if asked)
    resp._request_info = aiohttp.RequestInfo(info.url, info.method, _NO_HEADERS, info.real_url)
    return _parser(getattr(getattr(ws, "_conn", None), "protocol", None))
