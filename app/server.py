"""The app factory: `create_app(settings)` wires the node's resources and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from app import handlers, relay
from app.config import Settings
from app.http import errors_middleware
from app.keystore import KeyStore
from app.ledger import Ledger
from app.node import NODE, Node

log = logging.getLogger("gateway.server")


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_frame_bytes)
    store = KeyStore(settings.redis_url, settings.redis_prefix)
    ledger = Ledger(settings.database_url, settings.spill_dir)
    node = Node(settings, store, ledger)
    app[NODE] = node

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
    from app.admin.api import setup_admin

    setup_admin(app)
    return app


async def _on_shutdown(app: web.Application) -> None:
    node = app[NODE]
    await drain(node, deadline=node.settings.drain_seconds)


async def drain(node: Node, deadline: float) -> None:
    """SIGTERM (CONTRACT.md §6): refuse new work, let responses in flight finish, then 1001."""
    node.draining = True
    sessions = list(node.sessions)
    for session in sessions:
        await session.drain()
    await node.wait_no_sessions(deadline)
    for session in list(node.sessions):
        await session.drain_deadline()
