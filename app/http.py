"""HTTP plumbing shared by every handler: OpenAI-shaped error responses and the error middleware."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from app.errors import Code, GatewayError

log = logging.getLogger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    if err.headers:
        headers = {**err.headers, **(headers or {})}
    return web.Response(
        status=err.status,
        body=err.http_body(),
        content_type="application/json",
        headers=headers,
    )


# Handlers that answer every error themselves (the WebSocket handshake): the middleware hands
# their requests on without a coroutine of its own, which a socket would keep all its life.
_ANSWER_OWN_ERRORS: set[Handler] = set()


def answers_own_errors(handler: Handler) -> Handler:
    """Mark a handler that raises none of the errors `errors_middleware` shapes."""
    _ANSWER_OWN_ERRORS.add(handler)
    return handler


@web.middleware
def errors_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Every HTTP error body has OpenAI's shape, an unknown route's 404 included."""
    if request.match_info.handler in _ANSWER_OWN_ERRORS:
        return handler(request)
    return _shaped_errors(request, handler)


async def _shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        return error_response(err)
    except web.HTTPNotFound:
        return error_response(GatewayError(Code.NOT_FOUND, f"No route for {request.path}."))
    except web.HTTPMethodNotAllowed as exc:
        refusal = GatewayError(Code.METHOD_NOT_ALLOWED, f"{request.method} is not allowed here.")
        return error_response(refusal, {"Allow": ",".join(sorted(exc.allowed_methods))})
