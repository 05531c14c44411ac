"""The warm upstream pool (app/pool.py) against the real simulator: a new socket's first turn uses
a socket opened ahead of demand, the pool refills, drops and age are handled, and it stays out of
the way when off, for unset credentials, and at shutdown."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import (
    UPSTREAM_KEY,
    Connect,
    Gateway,
    Sim,
    Tenant,
    create,
    eventually,
    make_tenant,
    recv,
    send,
    text_of,
    turn,
    until_terminal,
)

from app.metrics import REGISTRY
from app.models import DEFAULT_CREDENTIAL
from app.pool import BACKOFF_CAP_SECONDS, backoff_seconds

POOL = {"GATEWAY_UPSTREAM_POOL_SIZE": 2}
ONE = {"GATEWAY_UPSTREAM_POOL_SIZE": 1}
SLOW_HANDSHAKE_MS = 600.0


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


async def open_ids(sim: Sim) -> list[str]:
    """The simulator's open upstream sockets."""
    return [c["id"] for c in (await sim._json("GET", "/_sim/connections"))["data"]]


async def drop(sim: Sim, conn_id: str) -> None:
    await sim._json("POST", f"/_sim/connections/{conn_id}/drop")


async def request_conns(sim: Sim) -> list[str]:
    """The upstream socket each `response.create` arrived on, in order."""
    return [r["conn"] for r in await sim.requests()]


async def warm(gateway: Gateway, count: int, name: str = DEFAULT_CREDENTIAL) -> None:
    await eventually(lambda: gateway.node.pool.ready(name) == count, timeout=10)


# -- the backoff, without sockets -----------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    assert backoff_seconds(0) == 0.0
    assert [backoff_seconds(n, lambda: 1.0) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert [backoff_seconds(n, lambda: 0.0) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert backoff_seconds(50, lambda: 1.0) == BACKOFF_CAP_SECONDS
    assert backoff_seconds(10**6, lambda: 0.0) == BACKOFF_CAP_SECONDS / 2


# -- handing out and refilling --------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [POOL])
@pytest.mark.parametrize("sim_options", [{"handshake_delay_ms": SLOW_HANDSHAKE_MS}], indirect=True)
async def test_first_turn_uses_a_warm_socket_and_the_pool_refills(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    await warm(gateway, 2)
    warmed = await open_ids(sim)
    assert len(warmed) == 2 and len(await sim.handshakes()) == 2
    async with connect() as ws:
        started = time.perf_counter()
        await send(ws, create(input=[user("hi")]))
        first = await recv(ws)
        waited = time.perf_counter() - started
        events = [first, *await until_terminal(ws)]
        assert events[-1]["type"] == "response.completed", events[-1]
        assert text_of(events) == "echo: hi"
        # The first event came before a handshake could have finished.
        assert waited < SLOW_HANDSHAKE_MS / 1000, waited
        (used,) = await request_conns(sim)
        assert used == warmed[0]  # the oldest goes first
        await warm(gateway, 2)  # refilled in the background
        assert len(await sim.handshakes()) == 3
        # The session keeps its upstream socket: a second turn opens nothing.
        assert (await turn(ws, input=[user("again")]))[-1]["type"] == "response.completed"
        assert (await request_conns(sim))[-1] == used
    assert len(await sim.handshakes()) == 3


@pytest.mark.parametrize("settings_overrides", [POOL])
async def test_a_burst_larger_than_the_pool_opens_the_rest_itself(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    await warm(gateway, 2)
    warmed = set(await open_ids(sim))
    async with connect() as a, connect() as b, connect() as c:
        for ws in (a, b, c):
            await send(ws, create())
        for ws in (a, b, c):
            assert (await until_terminal(ws))[-1]["type"] == "response.completed"
        used = await request_conns(sim)
    assert len(set(used)) == 3
    assert len(warmed & set(used)) == 2
    await warm(gateway, 2)


@pytest.mark.parametrize("settings_overrides", [ONE])
async def test_a_chained_turn_on_a_pooled_socket_continues_from_memory(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    await warm(gateway, 1)
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")]))[-1]["response"]["id"]
        r2 = (await turn(ws, input=[user("two")], previous_response_id=r1))[-1]["response"]["id"]
        first_conn = (await request_conns(sim))[-1]
        assert (await sim.requests())[-1]["body"]["previous_response_id"] == r1  # OpenAI's cache
        # The session's upstream socket goes; the next turn gets the pool's (fresh) one.
        await warm(gateway, 1)
        (spare,) = set(await open_ids(sim)) - {first_conn}
        (session,) = gateway.sessions
        assert session.upstream is not None
        dropped = session.upstream.conn
        await drop(sim, first_conn)
        await eventually(lambda: dropped is None or not dropped.usable)  # the gateway saw it
        third = await turn(ws, input=[user("three")], previous_response_id=r2)
        assert third[-1]["type"] == "response.completed", third[-1]
        assert text_of(third) == "echo: three"
    last = (await sim.requests())[-1]
    assert last["conn"] == spare
    # A pooled socket has served nothing: the chain is sent from the conversation memory.
    assert last["body"]["previous_response_id"] is None
    contents = [i.get("content") for i in last["body"]["input"] if i.get("role") == "user"]
    assert contents == ["one", "two", "three"]


# -- what happens to idle pooled sockets ----------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [ONE])
async def test_a_dropped_idle_socket_is_replaced_and_never_handed_out(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    await warm(gateway, 1)
    (dead,) = await open_ids(sim)
    await drop(sim, dead)
    # At once: the turn must not get the dead socket (it would fail with upstream_websocket_closed).
    async with connect() as ws:
        events = await turn(ws)
        assert events[-1]["type"] == "response.completed", events[-1]
    assert dead not in await request_conns(sim)
    await warm(gateway, 1)
    assert dead not in await open_ids(sim)


@pytest.mark.parametrize(
    "settings_overrides",
    [
        pytest.param({**ONE, "GATEWAY_UPSTREAM_POOL_REFRESH_SECONDS": 0.3}, id="refresh-setting"),
        pytest.param({**ONE, "GATEWAY_UPSTREAM_MAX_AGE_SECONDS": 0.6}, id="half-the-max-age"),
    ],
)
async def test_pooled_sockets_are_refreshed_by_age(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    assert gateway.node.pool.refresh_age == pytest.approx(0.3)
    await warm(gateway, 1)
    (first,) = await open_ids(sim)
    await eventually(lambda: _handshakes_at_least(sim, 4), timeout=10)
    await eventually(lambda: _open_ids_without(sim, first), timeout=5)  # the old one was closed
    await warm(gateway, 1)
    assert len(await open_ids(sim)) <= 2  # one pooled, at most one replacement under way
    async with connect() as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
        (session,) = gateway.sessions
        assert session.upstream is not None
        conn = session.upstream.conn
        assert conn is not None and conn.served == 1
        # Its age counts from its own handshake, and it was handed out young enough.
        assert conn.age < gateway.node.pool.max_take_age + 0.5


async def _handshakes_at_least(sim: Sim, count: int) -> bool:
    return len(await sim.handshakes()) >= count


async def _open_ids_without(sim: Sim, conn_id: str) -> bool:
    return conn_id not in await open_ids(sim)


@pytest.mark.parametrize("settings_overrides", [POOL])
@pytest.mark.parametrize("sim_options", [{"handshake_fault": "503"}], indirect=True)
async def test_an_upstream_that_refuses_handshakes_is_not_hammered(
    gateway: Gateway, connect: Connect, sim: Sim, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.sleep(1.6)
    # Two at start, then one pair per backoff (0.25-0.5 s, 0.5-1 s, 1-2 s): not hundreds.
    assert 2 <= len(await sim.handshakes()) <= 8
    async with connect() as ws:  # the first turn still tries for itself, and says why it failed
        event = (await turn(ws))[-1]
        assert event["error"]["code"] == "upstream_websocket_handshake_failed"
    records = caplog.get_records("setup") + caplog.get_records("call")  # it began at start-up
    lines = [r for r in records if r.name == "gateway.pool"]
    assert [r.getMessage() for r in lines] == [
        "upstream pool: could not keep a socket warm; backing off"
    ]
    assert "HTTP 503" in lines[0].__dict__["detail"]
    assert UPSTREAM_KEY not in repr(lines[0].__dict__)


# -- staying out of the way -----------------------------------------------------------------------


async def test_pool_size_0_opens_nothing_ahead(
    gateway: Gateway, connect: Connect, sim: Sim
) -> None:
    assert gateway.node.settings.upstream_pool_size == 0  # the default
    await asyncio.sleep(0.3)
    assert await sim.handshakes() == []
    assert gateway.node.pool.names == frozenset()
    async with connect() as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
    assert len(await sim.handshakes()) == 1


@pytest.mark.parametrize("settings_overrides", [{**ONE, "OPENAI_API_KEY": ""}])
async def test_only_credentials_set_on_the_node_are_warmed(
    gateway: Gateway, sim: Sim, monkeypatch: pytest.MonkeyPatch, connect: Connect
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("POOL_TEST_TEAM_KEY", "sk-team-pool-key")
    monkeypatch.delenv("POOL_TEST_UNSET_KEY", raising=False)
    await make_tenant(gateway.store, "acme")  # the default credential, unset here
    beta = await make_tenant(gateway.store, "beta", credential="POOL_TEST_TEAM_KEY")
    await make_tenant(gateway.store, "gamma", credential="POOL_TEST_UNSET_KEY")
    await eventually(lambda: gateway.node.pool.names == {"POOL_TEST_TEAM_KEY"})
    await warm(gateway, 1, "POOL_TEST_TEAM_KEY")
    await asyncio.sleep(0.2)
    shakes = await sim.handshakes()
    assert [h["headers"]["authorization"] for h in shakes] == ["Bearer sk-team-pool-key"]
    async with connect(key=beta.key) as ws:
        assert (await turn(ws))[-1]["type"] == "response.completed"
    assert (await request_conns(sim)) == [shakes[0]["conn"]]


@pytest.mark.parametrize("settings_overrides", [POOL])
async def test_a_team_credential_is_warmed_beside_the_default(
    gateway: Gateway, tenant: Tenant, sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOL_TEST_TEAM_KEY", "sk-team-pool-key")
    beta = await make_tenant(gateway.store, "beta", credential="POOL_TEST_TEAM_KEY")
    await warm(gateway, 2)
    await warm(gateway, 2, "POOL_TEST_TEAM_KEY")
    seen = sorted(h["headers"]["authorization"] for h in await sim.handshakes())
    assert seen == ["Bearer sk-team-pool-key"] * 2 + [f"Bearer {UPSTREAM_KEY}"] * 2
    # The last team using a credential is disabled: its warm sockets are closed.
    await gateway.store.put_team(beta.team.model_copy(update={"active": False}))
    await eventually(lambda: gateway.node.pool.names == {DEFAULT_CREDENTIAL})
    await eventually(lambda: _open_count(sim, 2))
    assert gateway.node.pool.ready(DEFAULT_CREDENTIAL) == 2


async def _open_count(sim: Sim, count: int) -> bool:
    return len(await open_ids(sim)) == count


@pytest.mark.parametrize("settings_overrides", [POOL])
async def test_shutdown_closes_the_pooled_sockets(gateway: Gateway, sim: Sim) -> None:
    await warm(gateway, 2)
    assert len(await open_ids(sim)) == 2
    ready = REGISTRY.get_sample_value("gateway_upstream_pool_ready") or 0.0
    assert ready >= 2
    await gateway.server.close()
    assert gateway.node.pool.names == frozenset()
    assert REGISTRY.get_sample_value("gateway_upstream_pool_ready") == ready - 2
    await eventually(lambda: _no_open(sim), timeout=5)
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("pool-")]
    assert left == []


async def _no_open(sim: Sim) -> bool:
    return not await open_ids(sim)
