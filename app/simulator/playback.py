"""Sending a turn's events: the pauses before deltas, the stamps added at the moment of sending.

Shared by the WebSocket and the SSE transports so that both pace and stamp events alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from app.simulator.errors import Json

Send = Callable[[Json], Awaitable[None]]


def stamp(event: Json, sent_at: bool) -> Json:
    """Add `sim_sent_at` (when asked) and the real `completed_at` of a completed response."""
    if event["type"] == "response.completed":
        event["response"]["completed_at"] = int(time.time())
    if sent_at:
        event["sim_sent_at"] = time.time()
    return event


async def play(events: Sequence[Json], send: Send, *, delay_s: float) -> None:
    """Send `events` in order, pausing `delay_s` before each delta."""
    for event in events:
        if delay_s and event["type"].endswith(".delta"):
            await asyncio.sleep(delay_s)
        await send(event)


def cut_point(events: Sequence[Json], fault_after: int) -> int:
    """How many events a mid-response fault lets through: never the terminal one."""
    return max(0, min(fault_after, len(events) - 1))


async def until_gone(transport: asyncio.Transport | None, poll_s: float = 0.05) -> None:
    """Wait until the peer has closed the connection (aiohttp does not cancel the handler)."""
    # aiohttp offers no event for "the peer left" before a response starts: poll.
    while transport is not None and not transport.is_closing():  # noqa: ASYNC110
        await asyncio.sleep(poll_s)
