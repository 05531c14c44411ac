"""The gateway on uvloop, as `gateway serve` runs it (GATEWAY_EVENT_LOOP=auto): the parts that
depend on the loop's transports. The rest of the suite runs on asyncio's loop.

uvloop's transports are not `asyncio.WriteTransport`s: a guard keyed on that class was silently
off on uvloop (the slow-client close), and the raw hot path never ran.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import uvloop
from conftest import Connect, Gateway, create, send, until_terminal, wait_for

from app import metrics

# pytest-asyncio 1.x still takes the policy fixture (deprecated in favour of a loop-factory hook
# that must answer for every test of the session); pyproject.toml keeps it below 2.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


async def test_the_loop_is_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_MAX_PENDING_BYTES": 256 * 1024}])
async def test_client_that_stops_reading_is_closed_1008(gateway: Gateway, connect: Connect) -> None:
    closes = metrics.WS_CLOSES_TOTAL.labels(side="gateway", code="1008")
    before = closes._value.get()
    async with connect() as ws:
        big = str(24 * 1024 * 1024)  # streamed as 64 KiB deltas
        await send(ws, create(metadata={"sim_fault": "large", "sim_large_bytes": big}))
        await asyncio.sleep(2.0)  # not reading: kernel buffers fill, then the gateway's
        for _ in range(2000):
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        assert ws.close_code == 1008
    await wait_for(lambda: closes._value.get() == before + 1)
    await wait_for(lambda: not gateway.node.sessions)


async def test_deltas_go_raw_on_uvloop(gateway: Gateway, connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "60"}))
        events = await until_terminal(ws)
        assert events[-1]["type"] == "response.completed"
        numbers = [e["sequence_number"] for e in events]
        assert numbers == list(range(len(events)))
        (session,) = gateway.node.sessions
        assert session.raw is not None and session.raw.forwarded > 30, session.raw
