"""Public endpoints: the WebSocket session's handshake (CONTRACT.md §3), health and metrics."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from app.clientlink import CLOSE_HANDSHAKE_SECONDS
from app.errors import Code, GatewayError
from app.guard import AUTH_GUARD
from app.http import error_response
from app.keystore import Principal, secret_status
from app.models import ApiKey, Team
from app.node import NODE, Node
from app.protocol import normalize_query_model
from app.session import Session, new_socket_id

log = logging.getLogger("gateway.handlers")


def bearer(request: web.Request) -> str | None:
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(
    node: Node, request: web.Request, *, fresh: bool = False
) -> tuple[Principal, ApiKey, Team]:
    """The gateway key of a request, or the refusal (401/403/429/503) it gets.

    From an address out of failed authentications (app/guard.py) a key the store never issued
    gets 429 without a lookup; any other key is looked up and served as usual, so a valid key is
    never refused for other people's failures. A 401 counts against the address. `fresh`: ask
    Redis even for a secret this node has seen (NodeView.lookup_secret).
    """
    guard = request.app[AUTH_GUARD]
    address = guard.address_of(request)
    refused = guard.refusal(address)
    if refused is not None and not await node.view.may_be_issued(bearer(request)):
        raise refused
    try:
        return await _lookup_key(node, request, fresh)
    except GatewayError as err:
        guard.charge(address, err)
        raise


async def _lookup_key(
    node: Node, request: web.Request, fresh: bool
) -> tuple[Principal, ApiKey, Team]:
    secret = bearer(request)
    if secret is None:
        raise GatewayError(Code.INVALID_API_KEY, "Missing API key: send Authorization: Bearer.")
    found, version = await node.view.lookup_secret(secret, fresh=fresh)
    if found is None:
        raise GatewayError(Code.INVALID_API_KEY)
    key, digest = found
    status = secret_status(key, digest, datetime.now(UTC))
    if version != node.view.view.version:
        await node.view.load()  # at least as fresh as this handshake
    team = node.view.view.teams.get(key.team_id)
    if status is None and (team is None or not team.active):
        status = Code.TEAM_DISABLED
    if status is not None:
        if not fresh:  # a refusal is never made on a cached reading alone
            return await _lookup_key(node, request, True)
        raise GatewayError(status)
    assert team is not None
    node.watch_key(key)
    principal = Principal(key_id=key.id, key_prefix=key.prefix, team_id=team.id, secret_hash=digest)
    return principal, key, team


def _refuse(err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    metrics.WS_CONNECTIONS_TOTAL.labels(outcome=str(err.code)).inc()
    metrics.count_error(err.code)
    return error_response(err, headers)


async def responses_ws(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/ws` and `GET /v1/responses`: the handshake, in the contract's order."""
    node = request.app[NODE]
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return _refuse(GatewayError(Code.WEBSOCKET_UPGRADE_REQUIRED), {"Upgrade": "websocket"})
    if node.draining:
        return _refuse(GatewayError(Code.SERVER_SHUTTING_DOWN), {"Retry-After": "1"})
    try:
        principal, _key, team = await authenticate(node, request)
        if len(node.sessions) >= node.settings.max_sockets:
            raise GatewayError(Code.SERVER_OVERLOADED)
        model = request.query.get("model") or None
        if model is not None:
            model = normalize_query_model(model)
        # aiohttp refuses a payload of max_msg_size itself: + 1 lets a frame of exactly the
        # limit in.
        ws = web.WebSocketResponse(
            max_msg_size=node.settings.max_frame_bytes + 1,
            autoping=True,
            timeout=CLOSE_HANDSHAKE_SECONDS,
            decode_text=False,  # the session judges the size before the UTF-8
        )
        session = Session(node, ws, principal, new_socket_id(), model)
        limits = team.limits
        taken, version = await node.store.acquire_socket(
            principal, session.id, limits.sockets_per_key, limits.sockets_per_team, session.info()
        )
        if version != node.view.view.version:
            # An admin write since this node's view (its cached secret included): check again,
            # as fresh as this handshake.
            try:
                await authenticate(node, request, fresh=True)
            except GatewayError:
                if taken:
                    await node.store.release_socket(principal, session.id)
                raise
        if not taken:
            raise GatewayError(Code.TOO_MANY_CONNECTIONS)
    except GatewayError as err:
        return _refuse(err)
    return await _serve_socket(node, request, session)


async def _serve_socket(node: Node, request: web.Request, session: Session) -> web.StreamResponse:
    ws, principal, socket_id = session.ws, session.principal, session.id
    try:
        await ws.prepare(request)
        session.watch_outbound(request.transport)
        node.add_session(session)
        metrics.ACCEPTED.inc()
        metrics.WS_CONNECTIONS_ACTIVE.inc()
        log.info(
            "socket open",
            extra={"socket_id": socket_id, "key_prefix": principal.key_prefix},
        )
        await session.run()
    finally:
        if node.remove_session(session):
            metrics.WS_CONNECTIONS_ACTIVE.dec()
        try:
            await node.store.release_socket(principal, socket_id)
        except GatewayError:
            pass  # the slot's lease lapses within a minute
        log.info(
            "socket closed",
            extra={
                "socket_id": socket_id,
                "key_prefix": principal.key_prefix,
                "close_code": session.close_code,
                # the gateway's own words only: a client's close reason is its content
                "close_reason": session.close_reason if session.closed_by == "gateway" else None,
                "closed_by": session.closed_by,
            },
        )
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    redis_ok = await node.store.ping()
    body = {"redis": redis_ok, "postgres": node.ledger.postgres_up, "draining": node.draining}
    ready = redis_ok and not node.draining
    return web.Response(
        status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json"
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text: this process's metrics, or with `--workers N` every worker's added up."""
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})
