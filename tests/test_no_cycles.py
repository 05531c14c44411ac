"""A finished session is freed by reference counting, not left to Python's cyclic collector.

Each socket left ~115 objects in reference cycles (the session, both sockets, the request, the
tasks): the collector's full passes over that garbage held the event loop 90-140 ms under the
bench's paced load, which was the time-to-first-event p99 of the later rounds, and the gateway's
memory grew between passes. Here the collector is off while a session runs and ends in each way a
socket can end; a session still alive afterwards is one that only the collector would free.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import Connect, Gateway, create, eventually, recv, send, until_terminal

from app.bench.load import collector_held_off
from app.session import Session

Scenario = Callable[[Connect, Gateway], Awaitable[None]]


@pytest.fixture
async def collector_off() -> AsyncIterator[None]:
    with collector_held_off():
        yield


def _only_session(gateway: Gateway) -> weakref.ref[Session]:
    (session,) = gateway.sessions
    return weakref.ref(session)


async def _turns_then_close(connect: Connect, gateway: Gateway) -> weakref.ref[Session]:
    async with connect() as ws:
        for _ in range(2):
            await send(ws, create(metadata={"sim_deltas": "30"}))
            assert (await until_terminal(ws))[-1]["type"] == "response.completed"
        return _only_session(gateway)


async def _client_vanishes_mid_turn(connect: Connect, gateway: Gateway) -> weakref.ref[Session]:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "50", "sim_delay_ms": "20"}))
        assert (await recv(ws))["type"] == "response.created"
        ref = _only_session(gateway)
        transport = ws._response.connection.transport if ws._response.connection else None
        assert transport is not None
        transport.abort()  # no close frame
        return ref


async def _upstream_drops_mid_turn(connect: Connect, gateway: Gateway) -> weakref.ref[Session]:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_fault": "drop", "sim_deltas": "20"}))
        events = await until_terminal(ws)
        assert events[-1]["type"] == "error", events[-1]
        await send(ws, create())  # a new upstream socket for the next turn
        assert (await until_terminal(ws))[-1]["type"] == "response.completed"
        return _only_session(gateway)


async def _refused_then_close(connect: Connect, gateway: Gateway) -> weakref.ref[Session]:
    async with connect() as ws:
        await send(ws, {"type": "response.cancel"})
        assert (await recv(ws))["type"] == "error"
        return _only_session(gateway)


@pytest.mark.parametrize(
    "scenario",
    [_turns_then_close, _client_vanishes_mid_turn, _upstream_drops_mid_turn, _refused_then_close],
    ids=["turns", "client-vanishes", "upstream-drops", "refused"],
)
async def test_an_ended_session_is_freed_without_the_collector(
    collector_off: None,
    gateway: Gateway,
    connect: Connect,
    scenario: Callable[[Connect, Gateway], Awaitable[weakref.ref[Session]]],
) -> None:
    ref = await scenario(connect, gateway)
    await eventually(lambda: not gateway.node.sessions)
    await asyncio.sleep(0.1)  # the cancelled upstream reader and the closes run to their end
    session = ref()
    if session is not None:
        holders = [type(r).__name__ for r in gc.get_referrers(session)]
        del session
        raise AssertionError(f"the session outlived its socket, held by {holders}")
