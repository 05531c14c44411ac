"""The admin API (CONTRACT.md §5).

`setup_admin(app)` adds:

- a middleware that guards every path under `/admin/v1`: without the right bearer token the
  answer is 401 `invalid_admin_token`, before routing can answer 404 or 405 and before any body
  is read. The token is compared in constant time; with no `ADMIN_TOKEN` configured (dev) every
  admin request is refused: the API is never open. Before the token, in this order: with
  `GATEWAY_ADMIN_REQUIRE_TLS_PROXY`, a request that did not come over HTTPS through the proxy gets
  403 `admin_tls_required` (its token is never looked at, so a plaintext path is no oracle for
  it); an address out of failed authentications gets 429 `rate_limit_exceeded` (app/auth/guard.py).
  A wrong token counts against the address.
- the `/admin/v1` routes, thin: parse, call `AdminOps`, shape the answer.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Iterable
from typing import Any

import orjson
from aiohttp import hdrs, web
from pydantic import BaseModel

from app import metrics
from app.admin.openapi import openapi_document
from app.admin.ops import Actor, AdminOps
from app.admin.schemas import (
    DEFAULT_GRACE_SECONDS,
    KeyCreated,
    KeyCreateRequest,
    KeyInfo,
    KeyRotateRequest,
    ModelPrice,
    PriceRequest,
    TeamRequest,
    model_name,
    parse_json,
)
from app.auth.authenticator import bearer
from app.auth.guard import AUTH_GUARD, right_most
from app.errors import Code, GatewayError
from app.http import Handler, error_response
from app.node import NODE

PREFIX = "/admin/v1"
ACTOR_HEADER = "X-Admin-Actor"
DEFAULT_ACTOR = "admin-token"
_ACTOR_MAX = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


# -- auth ---------------------------------------------------------------------------------------


def is_admin_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def token_ok(given: str | None, expected: str | None) -> bool:
    """Constant time in the token's content; no configured token accepts nothing."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


@web.middleware
def admin_auth_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    # Other paths are handed on without a coroutine of this middleware's own, which a
    # WebSocket would keep all its life.
    if is_admin_path(request.path):
        return _admin_guarded(request, handler)
    return handler(request)


async def _admin_guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    refusal = _admin_refusal(request)
    if refusal is not None:
        metrics.count_error(refusal.code)
        headers = {"WWW-Authenticate": 'Bearer realm="gateway-admin"'}
        return error_response(refusal, headers if refusal.status == 401 else None)
    return await handler(request)


def _admin_refusal(request: web.Request) -> GatewayError | None:
    """TLS proxy (if configured), then the token; a wrong token from an address out of failed
    authentications gets 429 instead of 401. The right token is never refused for other
    people's failures (CONTRACT.md §4)."""
    settings = request.app[NODE].settings
    if settings.admin_require_tls_proxy and not admin_over_tls(request):
        return GatewayError(Code.ADMIN_TLS_REQUIRED)
    if token_ok(bearer(request), settings.admin_token):
        return None
    guard = request.app[AUTH_GUARD]
    address = guard.address_of(request)
    refused = guard.refusal(address)
    if refused is not None:
        return refused
    refused = GatewayError(Code.INVALID_ADMIN_TOKEN)
    guard.charge(address, refused)
    return refused


def admin_over_tls(request: web.BaseRequest) -> bool:
    """True when the request came over TLS: to this node, or to the proxy in front of it.

    Every proxy header present must say `https` in its right-most entry (the one the nearest
    proxy wrote): a client that forges `X-Forwarded-Proto: https` next to the proxy's own
    `Forwarded: proto=http` is refused. At least one must be present. A client that reaches the
    node directly can forge them all: this setting catches a misrouted request, the firewall in
    front of the node's port keeps strangers out.
    """
    if request.secure:
        return True
    seen = False
    proto = request.headers.get(hdrs.X_FORWARDED_PROTO)
    if proto is not None:
        if right_most(proto).lower() != "https":
            return False
        seen = True
    if hdrs.FORWARDED in request.headers:
        elements = request.forwarded
        if not elements or elements[-1].get("proto", "").lower() != "https":
            return False
        seen = True
    return seen


def actor_of(request: web.Request) -> Actor:
    name = _UNPRINTABLE.sub("", request.headers.get(ACTOR_HEADER, "")).strip()[:_ACTOR_MAX]
    return Actor(name=name or DEFAULT_ACTOR, remote_addr=request.remote)


def ops_for(request: web.Request) -> AdminOps:
    node = request.app[NODE]
    return AdminOps(node.store, node.ledger.record, actor_of(request))


# -- answers ------------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200) -> web.Response:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def list_response(items: Iterable[Any]) -> web.Response:
    data = [i.model_dump(mode="json") if isinstance(i, BaseModel) else i for i in items]
    return json_response({"object": "list", "data": data})


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(Code.INVALID_REQUEST, "The request body is too large.") from None


# -- teams --------------------------------------------------------------------------------------


async def put_team(request: web.Request) -> web.Response:
    body = parse_json(TeamRequest, await read_body(request))
    team, created = await ops_for(request).put_team(body)
    return json_response(team, 201 if created else 200)


async def list_teams(request: web.Request) -> web.Response:
    return list_response(await ops_for(request).list_teams())


async def get_team(request: web.Request) -> web.Response:
    return json_response(await ops_for(request).get_team(request.match_info["team_id"]))


async def team_spend(request: web.Request) -> web.Response:
    book = request.app[NODE].spend
    return json_response(await ops_for(request).team_spend(request.match_info["team_id"], book))


async def disable_team(request: web.Request) -> web.Response:
    ops = ops_for(request)
    return json_response(await ops.set_team_active(request.match_info["team_id"], False))


async def enable_team(request: web.Request) -> web.Response:
    ops = ops_for(request)
    return json_response(await ops.set_team_active(request.match_info["team_id"], True))


# -- keys ---------------------------------------------------------------------------------------


async def create_key(request: web.Request) -> web.Response:
    body = parse_json(KeyCreateRequest, await read_body(request))
    key, secret = await ops_for(request).create_key(body)
    return json_response(KeyCreated.of(key, secret), 201)


async def list_keys(request: web.Request) -> web.Response:
    team_id = request.query.get("team_id") or None
    keys = await ops_for(request).list_keys(team_id)
    return list_response(KeyInfo.of(k) for k in keys)


async def get_key(request: web.Request) -> web.Response:
    key = await ops_for(request).get_key(request.match_info["key_id"])
    return json_response(KeyInfo.of(key))


async def rotate_key(request: web.Request) -> web.Response:
    raw = await read_body(request)
    grace = DEFAULT_GRACE_SECONDS
    if raw.strip():
        grace = parse_json(KeyRotateRequest, raw).grace_seconds
    key, secret = await ops_for(request).rotate_key(request.match_info["key_id"], grace)
    return json_response(KeyCreated.of(key, secret))


async def revoke_key(request: web.Request) -> web.Response:
    key = await ops_for(request).revoke_key(request.match_info["key_id"])
    return json_response(KeyInfo.of(key))


# -- the model catalog --------------------------------------------------------------------------


def _path_model(request: web.Request) -> str:
    return model_name(request.match_info["provider"], request.match_info["model"])


async def list_prices(request: web.Request) -> web.Response:
    catalog = await ops_for(request).catalog()
    return list_response(ModelPrice.of(name, price) for name, price in catalog.items())


async def get_price(request: web.Request) -> web.Response:
    name = _path_model(request)
    return json_response(ModelPrice.of(name, await ops_for(request).get_price(name)))


async def set_price(request: web.Request) -> web.Response:
    name = _path_model(request)
    body = parse_json(PriceRequest, await read_body(request))
    price = await ops_for(request).set_price(name, body)
    return json_response(ModelPrice.of(name, price))


async def delete_price(request: web.Request) -> web.Response:
    name = _path_model(request)
    await ops_for(request).delete_price(name)
    return json_response({"id": name, "object": "model", "deleted": True})


# -- sessions, the document ---------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    return list_response(await ops_for(request).sessions())


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


# -- wiring -------------------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/teams", put_team),
    ("GET", "/teams", list_teams),
    ("GET", "/teams/{team_id}", get_team),
    ("GET", "/teams/{team_id}/spend", team_spend),
    ("POST", "/teams/{team_id}/disable", disable_team),
    ("POST", "/teams/{team_id}/enable", enable_team),
    ("POST", "/keys", create_key),
    ("GET", "/keys", list_keys),
    ("GET", "/keys/{key_id}", get_key),
    ("POST", "/keys/{key_id}/rotate", rotate_key),
    ("POST", "/keys/{key_id}/revoke", revoke_key),
    ("GET", "/models", list_prices),
    ("GET", "/models/{provider}/{model}", get_price),
    ("PUT", "/models/{provider}/{model}", set_price),
    ("DELETE", "/models/{provider}/{model}", delete_price),
    ("GET", "/sessions", list_sessions),
    ("GET", "/openapi.json", openapi),
]


def setup_admin(app: web.Application) -> None:
    """Add the admin routes and their guard to `app`."""
    app.middlewares.append(admin_auth_middleware)
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, handler)


__all__ = ["PREFIX", "ROUTES", "setup_admin"]
