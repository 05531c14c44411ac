"""Session limits and closes, over real sockets: the idle socket timeout
(`GATEWAY_IDLE_SOCKET_SECONDS`), the longest socket lifetime (`GATEWAY_MAX_SOCKET_SECONDS`), the
close handshake the gateway leaves a client that is still sending, and the record of a client
that vanished (1006). Each close is checked where the client sees it, in the ledger's socket row
and in `gateway_ws_closes_total`.

The limits are tiny here (0.5 s); a slow response comes from the simulator's pacing metadata
(`sim_deltas`, `sim_delay_ms`, docs/simulator.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import Connect, Gateway, Tenant, create, eventually, recv, send, turn
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.node import DueSlots
from app.session import State

LIMIT = 0.5
IDLE_ONLY = {"GATEWAY_IDLE_SOCKET_SECONDS": LIMIT, "GATEWAY_MAX_SOCKET_SECONDS": 0}
LIFETIME_ONLY = {"GATEWAY_IDLE_SOCKET_SECONDS": 0, "GATEWAY_MAX_SOCKET_SECONDS": LIMIT}
NEITHER = {"GATEWAY_IDLE_SOCKET_SECONDS": 0, "GATEWAY_MAX_SOCKET_SECONDS": 0}


async def gateway_closes(gateway: Gateway, side: str, code: str) -> float:
    """`gateway_ws_closes_total{side,code}` as `/metrics` shows it now."""
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url("/metrics")) as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_ws_closes_total" and sample.labels == {
                "side": side,
                "code": code,
            }:
                return float(sample.value)
    return 0.0


async def socket_row(gateway: Gateway, database_url: str, key_id: str) -> asyncpg.Record:
    """The one socket row of `key_id`, once the session has ended and the ledger is written."""
    await eventually(lambda: not gateway.node.sessions, timeout=5)
    assert await gateway.node.ledger.flushed(10)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM sockets WHERE key_id = $1", key_id)
    finally:
        await conn.close()
    assert len(rows) == 1
    return rows[0]


async def until_closed(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0
) -> tuple[list[dict[str, Any]], aiohttp.WSMessage]:
    """Every event until the socket closes, and the message that closed it."""
    events: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return events, msg
        events.append(orjson.loads(msg.data))


def assert_closed(msg: aiohttp.WSMessage, ws: aiohttp.ClientWebSocketResponse, reason: str) -> None:
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    assert (msg.data, msg.extra) == (1000, reason)
    assert ws.close_code == 1000


def assert_row(row: asyncpg.Record, reason: str, turns: int) -> None:
    assert row["closed_by"] == "gateway", dict(row)
    assert (row["close_code"], row["close_reason"]) == (1000, reason)
    assert row["turns"] == turns


# -- idle socket timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [IDLE_ONLY])
async def test_an_idle_socket_is_closed_after_the_idle_timeout(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    before = await gateway_closes(gateway, "gateway", "1000")
    async with connect() as ws:
        events = await turn(ws)
        assert events[-1]["type"] == "response.completed"
        ended = time.monotonic()
        more, msg = await until_closed(ws)
        waited = time.monotonic() - ended
    assert more == []
    assert_closed(msg, ws, "idle timeout")
    # The idle period counts from the end of the turn, not from the client's last frame.
    assert LIMIT - 0.1 <= waited < LIMIT + 2.0, waited
    assert_row(await socket_row(gateway, database_url, tenant.key_id), "idle timeout", 1)
    assert await gateway_closes(gateway, "gateway", "1000") == before + 1


@pytest.mark.parametrize("settings_overrides", [IDLE_ONLY])
async def test_a_socket_that_never_sends_is_closed_idle(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        opened = time.monotonic()
        events, msg = await until_closed(ws)
        waited = time.monotonic() - opened
    assert events == []
    assert_closed(msg, ws, "idle timeout")
    assert LIMIT - 0.1 <= waited < LIMIT + 2.0, waited
    assert_row(await socket_row(gateway, database_url, tenant.key_id), "idle timeout", 0)


@pytest.mark.parametrize("settings_overrides", [IDLE_ONLY])
async def test_a_slow_response_is_not_cut_by_the_idle_timeout(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        # No client frame for ~2.1 s, and each gap between deltas longer than the idle timeout.
        await send(ws, create(metadata={"sim_deltas": "3", "sim_delay_ms": "700"}))
        events, msg = await until_closed(ws)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_text.delta") == 3
    assert kinds[-1] == "response.completed", kinds
    assert_closed(msg, ws, "idle timeout")  # afterwards, once idle
    assert_row(await socket_row(gateway, database_url, tenant.key_id), "idle timeout", 1)


@pytest.mark.parametrize("settings_overrides", [IDLE_ONLY])
async def test_a_client_that_keeps_sending_is_not_idle(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        started = time.monotonic()
        turns = 0
        while time.monotonic() - started < 4 * LIMIT:
            # Any client frame counts: turns, and `response.processed` acknowledgements.
            assert (await turn(ws))[-1]["type"] == "response.completed"
            turns += 1
            # Gaps of a fifth of the limit: a loaded host may stall the loop for a while.
            await asyncio.sleep(0.2 * LIMIT)
            await send(ws, {"type": "response.processed"})
            await asyncio.sleep(0.2 * LIMIT)
        assert not ws.closed
        events, msg = await until_closed(ws)
    assert events == []
    assert_closed(msg, ws, "idle timeout")
    assert_row(await socket_row(gateway, database_url, tenant.key_id), "idle timeout", turns)


# -- longest socket lifetime -----------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [LIFETIME_ONLY])
async def test_lifetime_closes_an_idle_socket_at_once(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    before = await gateway_closes(gateway, "gateway", "1000")
    async with connect() as ws:
        opened = time.monotonic()
        assert (await turn(ws))[-1]["type"] == "response.completed"
        events, msg = await until_closed(ws)
        lived = time.monotonic() - opened
    assert events == []
    assert_closed(msg, ws, "socket lifetime reached")
    assert LIMIT - 0.1 <= lived < LIMIT + 2.0, lived
    row = await socket_row(gateway, database_url, tenant.key_id)
    assert_row(row, "socket lifetime reached", 1)
    assert await gateway_closes(gateway, "gateway", "1000") == before + 1


@pytest.mark.parametrize("settings_overrides", [LIFETIME_ONLY])
async def test_lifetime_waits_for_the_response_in_flight(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        # About 1.5 s of streaming: the lifetime passes in the middle of it.
        await send(ws, create(metadata={"sim_deltas": "15", "sim_delay_ms": "100"}))
        events, msg = await until_closed(ws)
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_text.delta") == 15
    assert kinds[-1] == "response.completed", kinds  # whole, then the close
    assert_closed(msg, ws, "socket lifetime reached")
    row = await socket_row(gateway, database_url, tenant.key_id)
    assert_row(row, "socket lifetime reached", 1)
    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.fetchval(
            "SELECT status FROM turns WHERE socket_id = $1", row["socket_id"]
        )
    finally:
        await conn.close()
    assert status == "completed"


# -- both off --------------------------------------------------------------------------------------


async def test_due_slots_share_a_timer_and_fire_each_session_once_never_early() -> None:
    """`DueSlots`: sessions due in one slot share its timer; each fires once, not before its
    time and at most a sixteenth of its wait (at least 50 ms) after; one that left does not."""
    slots = DueSlots()
    loop = asyncio.get_running_loop()
    fired: list[tuple[int, float]] = []

    class Due:
        def __init__(self, n: int) -> None:
            self.n = n

        def limits_due(self) -> None:
            fired.append((self.n, loop.time()))

    started = loop.time()
    sessions = [Due(n) for n in range(200)]
    ends = [slots.add(session, 0.8 if session.n % 2 else 0.3) for session in sessions]
    assert len(set(ends)) <= 4  # two waits, each in one slot (or two, at a slot's edge)
    slots.leave(sessions[0], ends[0])
    assert len(slots) == 199
    await asyncio.sleep(1.2)
    assert sorted(n for n, _ in fired) == list(range(1, 200))
    for n, at in fired:
        wait = 0.8 if n % 2 else 0.3
        assert started + wait - 0.002 <= at <= started + wait + max(wait / 16, 0.05) + 0.1
    assert len(slots) == 0


def test_defaults_are_an_hour_idle_and_a_day_of_life() -> None:
    fields = Settings.model_fields
    assert fields["idle_socket_seconds"].default == 3600
    assert fields["max_socket_seconds"].default == 86400


@pytest.mark.parametrize("settings_overrides", [NEITHER])
async def test_zero_disables_both_limits(gateway: Gateway, connect: Connect) -> None:
    async with connect() as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
        (session,) = gateway.sessions
        assert session._limits is None  # no timer at all
        await asyncio.sleep(4 * LIMIT)
        assert not ws.closed
        assert (await turn(ws))[-1]["type"] == "response.completed"
        assert session.state is State.IDLE


# -- the close handshake a client still sending gets -----------------------------------------------


async def keep_sending(ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> int:
    """Frames the gateway ignores, as fast as the loop allows, until `stop`; raises if one fails."""
    sent = 0
    while not stop.is_set():
        await send(ws, {"type": "response.processed"})
        sent += 1
        await asyncio.sleep(0.001)
    return sent


async def trigger(how: str, gateway: Gateway, tenant: Tenant) -> asyncio.Task[Any] | None:
    if how == "revoke":
        key = await gateway.store.get_key(tenant.key_id)
        assert key is not None
        await gateway.store.revoke_key(key.id)
    elif how == "drain":
        from app.server import drain

        return asyncio.create_task(drain(gateway.node, deadline=5))
    return None  # "lifetime": the gateway's own timer


@pytest.mark.parametrize(
    ("how", "code", "settings_overrides"),
    [
        ("revoke", 1008, {}),
        ("drain", 1001, {}),
        ("lifetime", 1000, {**LIFETIME_ONLY, "GATEWAY_MAX_SOCKET_SECONDS": 2 * LIMIT}),
    ],
)
async def test_a_client_still_sending_gets_the_gateways_close_code(
    gateway: Gateway,
    tenant: Tenant,
    connect: Connect,
    database_url: str,
    how: str,
    code: int,
) -> None:
    """aiohttp's `close()` from a task other than the reader closed TCP right after the close
    frame: a client still sending got a reset, and aiohttp's client reported 1006 (it cannot send
    its answer) although the gateway's frame had come. The gateway now waits for the answer."""
    async with connect() as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
        (session,) = gateway.node.sessions
        stop = asyncio.Event()
        sender = asyncio.create_task(keep_sending(ws, stop))
        task = await trigger(how, gateway, tenant)
        await eventually(lambda: session.state is not State.IDLE, timeout=5)
        await asyncio.sleep(0.5)  # the close frame is out; the client is busy sending
        stop.set()
        assert await sender > 0  # every send went through: the connection was still open
        events, msg = await until_closed(ws)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert msg.data == code and ws.close_code == code
        if task is not None:
            await task
    if how == "revoke":
        assert [e["error"]["code"] for e in events] == ["api_key_revoked"]
    row = await socket_row(gateway, database_url, tenant.key_id)
    assert (row["closed_by"], row["close_code"]) == ("gateway", code)


# -- the client's side -----------------------------------------------------------------------------


async def test_a_client_close_is_recorded_with_its_code_and_reason(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
        await ws.close(code=4000, message=b"done for today")
    row = await socket_row(gateway, database_url, tenant.key_id)
    assert (row["closed_by"], row["close_code"], row["close_reason"]) == (
        "client",
        4000,
        "done for today",
    )


async def test_a_vanished_client_is_recorded_1006(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    before = await gateway_closes(gateway, "client", "1006")
    async with connect() as ws:
        await send(ws, create(metadata={"sim_deltas": "50", "sim_delay_ms": "50"}))
        assert (await recv(ws))["type"] == "response.created"
        transport = ws._response.connection.transport if ws._response.connection else None
        assert transport is not None
        transport.abort()  # no close frame: the client is simply gone
    row = await socket_row(gateway, database_url, tenant.key_id)
    assert (row["closed_by"], row["close_code"]) == ("client", 1006)
    assert row["close_reason"] == "connection lost without a close frame"
    assert await gateway_closes(gateway, "client", "1006") == before + 1
