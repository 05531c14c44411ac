"""Redis under Sentinel and over TLS (CONTRACT.md §1, §4).

A primary, a replica and three Sentinels (tests/services.py `SentinelTopology`, started once, by
the first test here). The gateway is given only the Sentinels and a REDIS_URL whose host
answers nothing, so every call it makes went through Sentinel. The cross-node tests of
tests/test_admin_live.py and the handshake refusals of tests/test_ws_handshake.py run again here
(imported: pytest collects them in this module, with this module's fixtures). Then two
failovers: a coordinated one (`SENTINEL FAILOVER`: the old primary lives on as a replica and
answers READONLY on the connections still open to it), and the primary SIGKILLed under load.
The failover tests change which server is primary; they run last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import orjson
import pytest
from conftest import (
    Gateway,
    Tenant,
    create,
    gateway_settings,
    make_tenant,
    recv,
    send,
    until_terminal,
)
from services import (
    SentinelTopology,
    TlsRedisServer,
    delete_prefix,
    redis_command,
    run_blocking,
    session_sentinel_topology,
)
from test_admin_live import (  # noqa: F401  # collected here again, against Sentinel
    admin,
    expelled,
    socket,
    test_rate_limit_holds_across_nodes,
    test_revocation_closes_sockets_on_both_nodes_within_a_second,
    test_rotation_grace_ends_on_both_nodes,
    test_socket_cap_per_key_holds_across_nodes,
    test_socket_cap_per_team_holds_across_nodes,
)
from test_ws_checks import assert_usable
from test_ws_handshake import test_revoked_expired_and_disabled_handshakes  # noqa: F401

from app.config import ConfigError, RedisSettings, load
from app.models import Limits
from app.server import create_app

TOKEN = "admin-test-token"
PROMOTION_TO_SERVICE = 10.0  # CONTRACT.md §4
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.fixture(scope="session")
def sentinel_topology() -> Iterator[SentinelTopology]:
    yield from session_sentinel_topology()


@pytest.fixture
def redis_url(sentinel_topology: SentinelTopology) -> str:
    return sentinel_topology.url  # nothing listens there: only the Sentinels lead to Redis


@pytest.fixture
def redis_prefix(sentinel_topology: SentinelTopology) -> Iterator[str]:
    from services import fresh_redis_prefix

    prefix = fresh_redis_prefix()
    yield prefix
    port = sentinel_topology.master_port()
    if port is not None:
        run_blocking(delete_prefix(f"redis://127.0.0.1:{port}/0", prefix))


@pytest.fixture
def settings_overrides(sentinel_topology: SentinelTopology) -> dict[str, Any]:
    return {
        "GATEWAY_NODE_ID": "node-a",
        "GATEWAY_REDIS_SENTINELS": sentinel_topology.sentinel_addresses,
    }


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [("127.0.0.1", "expected host:port"), ("h:1,h:99999", "1-65535"), (",", "host:port")],
)
def test_a_bad_sentinel_list_is_one_line_naming_the_variable(
    value: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_SENTINELS", value)
    with pytest.raises(ConfigError) as info:
        load(RedisSettings)
    line = str(info.value)
    assert line.startswith("GATEWAY_REDIS_SENTINELS: ") and words in line and "\n" not in line


def test_sentinel_settings_default_to_off_and_mymaster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_REDIS_SENTINELS", raising=False)
    monkeypatch.delenv("GATEWAY_REDIS_SENTINEL_MASTER", raising=False)
    settings = load(RedisSettings)
    assert settings.sentinel_addresses == [] and settings.redis_sentinel_master == "mymaster"
    monkeypatch.setenv("GATEWAY_REDIS_SENTINELS", " 10.0.0.1:26379,[::1]:26380 ")
    assert load(RedisSettings).sentinel_addresses == [("10.0.0.1", 26379), ("::1", 26380)]


# -- through Sentinel -------------------------------------------------------------------------


async def test_handshake_and_turn_through_sentinel(
    gateway: Gateway, tenant: Tenant, sentinel_topology: SentinelTopology
) -> None:
    pool = gateway.store.redis.connection_pool
    assert type(pool).__name__ == "_SentinelBlockingPool"
    async with socket(gateway, tenant.key) as ws:
        await assert_usable(ws)
    assert pool.connection_kwargs.get("port") is None  # the address came from the Sentinels
    master = sentinel_topology.master_port()
    assert getattr(pool, "master_address", None) == ("127.0.0.1", master)


async def test_a_burst_waits_for_the_pool_instead_of_failing(gateway: Gateway) -> None:
    store = gateway.store
    results = await asyncio.gather(*(store.version() for _ in range(500)))
    assert len(results) == 500  # 500 calls on a 64-connection pool: none "Too many connections"


# -- rediss:// --------------------------------------------------------------------------------


async def test_rediss_with_a_self_signed_ca(
    aiohttp_server: Any, database_url: str, sim: Any, tmp_path: Path
) -> None:
    from services import fresh_redis_prefix

    with TlsRedisServer() as tls:
        prefix = fresh_redis_prefix()
        settings = gateway_settings(tls.url, prefix, database_url, sim.base_url, tmp_path / "spill")
        app = create_app(settings)
        gw = Gateway(await aiohttp_server(app), app)
        tenant = await make_tenant(gw.store)
        async with socket(gw, tenant.key) as ws:
            await assert_usable(ws)
        print(f"\nrediss:// with ssl_ca_certs: handshake + turn served (port {tls.port})")


# -- failovers --------------------------------------------------------------------------------


async def status_of(http: aiohttp.ClientSession, gw: Gateway, key: str) -> tuple[int, str, float]:
    """One handshake: its status, the error code of a refusal, and how long it took."""
    start = time.monotonic()
    headers = {**UPGRADE, "Authorization": f"Bearer {key}"}
    try:
        async with http.get(gw.url("/v1/responses"), headers=headers) as resp:
            code = ""
            if resp.status != 101:
                code = orjson.loads(await resp.read())["error"]["code"]
            return resp.status, code, time.monotonic() - start
    except (TimeoutError, aiohttp.ClientError) as exc:
        return -1, repr(exc), time.monotonic() - start


# How long a failover test waits for a promotion, or for an admin call to be served again,
# before it fails: a failover that never completes is a failure, not a hang of the suite.
GIVE_UP_SECONDS = 60.0


async def wait_promotion(topology: SentinelTopology, old: int) -> float:
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while time.monotonic() < deadline:
        port = await asyncio.to_thread(topology.master_port)
        if port is not None and port != old:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no replica promoted {GIVE_UP_SECONDS:g} s after the primary :{old}")


async def admin_until_served(gw: Gateway, method: str, path: str, body: Any = None) -> Any:
    """An admin call repeated while it gets 503 (Redis away); its 2xx body."""
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Admin-Actor": "test"}
    timeout = aiohttp.ClientTimeout(total=5)
    deadline = time.monotonic() + GIVE_UP_SECONDS
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while time.monotonic() < deadline:
            async with http.request(
                method, gw.url("/admin/v1" + path), json=body, headers=headers
            ) as resp:
                value = orjson.loads(await resp.read())
                if resp.status != 503:
                    assert resp.status in (200, 201), value
                    return value
                assert value["error"]["code"] == "service_unavailable"
            await asyncio.sleep(0.05)
    raise AssertionError(f"{method} {path}: still 503 after {GIVE_UP_SECONDS:g} s")


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not logged, [f"{r.name}: {r.getMessage()}" for r in logged[:5]]


class Handshakes:
    """New handshakes at a steady rate on two nodes, each one's outcome recorded; they run
    while the `async with` block does. Its end waits for the ones in flight, also when the
    block fails: none outlives the test (and its gateways) to log into the next one."""

    def __init__(self, nodes: list[Gateway], key: str, per_second: float) -> None:
        self.nodes, self.key, self.interval = nodes, key, 1 / per_second
        self.results: list[tuple[float, int, str, float]] = []  # started, status, code, seconds
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._runner = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        if self._runner is not None:
            await self._runner

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            tasks: list[asyncio.Task[None]] = []
            i = 0
            while not self._stop.is_set():
                tasks.append(asyncio.create_task(self._one(http, self.nodes[i % 2])))
                i += 1
                await asyncio.sleep(self.interval)
            await asyncio.gather(*tasks)

    async def _one(self, http: aiohttp.ClientSession, gw: Gateway) -> None:
        started = time.monotonic()
        status, code, took = await status_of(http, gw, self.key)
        self.results.append((started, status, code, took))

    def stop(self) -> None:
        self._stop.set()

    def first_served_after(self, when: float) -> float | None:
        ok = [s + t for s, status, _, t in self.results if status == 101 and s >= when]
        return min(ok) if ok else None


async def settle(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel what is still running and collect every outcome: a test that fails half-way
    leaves no task to fail later, in another test's logs."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Failover:
    """When things happened in a failover test (time.monotonic()), and what the streams and
    the idle sockets saw."""

    killed: float
    promoted: float
    revoked: float  # the revocation answered 200
    seen: float  # every idle socket got api_key_revoked and 1008
    late: list[float]  # each idle socket's delay after the 200
    ends: list[str]  # each stream's last event type


def report_failover(
    title: str,
    promotion: str,
    f: Failover,
    steady: Handshakes,
    *,
    handshake_ceiling: float,
) -> None:
    """Print the timeline and hold the failover to CONTRACT.md §4: every stream finished, each
    handshake served or refused with 503 without hanging, service within 10 s of the
    promotion, the revocation at every idle socket within a second."""
    first = steady.first_served_after(f.promoted)
    statuses: dict[tuple[int, str], int] = {}
    for _, status, code, _took in steady.results:
        statuses[status, code] = statuses.get((status, code), 0) + 1
    slowest = max(took for *_, took in steady.results)
    print(
        f"\n{title}:"
        f"\n  {promotion:<32} +{f.promoted - f.killed:.2f}"
        f"\n  first 101 after the promotion    +{(first or 0) - f.killed:.2f}"
        f" ({(first or 0) - f.promoted:.2f} after it)"
        f"\n  revocation answered 200          +{f.revoked - f.killed:.2f}"
        f"\n  revocation seen (1008) on A, B   +{f.seen - f.killed:.2f}"
        f" ({', '.join(f'{x * 1000:.0f} ms' for x in f.late)} after the 200)"
        f"\n  streams: {len(f.ends)} → {sorted(set(f.ends))}; handshakes {len(steady.results)}:"
        f" {statuses}; slowest {slowest:.2f} s"
    )
    assert f.ends == ["response.completed"] * len(f.ends)
    for _, status, code, took in steady.results:
        assert status == 101 or (status == 503 and code == "service_unavailable"), (status, code)
        assert took < handshake_ceiling, took
    assert first is not None and first - f.promoted < PROMOTION_TO_SERVICE
    assert all(x < 1.0 for x in f.late)


async def test_coordinated_failover_readonly_answers_become_503_then_service(
    gateway: Gateway,
    node_b: Gateway,
    tenant: Tenant,
    sentinel_topology: SentinelTopology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`SENTINEL FAILOVER`: the old primary stays up as a replica; pooled connections to it get
    READONLY (redis-py drops them and asks the Sentinels again)."""
    caplog.set_level(logging.WARNING)
    topology = sentinel_topology
    old = topology.master_port()
    assert old is not None
    for gw in (gateway, node_b):  # fill both pools with connections to the old primary
        await asyncio.gather(*(gw.store.version() for _ in range(32)))
    async with Handshakes([gateway, node_b], tenant.key, 20) as steady:
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await asyncio.to_thread(
            redis_command,
            "127.0.0.1", topology.sentinels[0].port, "SENTINEL", "FAILOVER", "mymaster",
        )  # fmt: skip
        promoted = await wait_promotion(topology, old)
        await admin_until_served(
            gateway, "POST", "/teams", {"id": "after-readonly", "allowed_models": ["openai/gpt-*"]}
        )
        await asyncio.sleep(1.0)
    first = steady.first_served_after(promoted)
    print(
        f"\nSENTINEL FAILOVER: promotion +{promoted - began:.2f} s; "
        f"handshakes {len(steady.results)}: "
        f"{sorted({(s, c) for _, s, c, _ in steady.results})}; "
        f"first 101 after promotion +{(first or 0) - promoted:.2f} s"
    )
    for _, status, code, took in steady.results:
        assert status == 101 or (status == 503 and code == "service_unavailable"), (status, code)
        assert took < 2.5
    assert first is not None and first - promoted < PROMOTION_TO_SERVICE
    async with socket(node_b, tenant.key) as ws:
        await assert_usable(ws)
    no_tracebacks(caplog)
    await asyncio.to_thread(topology.wait_healthy)  # the old primary now in sync as a replica


async def test_spend_survives_a_failover(
    gateway: Gateway, node_b: Gateway, sentinel_topology: SentinelTopology
) -> None:
    """A day budget of 4.5 responses: two spent through node A, `SENTINEL FAILOVER`, then node B
    serves until refused: five in all, as without the failover (the counters were replicated;
    a coordinated failover waits for the replica to catch up)."""
    import secrets
    from decimal import Decimal

    from test_spend import measured_cost, one_turn, set_limits, wait_for_limits, ws_of

    tenant = await make_tenant(gateway.store, team_id=f"failover-{secrets.token_hex(4)}")
    cost, _ = await measured_cost(gateway)
    cap = float(cost * Decimal("4.5"))
    await set_limits(tenant, usd_per_day_per_team=cap)
    for gw in (gateway, node_b):
        await wait_for_limits(gw, tenant.team.id, usd_per_day_per_team=cap)
    served = 0
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, tenant.key)
        for _ in range(2):
            assert (await one_turn(ws))["type"] == "response.completed"
            served += 1
        await ws.close()
        await gateway.node.spend.flush()
        old = sentinel_topology.master_port()
        assert old is not None
        await asyncio.to_thread(
            redis_command,
            "127.0.0.1",
            sentinel_topology.sentinels[0].port,
            "SENTINEL",
            "FAILOVER",
            "mymaster",
        )
        await wait_promotion(sentinel_topology, old)
        await admin_until_served(node_b, "GET", "/teams")
        ws = await ws_of(http, node_b, tenant.key)
        for _ in range(6):
            event = await one_turn(ws)
            if event["type"] == "error":
                assert event["error"]["code"] == "insufficient_quota", event
                break
            served += 1
        await ws.close()
    print(f"\nresponses before the refusal across a failover: {served} (cap 4.5 responses)")
    assert served == 5
    await asyncio.to_thread(sentinel_topology.wait_healthy)


STREAMS = 100
# About six seconds a response: the kill and the promotion happen mid-stream.
STREAM = {"sim_deltas": "60", "sim_delay_ms": "100"}


async def stream_one(
    stack: AsyncExitStack, gw: Gateway, key: str, ready: asyncio.Event, started: list[int]
) -> str:
    """Open a socket, start a long response, and return its terminal event's type."""
    ws = await stack.enter_async_context(socket(gw, key))
    await send(ws, create(metadata=STREAM))
    while (await recv(ws))["type"] != "response.output_text.delta":
        pass
    started.append(1)
    if len(started) == STREAMS:
        ready.set()
    events = await until_terminal(ws, timeout=15)
    return str(events[-1]["type"])


async def test_primary_killed_under_load(
    gateway: Gateway,
    node_b: Gateway,
    tenant: Tenant,
    sentinel_topology: SentinelTopology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    topology = sentinel_topology
    store = gateway.store
    steady_key = (await make_tenant(store, "steady")).key
    victim = await make_tenant(store, "victim")
    old = topology.master_port()
    assert old is not None
    async with AsyncExitStack() as stack:
        # Two idle sockets of a key to revoke after the promotion, one per node.
        idle = [await stack.enter_async_context(socket(gw, victim.key)) for gw in (gateway, node_b)]
        for ws in idle:
            await assert_usable(ws)
        ready, started = asyncio.Event(), list[int]()
        streams = [
            asyncio.create_task(
                stream_one(stack, (gateway, node_b)[i % 2], tenant.key, ready, started)
            )
            for i in range(STREAMS)
        ]
        stack.push_async_callback(settle, streams)
        await asyncio.wait_for(ready.wait(), 15)
        steady = await stack.enter_async_context(Handshakes([gateway, node_b], steady_key, 20))
        await asyncio.sleep(0.5)
        acked = await asyncio.to_thread(
            redis_command, "127.0.0.1", old, "WAIT", "1", "1000", timeout=3.0
        )
        assert acked == 1, "the replica is not in sync: it would never be promoted"
        t0 = time.monotonic()
        await asyncio.to_thread(topology.node_at(old).kill)
        promoted = await wait_promotion(topology, old)
        body = await admin_until_served(gateway, "POST", f"/keys/{victim.key_id}/revoke")
        revoked = time.monotonic()
        assert body["id"] == victim.key_id
        late = [
            x
            for x, _ in await asyncio.gather(
                *(expelled(ws, "api_key_revoked", 401, revoked) for ws in idle)
            )
        ]
        seen = time.monotonic()
        ends = await asyncio.gather(*streams)
    report_failover(
        f"failover timeline (s after SIGKILL of the primary :{old})",
        "promotion seen on the Sentinels",
        Failover(t0, promoted, revoked, seen, late, ends),
        steady,
        handshake_ceiling=2.5,
    )
    # Caps hold on the promoted primary: one socket per key, across both nodes.
    capped = await make_tenant(store, "capped", limits=Limits(sockets_per_key=1))
    async with socket(gateway, capped.key) as ws:
        await assert_usable(ws)
        async with aiohttp.ClientSession() as http:
            status, code, _ = await status_of(http, node_b, capped.key)
        assert (status, code) == (429, "too_many_connections")
    no_tracebacks(caplog)
