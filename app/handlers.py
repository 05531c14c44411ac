"""Public endpoints: the WebSocket session's handshake (CONTRACT.md §3), health and metrics."""

from __future__ import annotations

import logging

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from app import logs, metrics, shed
from app.auth.principal import Principal
from app.clientlink import CLOSE_HANDSHAKE_SECONDS
from app.errors import Code, GatewayError
from app.http import answers_own_errors, error_response
from app.models import Team
from app.node import NODE, Node
from app.protocol import normalize_query_model
from app.session import Session, new_socket_id

log = logging.getLogger("gateway.handlers")


def _refuse(err: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    metrics.WS_CONNECTIONS_TOTAL.labels(outcome=str(err.code)).inc()
    metrics.count_error(err.code)
    return error_response(err, headers)


@answers_own_errors
async def responses_ws(request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/ws` and `GET /v1/responses`: the handshake, in the contract's order."""
    node = request.app[NODE]
    if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        return _refuse(GatewayError(Code.WEBSOCKET_UPGRADE_REQUIRED), {"Upgrade": "websocket"})
    if node.draining:
        return _refuse(GatewayError(Code.SERVER_SHUTTING_DOWN), {"Retry-After": "1"})
    try:
        principal, _key, team = await node.auth.authenticate(request)
    except GatewayError as err:
        return _refuse(err)
    # The node's place is taken before the next await and held till the handler ends. The
    # socket is served here, in the handshake's coroutine, not in one of its own: an idle socket
    # keeps every frame of the chain it waits in for its whole life.
    places = node.places
    if not places.take():
        return _refuse(GatewayError(Code.SERVER_OVERLOADED))
    try:
        try:
            session = await _admit(request, node, principal, team)
        except GatewayError as err:
            return _refuse(err)
        ws, socket_id = session.ws, session.id
        try:
            await ws.prepare(request)
            shed.server_handshake(request)
            session.watch_outbound(request.transport)
            node.add_session(session)
            metrics.ACCEPTED.inc()
            metrics.WS_CONNECTIONS_ACTIVE.inc()
            logs.info(
                log,
                "socket open",
                {"socket_id": socket_id, "key_prefix": principal.key_prefix},
            )
            await session.run()
        finally:
            if node.remove_session(session):
                metrics.WS_CONNECTIONS_ACTIVE.dec()
            try:
                await node.store.release_socket(principal, socket_id)
            except GatewayError:
                pass  # the slot's lease lapses within a minute
            logs.info(
                log,
                "socket closed",
                {
                    "socket_id": socket_id,
                    "key_prefix": principal.key_prefix,
                    "close_code": session.close_code,
                    # the gateway's own words only: a client's close reason is its content
                    "close_reason": session.close_reason
                    if session.closed_by == "gateway"
                    else None,
                    "closed_by": session.closed_by,
                },
            )
        return ws
    finally:
        places.give()


async def _admit(request: web.Request, node: Node, principal: Principal, team: Team) -> Session:
    """The handshake's checks after the node's place: the query's model, the key's and team's
    socket caps, and the key again if an admin write came in meanwhile."""
    model = request.query.get("model") or None
    if model is not None:
        model = normalize_query_model(model)
    # aiohttp refuses a payload of max_msg_size itself: + 1 lets a frame of exactly the limit in.
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
        # An admin write since this node's view (its cached secret included): check again, as
        # fresh as this handshake.
        try:
            await node.auth.authenticate(request, fresh=True)
        except GatewayError:
            if taken:
                await node.store.release_socket(principal, session.id)
            raise
    if not taken:
        raise GatewayError(Code.TOO_MANY_CONNECTIONS)
    return session


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
