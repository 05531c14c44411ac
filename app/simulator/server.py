"""The simulator's app factory and its runner."""

from __future__ import annotations

import asyncio

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Handler

from app import eventloop
from app.simulator import errors
from app.simulator.control import add_control_routes
from app.simulator.errors import SimError
from app.simulator.http_api import handle_compact, handle_create
from app.simulator.options import SimulatorOptions
from app.simulator.state import STATE, SimState
from app.simulator.ws import handle_websocket

# As the gateway's (app/listener.py): aiohttp's 128 dropped the SYNs of a burst of 200 new
# sockets past it, and the clients' kernels retried them a second later.
LISTEN_BACKLOG = 4096


def create_simulator_app(options: SimulatorOptions) -> web.Application:
    app = web.Application(
        client_max_size=options.max_message_bytes, middlewares=[_openai_shaped_errors]
    )
    app[STATE] = SimState(options)
    app.router.add_get("/v1/responses", handle_websocket)
    app.router.add_post("/v1/responses", handle_create)
    app.router.add_post("/v1/responses/compact", handle_compact)
    add_control_routes(app)
    app.on_shutdown.append(_close_sockets)
    return app


async def run_simulator(host: str, port: int, options: SimulatorOptions) -> None:
    """Serve until cancelled; print where, once bound (port 0 picks a free port)."""
    runner = web.AppRunner(create_simulator_app(options), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        eventloop.freeze_startup()
        print(f"simulator listening on http://{shown}:{bound_port}/v1", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@web.middleware
async def _openai_shaped_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return errors.not_found(request.path).http_response()
        if exc.status == 405:
            return errors.method_not_allowed(request.method, request.path).http_response()
        code = "request_too_large" if exc.status == 413 else "http_error"
        return SimError(exc.status, code, exc.reason).http_response()


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[STATE].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
