"""Faults with real processes: Redis stops and comes back while a socket streams, and the
client vanishes mid-response (its transport aborted, or its process killed).

Redis here is a throwaway `redis-server` on its own port (tests/services.py `RedisServer`), never
the machine's: the test stops it. CONTRACT.md §4: while Redis is away new handshakes and admin
calls get 503 `service_unavailable`, live sockets keep serving on what they last saw, rate limits
fail open, and the outage shows in `/readyz` and `gateway_redis_up`. §6: the ledger says who
closed a socket, and a response the client left is `cancelled`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import (
    Connect,
    Gateway,
    Sim,
    Tenant,
    create,
    eventually,
    gateway_settings,
    make_tenant,
    recv,
    send,
    turn,
)
from services import RedisServer, fresh_redis_prefix
from test_ws_checks import assert_error, assert_usable
from test_ws_handshake import assert_http_error, handshake

from app import keystore
from app.models import Limits
from app.server import create_app

# A response that streams for about five seconds: long enough to leave in the middle.
SLOW = {"sim_deltas": "100", "sim_delay_ms": "50"}
TIMEOUT = aiohttp.ClientTimeout(total=10)


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def get(gateway: Gateway, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(gateway.url(path)) as resp:
            return resp.status, await resp.text()


def gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# -- Redis stops and comes back ------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def redis_gateway(
    aiohttp_server: Any, own_redis: RedisServer, database_url: str, sim: Sim, tmp_path: Path
) -> Gateway:
    settings = gateway_settings(
        own_redis.url, fresh_redis_prefix(), database_url, sim.base_url, tmp_path / "spill"
    )
    app = create_app(settings)
    return Gateway(await aiohttp_server(app), app)


@pytest.fixture
async def limited(redis_gateway: Gateway) -> Tenant:
    # A rate limit, so every accepted turn asks Redis (and fails open while it is away). A team
    # of its own: a spend limit rebuilt from the run's shared ledger sees only this test's rows.
    return await make_tenant(
        redis_gateway.store,
        team_id=f"faults-{os.urandom(4).hex()}",
        limits=Limits(responses_per_minute_per_key=1000, sockets_per_key=50),
    )


@pytest.fixture
async def live_socket(
    redis_gateway: Gateway, limited: Tenant
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        headers = {"Authorization": f"Bearer {limited.key}"}
        async with http.ws_connect(redis_gateway.url("/v1/responses"), headers=headers) as ws:
            yield ws


async def stop_redis(gateway: Gateway, redis: RedisServer) -> None:
    """Redis goes away with its data on disk (SAVE first), as a restart with persistence."""
    await gateway.store.redis.save()
    await asyncio.to_thread(redis.stop)


async def test_redis_away_refuses_handshakes_and_keeps_live_sockets_streaming(
    redis_gateway: Gateway,
    own_redis: RedisServer,
    limited: Tenant,
    live_socket: aiohttp.ClientWebSocketResponse,
) -> None:
    auth = {"Authorization": f"Bearer {limited.key}"}
    await assert_usable(live_socket, "before")
    await stop_redis(redis_gateway, own_redis)

    status, body, _ = await handshake(redis_gateway, auth)
    assert status == 503
    assert_http_error(body, "service_unavailable")
    for i in range(3):  # live sockets keep serving; the rate limit fails open
        await assert_usable(live_socket, f"during {i}")
    await send(live_socket, create(model="openai/o3"))  # routing still judged on the last view
    assert_error(await recv(live_socket), "openai_routing_failed", 403, "model")
    status, text = await get(redis_gateway, "/readyz")
    assert status == 503 and orjson.loads(text)["redis"] is False
    assert gauge((await get(redis_gateway, "/metrics"))[1], "gateway_redis_up") == 0
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        headers = {"Authorization": "Bearer admin-test-token"}
        async with http.get(redis_gateway.url("/admin/v1/teams"), headers=headers) as resp:
            assert resp.status == 503
            assert_http_error(await resp.json(), "service_unavailable")


async def test_after_redis_returns_nothing_is_wedged(
    redis_gateway: Gateway,
    own_redis: RedisServer,
    limited: Tenant,
    live_socket: aiohttp.ClientWebSocketResponse,
) -> None:
    auth = {"Authorization": f"Bearer {limited.key}"}
    await stop_redis(redis_gateway, own_redis)
    assert (await handshake(redis_gateway, auth))[0] == 503
    await assert_usable(live_socket, "during")
    await asyncio.to_thread(own_redis.start)

    async def ready() -> bool:
        return (await get(redis_gateway, "/readyz"))[0] == 200

    await eventually(ready, timeout=10)
    assert gauge((await get(redis_gateway, "/metrics"))[1], "gateway_redis_up") == 1
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        url = redis_gateway.url("/v1/responses")
        sockets = [await http.ws_connect(url, headers=auth) for _ in range(5)]
        for i, ws in enumerate(sockets):  # new handshakes, turns, the rate limit counting again
            await assert_usable(ws, f"after {i}")
        await assert_usable(live_socket, "after")
        sessions = await redis_gateway.store.list_sessions()
        assert len(sessions) >= 5  # session records and slots are written again
        # The node's view of Redis moves again: a revocation reaches every live socket.
        key = await redis_gateway.store.get_key(limited.key_id)
        assert key is not None
        await redis_gateway.store.revoke_key(key.id)
        for ws in [live_socket, *sockets]:
            event = await recv(ws, timeout=5)
            assert_error(event, "api_key_revoked", 401)
            assert (await ws.receive(timeout=5)).type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            )
            assert ws.close_code == 1008
    await eventually(lambda: not redis_gateway.node.sessions, timeout=5)


async def assert_a_turn_while_frozen(
    redis: RedisServer, ws: aiohttp.ClientWebSocketResponse
) -> None:
    """Redis hangs (SIGSTOP): a turn on a live socket still completes, within 2.5 s."""
    redis.freeze()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await assert_usable(ws, "frozen")
        took = loop.time() - started
    finally:
        redis.thaw()
    assert took < 2.5, f"a turn took {took:.1f} s while Redis hung"


async def test_a_hung_redis_does_not_stall_live_turns(
    redis_gateway: Gateway,
    own_redis: RedisServer,
    live_socket: aiohttp.ClientWebSocketResponse,
) -> None:
    await assert_usable(live_socket, "before")
    await assert_a_turn_while_frozen(own_redis, live_socket)


async def test_a_hung_redis_does_not_stall_live_turns_with_spend_limits(
    redis_gateway: Gateway,
    own_redis: RedisServer,
    limited: Tenant,
    live_socket: aiohttp.ClientWebSocketResponse,
) -> None:
    """Check 8's spend script has the rate limit's deadline: the turn fails open after it."""
    budget = Limits(
        responses_per_minute_per_key=1000, tokens_per_minute_per_key=10**9, usd_per_day_per_team=9
    )
    await limited.store.put_team(limited.team.model_copy(update={"limits": budget}))

    def seen() -> bool:
        team = redis_gateway.node.view.view.teams.get(limited.team.id)
        return team is not None and team.limits == budget

    await eventually(seen)
    await assert_usable(live_socket, "before")  # the counters exist (rebuilt) from here on
    await assert_a_turn_while_frozen(own_redis, live_socket)


async def test_a_hung_redis_gets_handshakes_and_readyz_a_503_within_a_second_or_so(
    redis_gateway: Gateway,
    own_redis: RedisServer,
    limited: Tenant,
    live_socket: aiohttp.ClientWebSocketResponse,
) -> None:
    auth = {"Authorization": f"Bearer {limited.key}"}
    loop = asyncio.get_running_loop()
    own_redis.freeze()
    try:
        started = loop.time()
        status = (await handshake(redis_gateway, auth))[0]
        handshake_took = loop.time() - started
        started = loop.time()
        ready = (await get(redis_gateway, "/readyz"))[0]
        readyz_took = loop.time() - started
    finally:
        own_redis.thaw()
    print(
        f"\nhung Redis: handshake {status} in {handshake_took:.2f} s, /readyz {ready} in "
        f"{readyz_took:.2f} s"
    )
    assert status == 503 and ready == 503
    # HANDSHAKE_DEADLINE_SECONDS is 1 and a timeout is not retried: a handshake waits for at
    # most its secret's lookup and its slot's call (about 2 s here), not the ~6 s of retries.
    assert handshake_took < 3.0 and readyz_took < 2.0
    await assert_usable(live_socket, "after")


@pytest.fixture
def quick_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slot leases renewed every 0.1 s, not 15 (read when the node's renewal loop starts)."""
    monkeypatch.setattr(keystore, "LEASE_REFRESH_SECONDS", 0.1)


async def test_failing_lease_renewals_are_counted_and_logged_once_per_streak(
    quick_leases: None,
    redis_gateway: Gateway,
    own_redis: RedisServer,
    live_socket: aiohttp.ClientWebSocketResponse,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A renewal that keeps failing lets the node's socket caps lapse after 45 s: the operator
    sees it in a counter and in one log line per streak (and one when it works again)."""
    caplog.set_level(logging.INFO, logger="gateway.node")

    async def failures() -> float:
        text = (await get(redis_gateway, "/metrics"))[1]
        return gauge(text, "gateway_lease_renewal_failures_total")

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.node"]

    before = await failures()
    own_redis.freeze()
    try:

        async def three_more() -> bool:
            return await failures() >= before + 3

        await eventually(three_more, timeout=15)  # each renewal waits out Redis' 1 s timeout
    finally:
        own_redis.thaw()
    (failing,) = lines()
    assert failing.levelno == logging.WARNING and "renew" in failing.getMessage()

    def recovered() -> bool:
        return len(lines()) == 2

    await eventually(recovered, timeout=10)
    back = lines()[1]
    assert back.levelno == logging.INFO and back.__dict__["failures"] >= 3
    settled = await failures()
    await asyncio.sleep(0.5)  # five renewals more, all of them through
    assert await failures() == settled
    assert len(lines()) == 2
    await assert_usable(live_socket, "after")


# -- the client vanishes mid-response ------------------------------------------------------------


async def sim_connections(sim: Sim) -> list[dict[str, Any]]:
    return list((await sim._json("GET", "/_sim/connections"))["data"])


async def assert_left_mid_response(
    gateway: Gateway, sim: Sim, database_url: str, tenant: Tenant
) -> None:
    """The upstream socket is closed, the session gone, and the ledger says the client left."""

    async def upstream_closed() -> bool:
        return not await sim_connections(sim)

    await eventually(upstream_closed, timeout=5)
    await eventually(lambda: not gateway.node.sessions, timeout=5)
    assert await gateway.node.ledger.flushed(10)
    sockets = await fetch(database_url, "SELECT * FROM sockets WHERE key_id = $1", tenant.key_id)
    assert len(sockets) == 1
    row = sockets[0]
    assert row["closed_by"] == "client", dict(row)
    # No close frame came: RFC 6455's 1006 (abnormal closure), which names that; never sent.
    assert row["close_code"] == 1006, dict(row)
    assert row["close_reason"] == "connection lost without a close frame"
    assert row["closed_at"] is not None and row["turns"] == 2
    turns = await fetch(
        database_url,
        "SELECT status, response_id FROM turns WHERE socket_id = $1 ORDER BY received_at",
        row["socket_id"],
    )
    assert [t["status"] for t in turns] == ["completed", "cancelled"]
    assert turns[1]["response_id"], "the cancelled turn keeps the id it was given"


async def test_client_transport_aborted_mid_response(
    gateway: Gateway, sim: Sim, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        await send(ws, create(metadata=SLOW))
        while (await recv(ws))["type"] != "response.output_text.delta":
            pass
        assert len(await sim_connections(sim)) == 1
        transport = ws._response.connection.transport if ws._response.connection else None
        assert transport is not None
        transport.abort()  # no close frame, no FIN handshake: the client is simply gone
    await assert_left_mid_response(gateway, sim, database_url, tenant)


CLIENT = textwrap.dedent(
    """
    import asyncio, os, sys, aiohttp, orjson

    async def until(ws, kind):
        while orjson.loads((await ws.receive()).data)["type"] != kind:
            pass

    async def main():
        headers = {"Authorization": "Bearer " + os.environ["GW_KEY"]}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(os.environ["GW_URL"], headers=headers) as ws:
                *done, last = orjson.loads(os.environ["GW_FRAMES"])
                for frame in done:
                    await ws.send_str(orjson.dumps(frame).decode())
                    await until(ws, "response.completed")
                await ws.send_str(orjson.dumps(last).decode())
                await until(ws, "response.output_text.delta")
                print("streaming", flush=True)
                await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_client_process_killed_mid_response(
    gateway: Gateway, sim: Sim, tenant: Tenant, database_url: str
) -> None:
    env = {
        **os.environ,
        "GW_KEY": tenant.key,
        "GW_URL": gateway.url("/v1/responses"),
        "GW_FRAMES": orjson.dumps([create(), create(metadata=SLOW)]).decode(),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        assert line.strip() == b"streaming"
        assert len(await sim_connections(sim)) == 1
    finally:
        proc.kill()
        await proc.wait()
    await assert_left_mid_response(gateway, sim, database_url, tenant)


async def test_a_vanished_client_leaves_the_node_serving(
    gateway: Gateway, sim: Sim, connect: Connect
) -> None:
    async with connect() as ws:
        await send(ws, create(metadata=SLOW))
        await recv(ws)
        transport = ws._response.connection.transport if ws._response.connection else None
        assert transport is not None
        transport.abort()
    await eventually(lambda: not gateway.node.sessions, timeout=5)
    async with connect() as ws:
        events = await turn(ws)
        assert events[-1]["type"] == "response.completed"
