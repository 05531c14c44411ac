"""The bearer check every OpenAI endpoint of the simulator makes (the control API makes none)."""

from __future__ import annotations

from aiohttp import web

from app.simulator import errors
from app.simulator.errors import SimError
from app.simulator.options import SimulatorOptions


def bearer_key(request: web.BaseRequest) -> str:
    """The key of `Authorization: Bearer <key>`, or "" when there is none."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def auth_error(request: web.BaseRequest, options: SimulatorOptions) -> SimError | None:
    """None when `Authorization: Bearer <key>` is acceptable, else the 401 to answer."""
    key = bearer_key(request)
    if not key:
        return errors.invalid_api_key(present=False)
    if options.api_key is not None and key != options.api_key:
        return errors.invalid_api_key(present=True, key=key)
    return None
