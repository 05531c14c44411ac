"""The gateway on uvloop, as `gateway serve` runs it (GATEWAY_EVENT_LOOP=auto): the parts that
depend on the loop's transports. The rest of the suite runs on asyncio's loop.

uvloop's transports are not `asyncio.WriteTransport`s: a guard keyed on that class was silently
off on uvloop (the slow-client close), and the raw hot path never ran.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from conftest import Connect, Gateway, create, send, until_terminal

# The slow-client test of tests/test_ws_upstream.py, collected here again: it runs on uvloop.
from test_ws_upstream import test_client_that_stops_reading_is_closed_1008  # noqa: F401

# pytest-asyncio 1.x still takes the policy fixture (deprecated in favour of a loop-factory hook
# that must answer for every test of the session); pyproject.toml keeps it below 2.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


async def test_the_loop_is_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_deltas_go_raw_on_uvloop(gateway: Gateway, connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "60"}))
        events = await until_terminal(ws)
        assert events[-1]["type"] == "response.completed"
        numbers = [e["sequence_number"] for e in events]
        assert numbers == list(range(len(events)))
        (session,) = gateway.sessions
        assert session.upstream is not None
        raw = session.upstream.raw
        assert raw is not None and raw.forwarded > 30, raw
