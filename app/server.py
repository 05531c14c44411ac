"""The app factory: `create_app(settings)` wires the node's resources and routes."""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from app import catalog, handlers, relay
from app.auth.guard import AUTH_GUARD, AuthGuard
from app.config import Settings
from app.http import errors_middleware
from app.keystore import KeyStore
from app.ledger import Ledger
from app.live import LiveSocket
from app.node import NODE, Node
from app.places import Places
from app.session import State

log = logging.getLogger("gateway.server")

# How long a drain waits, after its deadline, for close frames to be answered.
_CLOSE_WAIT_SECONDS = 2.0


def create_app(settings: Settings, places: Places | None = None) -> web.Application:
    """The gateway's application. `places`: a worker's slot of its node's socket count
    (app/places.py); one process counts its own."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_frame_bytes)
    store = KeyStore.from_settings(settings)
    retention = settings.ledger_retention_days
    ledger = Ledger(
        settings.database_url,
        settings.spill_dir,
        retention=timedelta(days=retention) if retention else None,
    )
    node = Node(settings, store, ledger, places)
    app[NODE] = node
    app[AUTH_GUARD] = AuthGuard.from_settings(settings)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await ledger.start()
        await node.start()
        yield
        await drain(node, deadline=0)
        await node.stop()
        await store.close()
        await ledger.close()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(_on_shutdown)
    for path in ("/v1/responses/ws", "/v1/responses"):
        app.router.add_get(path, handlers.responses_ws)
    app.router.add_post("/v1/responses", relay.post_responses)
    app.router.add_post("/v1/responses/compact", relay.post_compact)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics_endpoint)
    for path in ("/v1/models", "/v1/gateway/models"):
        app.router.add_get(path, catalog.customer_models)
    app.router.add_get("/v1/models/{provider}/{model}", catalog.customer_model)
    from app.admin.api import setup_admin

    setup_admin(app)
    return app


async def _on_shutdown(app: web.Application) -> None:
    node = app[NODE]
    await drain(node, deadline=node.settings.drain_seconds)


# When each node's drain ends: a second call (the app's on_shutdown after the CLI's own drain)
# keeps the first call's deadline instead of starting a new one.
_DRAIN_ENDS: weakref.WeakKeyDictionary[Node, float] = weakref.WeakKeyDictionary()
_DRAIN_POLL_SECONDS = 0.1


async def drain(node: Node, deadline: float) -> None:
    """SIGTERM (CONTRACT.md §6): refuse new work, let responses in flight finish, then 1001.

    New handshakes and POSTs are refused from the first line on (the handlers read
    `node.draining`); `gateway serve` drains before it stops listening, so they get 503, not a
    refused connection. Idle sockets close with 1001 at once, busy ones right after their
    terminal event; at `deadline` seconds what still runs gets `server_shutting_down` and 1001.
    Each close runs in its own task: a client slow to answer its close frame holds up no one
    else. A socket whose handshake was under way when the flag went up joins `node.sessions`
    late: it is asked too, here or by the second call (`on_shutdown`).
    """
    node.draining = True
    loop = asyncio.get_running_loop()
    end = min(_DRAIN_ENDS.get(node, math.inf), loop.time() + deadline)
    _DRAIN_ENDS[node] = end
    asked: set[LiveSocket] = set()
    closing: set[asyncio.Task[None]] = set()
    while True:
        for session in list(node.sessions):
            if session not in asked:
                asked.add(session)
                closing.add(asyncio.create_task(session.drain(), name=f"drain-{session.id}"))
        remaining = end - loop.time()
        if remaining <= 0 or await node.wait_no_sessions(min(remaining, _DRAIN_POLL_SECONDS)):
            break
    late = [s for s in node.sessions if s.state is State.IN_FLIGHT]
    if late:
        log.warning("drain deadline: ending %d response(s) in flight", len(late))
    closing.update(
        asyncio.create_task(s.drain_deadline(), name=f"drain-deadline-{s.id}") for s in late
    )
    if closing:
        # Close frames are out; a client that never answers one is cut by the runner's cleanup.
        await asyncio.wait(closing, timeout=_CLOSE_WAIT_SECONDS)
