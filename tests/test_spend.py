"""Token and spend limits (CONTRACT.md §3 check 8, §4) and a team's spend (§5), over real sockets
with real Redis and Postgres and the simulator upstream.

The simulator echoes its input, so a turn with the same input always costs the same: each test
measures one turn's cost from its usage (the price of `make_tenant`) and sets limits from it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import (
    MODEL,
    Gateway,
    Sim,
    Tenant,
    create,
    eventually,
    gateway_settings,
    make_tenant,
    recv,
    send,
)
from services import RedisServer, fresh_redis_prefix
from test_ws_checks import assert_error

from app import spend
from app.keystore import KeyStore
from app.models import Limits
from app.server import create_app
from app.spend import Periods

PRICE = (Decimal("1.25"), Decimal("0.125"), Decimal("10"))  # make_tenant's, USD per Mtok
ADMIN = {"Authorization": "Bearer admin-test-token"}


@pytest.fixture
async def tenant(gateway: Gateway) -> Tenant:
    """A team id of its own: the ledger (the database) is shared by the tests of a run, and a
    rebuilt counter sums the team's rows of the period in it."""
    return await make_tenant(gateway.store, team_id=f"spend-{secrets.token_hex(4)}")


def cost_of(event: dict[str, Any]) -> Decimal:
    usage = event["response"]["usage"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    billed = (
        (usage["input_tokens"] - cached) * PRICE[0]
        + cached * PRICE[1]
        + usage["output_tokens"] * PRICE[2]
    )
    return Decimal(billed / Decimal(1_000_000))


def tokens_of(event: dict[str, Any]) -> int:
    usage = event["response"]["usage"]
    return int(usage["input_tokens"]) + int(usage["output_tokens"])


async def ws_of(http: aiohttp.ClientSession, node: Gateway, key: str) -> Any:
    return await http.ws_connect(
        node.url("/v1/responses"), headers={"Authorization": f"Bearer {key}"}
    )


async def one_turn(ws: Any, text: str = "spend") -> dict[str, Any]:
    """The turn's last event: its terminal event, or the error that refused it."""
    await send(ws, create(input=[{"role": "user", "content": text}]))
    while True:
        event = await recv(ws)
        if event["type"] in ("response.completed", "response.failed", "error"):
            return event


async def measured_cost(gateway: Gateway) -> tuple[Decimal, int]:
    """One turn's cost and tokens, on a team of its own (no limits)."""
    probe = await make_tenant(gateway.store, team_id=f"probe-{secrets.token_hex(4)}")
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, probe.key)
        event = await one_turn(ws)
        await ws.close()
    assert event["type"] == "response.completed", event
    return cost_of(event), tokens_of(event)


async def set_limits(tenant: Tenant, **limits: Any) -> None:
    await tenant.store.put_team(tenant.team.model_copy(update={"limits": Limits(**limits)}))


async def wait_for_limits(node: Gateway, team_id: str, **limits: Any) -> None:
    def seen() -> bool:
        team = node.node.view.view.teams.get(team_id)
        return team is not None and team.limits == Limits(**limits)

    await eventually(seen)


async def ledger_spend(database_url: str, team_id: str) -> Decimal:
    conn = await asyncpg.connect(database_url)
    try:
        total = await conn.fetchval(
            "SELECT COALESCE(SUM(cost_usd), 0) FROM turns WHERE team_id = $1 AND accepted",
            team_id,
        )
    finally:
        await conn.close()
    return Decimal(total)


async def spend_of(node: Gateway, team_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(node.url(f"/admin/v1/teams/{team_id}/spend"), headers=ADMIN) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body


def day_end() -> str:
    return Periods.at(datetime.now(UTC)).day_end.isoformat().replace("+00:00", "Z")


# -- enforcement across nodes --------------------------------------------------------------------


async def test_a_team_day_budget_holds_across_two_nodes(
    gateway: Gateway, node_b: Gateway, tenant: Tenant, database_url: str
) -> None:
    """A budget just above one response's cost. One node alone would serve two responses (at 0
    and at one cost spent); with a socket on each node turning at once, the overshoot is at most
    the other node's response in flight: three at most (counters kept per node would give four).
    Then `insufficient_quota` on both, naming the limit and the day's end; the sockets stay
    open."""
    cost, _ = await measured_cost(gateway)
    cap = float(cost * Decimal("1.05"))
    await set_limits(tenant, usd_per_day_per_team=cap)
    for node in (gateway, node_b):
        await wait_for_limits(node, tenant.team.id, usd_per_day_per_team=cap)
    async with aiohttp.ClientSession() as http:
        a = await ws_of(http, gateway, tenant.key)
        b = await ws_of(http, node_b, tenant.key)
        # Both nodes at once, each socket turn after turn until refused.
        served: dict[str, int] = {"a": 0, "b": 0}
        refusals: dict[str, dict[str, Any]] = {}

        async def loop(name: str, ws: Any) -> None:
            for _ in range(10):
                event = await one_turn(ws)
                if event["type"] == "error":
                    refusals[name] = event
                    return
                assert event["type"] == "response.completed", event
                served[name] += 1

        await asyncio.gather(loop("a", a), loop("b", b))
        print(f"responses served before the refusals: {served}, cap ${cap:.6f}, cost ${cost}")
        assert 2 <= served["a"] + served["b"] <= 3, served
        assert set(refusals) == {"a", "b"}
        for event in refusals.values():
            assert_error(event, "insufficient_quota", 429, etype="insufficient_quota")
            message = event["error"]["message"]
            assert "usd_per_day_per_team" in message and day_end() in message, message
        # The sockets stay open: the next turn is refused the same way, on both.
        for ws in (a, b):
            assert_error(await one_turn(ws), "insufficient_quota", 429, etype="insufficient_quota")
            assert not ws.closed
        await a.close()
        await b.close()

        # POST /v1/responses: the same refusal in the HTTP shape, on either node.
        for node in (gateway, node_b):
            async with http.post(
                node.url("/v1/responses"),
                headers={"Authorization": f"Bearer {tenant.key}"},
                json={"model": MODEL, "input": "hi", "stream": True},
            ) as r:
                assert r.status == 429
                error = (await r.json())["error"]
                assert (error["type"], error["code"]) == ("insufficient_quota",) * 2
                assert "usd_per_day_per_team" in error["message"]

    # The refused turns are in the ledger as refusals, and cost nothing.
    await gateway.node.ledger.flushed()
    await node_b.node.ledger.flushed()
    spent = await ledger_spend(database_url, tenant.team.id)
    assert spent == cost * (served["a"] + served["b"])


async def test_a_month_budget_and_a_key_day_budget_refuse_too(
    gateway: Gateway, tenant: Tenant
) -> None:
    cost, _ = await measured_cost(gateway)
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, tenant.key)
        cap = float(cost * Decimal("2.5"))  # three responses: 0, 1 and 2 costs are under it
        await set_limits(tenant, usd_per_month_per_team=cap)
        await wait_for_limits(gateway, tenant.team.id, usd_per_month_per_team=cap)
        events = [await one_turn(ws) for _ in range(4)]
        kinds = [e["type"] for e in events]
        assert kinds == ["response.completed"] * 3 + ["error"], [e.get("error") for e in events]

        # A second key of the same team: the team's month is spent for it too.
        _other, secret = await tenant.store.create_key(tenant.team.id, name="other")
        ws2 = await ws_of(http, gateway, secret)
        event = await one_turn(ws2)
        assert_error(event, "insufficient_quota", 429, etype="insufficient_quota")
        assert "usd_per_month_per_team" in event["error"]["message"]
        month_end = Periods.at(datetime.now(UTC)).month_end
        assert month_end.isoformat().replace("+00:00", "Z") in event["error"]["message"]

        # The key's own day: the second key has spent nothing, the first three responses.
        key_cap = float(cost * Decimal("0.5"))
        await set_limits(tenant, usd_per_day_per_key=key_cap)
        await wait_for_limits(gateway, tenant.team.id, usd_per_day_per_key=key_cap)
        event = await one_turn(ws)
        assert_error(event, "insufficient_quota", 429, etype="insufficient_quota")
        assert "This key" in event["error"]["message"]
        assert "usd_per_day_per_key" in event["error"]["message"]
        assert (await one_turn(ws2))["type"] == "response.completed"
        assert (await one_turn(ws2))["type"] == "error"
        await ws.close()
        await ws2.close()


async def test_a_node_s_counts_ride_in_front_of_its_next_judgment(
    gateway: Gateway, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished response's count goes to Redis in front of the node's next judgment, not only
    after COUNT_WAIT_SECONDS: with the wait a minute long, a budget of 1.5 responses still
    serves two and refuses the third (counts that waited for their timer would serve three)."""
    monkeypatch.setattr(spend, "COUNT_WAIT_SECONDS", 60.0)
    cost, _ = await measured_cost(gateway)
    cap = float(cost * Decimal("1.5"))
    await set_limits(tenant, usd_per_day_per_team=cap)
    await wait_for_limits(gateway, tenant.team.id, usd_per_day_per_team=cap)
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, tenant.key)
        events = [await one_turn(ws) for _ in range(3)]
        await ws.close()
    kinds = [e["type"] for e in events]
    assert kinds == ["response.completed"] * 2 + ["error"], [e.get("error") for e in events]
    assert_error(events[2], "insufficient_quota", 429, etype="insufficient_quota")


async def test_tokens_per_minute_refuse_with_rate_limit_exceeded(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    _, tokens = await measured_cost(gateway)
    await set_limits(tenant, tokens_per_minute_per_key=tokens + 1)
    for node in (gateway, node_b):
        await wait_for_limits(node, tenant.team.id, tokens_per_minute_per_key=tokens + 1)
    async with aiohttp.ClientSession() as http:
        a = await ws_of(http, gateway, tenant.key)
        b = await ws_of(http, node_b, tenant.key)
        assert (await one_turn(a))["type"] == "response.completed"
        assert (await one_turn(a))["type"] == "response.completed"  # tokens+1 > one turn's
        window = tenant.store.token_window(tenant.key_id)

        async def counted() -> bool:
            return sum(int(v) for v in (await tenant.store.redis.hgetall(window)).values()) == (
                2 * tokens
            )

        await eventually(counted)
        for ws in (a, b):  # 2 × tokens now, over the limit: refused on either node
            event = await one_turn(ws)
            assert_error(event, "rate_limit_exceeded", 429)
            assert "tokens_per_minute_per_key" in event["error"]["message"]
            assert f"{2 * tokens} tokens" in event["error"]["message"]
        await a.close()
        await b.close()


async def test_limits_are_validated(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        for limits, param in (
            ({"usd_per_day_per_team": -1}, "limits.usd_per_day_per_team"),
            ({"usd_per_day_per_key": True}, "limits.usd_per_day_per_key"),
            ({"usd_per_month_per_team": "lots"}, "limits.usd_per_month_per_team"),
            ({"tokens_per_minute_per_key": 1.5}, "limits.tokens_per_minute_per_key"),
            ({"usd_per_year_per_team": 5}, "limits.usd_per_year_per_team"),
        ):
            body = {"id": "v", "allowed_models": ["openai/*"], "limits": limits}
            async with http.post(gateway.url("/admin/v1/teams"), headers=ADMIN, json=body) as r:
                assert r.status == 400, (limits, await r.text())
                assert (await r.json())["error"]["param"] == param
        body = {
            "id": "v",
            "allowed_models": ["openai/*"],
            "limits": {"usd_per_day_per_team": 2.0000004},
        }
        async with http.post(gateway.url("/admin/v1/teams"), headers=ADMIN, json=body) as r:
            assert r.status == 201
            assert (await r.json())["limits"]["usd_per_day_per_team"] == 2.0  # micro-dollars


# -- money survives Redis -------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


async def restart_without_counters(store: KeyStore, redis: RedisServer) -> int:
    """Redis restarts and comes back from a snapshot that holds the key store (teams, keys,
    prices) but none of the spend counters: they are deleted, the snapshot taken (SAVE), the
    server stopped and started again on the same port (it loads the snapshot). Returns how many
    counters were lost."""
    names = [n async for n in store.redis.scan_iter(match=f"{store.prefix}:*:spend:*")]
    if names:
        await store.redis.delete(*names)
    await store.redis.save()
    await asyncio.to_thread(redis.stop)
    await asyncio.to_thread(redis.start)
    return len(names)


@pytest.mark.parametrize("unwritten", [False, True], ids=["ledger-written", "rows-unwritten"])
async def test_a_redis_restart_does_not_reset_spend(
    aiohttp_server: Any,
    own_redis: RedisServer,
    database_url: str,
    sim: Sim,
    tmp_path: Path,
    unwritten: bool,
) -> None:
    """Part of a budget spent, Redis restarted without the counters, the rest spent: refused at
    the same response as without the restart. `rows-unwritten`: the ledger could not write the
    first turns' rows (a session holds `turns` in EXCLUSIVE mode: reads pass, inserts wait), so
    the rebuild finds them in this node's memory or spill files, not in Postgres."""

    async def run(restart: bool) -> tuple[int, int]:
        settings = gateway_settings(  # one server of its own, whatever the suite's topology
            own_redis.url,
            fresh_redis_prefix(),
            database_url,
            sim.base_url,
            tmp_path / "s",
            GATEWAY_REDIS_CLUSTER=False,
            GATEWAY_REDIS_SENTINELS="",
        )
        app = create_app(settings)
        node = Gateway(await aiohttp_server(app), app)
        tenant = await make_tenant(node.store, team_id=f"restart-{secrets.token_hex(4)}")
        cost, _ = await measured_cost(node)
        cap = float(cost * Decimal("4.5"))  # five responses: at 0, 1, 2, 3 and 4 costs spent
        both = {"usd_per_day_per_team": cap, "usd_per_day_per_key": cap}
        await set_limits(tenant, **both)
        await wait_for_limits(node, tenant.team.id, **both)
        lost, served = 0, 0
        lock = await asyncpg.connect(database_url)
        try:
            if unwritten and restart:
                await lock.execute("BEGIN; LOCK TABLE turns IN EXCLUSIVE MODE")
            async with aiohttp.ClientSession() as http:
                ws = await ws_of(http, node, tenant.key)
                for i in range(8):
                    if i == 2 and restart:
                        await node.node.spend.flush()
                        if not unwritten:
                            assert await node.node.ledger.flushed()
                        else:
                            assert node.node.ledger.pending_rows >= 2
                        lost = await restart_without_counters(node.store, own_redis)
                    event = await one_turn(ws)
                    if event["type"] == "error":
                        assert_error(event, "insufficient_quota", 429, etype="insufficient_quota")
                        break
                    served += 1
                await ws.close()
        finally:
            await lock.close()
        return served, lost

    plain, _ = await run(restart=False)
    restarted, lost = await run(restart=True)
    print(
        f"responses before the refusal: {plain} without a restart, {restarted} with one "
        f"({lost} counters lost)"
    )
    assert plain == 5
    assert lost == 2  # the team's day and the key's day (no month limit: no month counter)
    assert restarted == plain


async def test_spend_matches_the_ledger_to_the_micro_dollar(
    gateway: Gateway, node_b: Gateway, tenant: Tenant, database_url: str
) -> None:
    """`GET …/spend` on either node agrees with the ledger's sum, before and after its counters
    are lost (then rebuilt from the ledger)."""
    await set_limits(tenant, usd_per_day_per_team=1000.0, usd_per_month_per_team=5000.0)
    await wait_for_limits(
        gateway, tenant.team.id, usd_per_day_per_team=1000.0, usd_per_month_per_team=5000.0
    )
    # Sixteen sockets on each node at once, five turns each, of different sizes, each turn
    # started together: the counters take concurrent increments from both nodes (a
    # read-then-write would lose some).
    sockets = [gateway, node_b] * 16
    async with aiohttp.ClientSession() as http:
        conns = [await ws_of(http, node, tenant.key) for node in sockets]
        for j in range(5):
            events = await asyncio.gather(
                *(one_turn(ws, "word " * (i * 7 + j * 13 + 1)) for i, ws in enumerate(conns))
            )
            assert all(e["type"] == "response.completed" for e in events), events
        for ws in conns:
            await ws.close()
    for node in (gateway, node_b):
        await node.node.spend.flush()
        await node.node.ledger.flushed()
    ledger = await ledger_spend(database_url, tenant.team.id)
    expected = float(ledger.quantize(Decimal("0.000001")))
    for node in (gateway, node_b):
        body = await spend_of(node, tenant.team.id)
        assert body["object"] == "team.spend" and body["team_id"] == tenant.team.id
        assert body["day"]["usd"] == expected, (body, ledger)
        assert body["month"]["usd"] == expected
        assert body["day"]["limit"] == 1000.0 and body["month"]["limit"] == 5000.0
        assert body["day"]["end"] == day_end()
        [key] = body["keys"]
        assert key["id"] == tenant.key_id and key["day"]["usd"] == expected
        assert key["day"]["limit"] is None
    # Lost counters: rebuilt from the ledger, to the same figures.
    names = [
        n async for n in gateway.store.redis.scan_iter(match=f"{gateway.store.prefix}:*:spend:*")
    ]
    assert len(names) == 3
    await gateway.store.redis.delete(*names)
    body = await spend_of(node_b, tenant.team.id)
    assert (body["day"]["usd"], body["month"]["usd"]) == (expected, expected)
    print(f"ledger ${ledger}, endpoint ${body['day']['usd']}")


async def test_a_missing_counter_with_postgres_away_fails_open(
    aiohttp_server: Any, redis_url: str, redis_prefix: str, sim: Sim, tmp_path: Path
) -> None:
    """The documented choice: the turn is served and the failure counted."""
    from app import metrics

    settings = gateway_settings(
        redis_url,
        redis_prefix,
        "postgresql://postgres@127.0.0.1:1/none",
        sim.base_url,
        tmp_path / "spill",
    )
    app = create_app(settings)
    node = Gateway(await aiohttp_server(app), app)
    tenant = await make_tenant(node.store, limits=Limits(usd_per_day_per_team=0.000001))
    await wait_for_limits(node, tenant.team.id, usd_per_day_per_team=0.000001)
    before = metrics.SPEND_REBUILDS_TOTAL.labels(outcome="failed")._value.get()
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, node, tenant.key)
        started = asyncio.get_running_loop().time()
        for _ in range(3):
            assert (await one_turn(ws))["type"] == "response.completed"
        took = asyncio.get_running_loop().time() - started
        await ws.close()
    after = metrics.SPEND_REBUILDS_TOTAL.labels(outcome="failed")._value.get()
    # One attempt: the turns after it, within REBUILD_RETRY_SECONDS, fail open without one.
    assert after - before == 1
    print(f"three turns with the ledger away: {took:.2f} s")


# -- real clients ---------------------------------------------------------------------------------


async def exhausted(gateway: Gateway, tenant: Tenant) -> None:
    """The team's day budget spent: one response, then a limit below its cost."""
    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, tenant.key)
        assert (await one_turn(ws))["type"] == "response.completed"
        await ws.close()
    await set_limits(tenant, usd_per_day_per_team=0.000001)
    await wait_for_limits(gateway, tenant.team.id, usd_per_day_per_team=0.000001)


def refusals() -> float:
    from app import metrics

    value: float = metrics.ERRORS_TOTAL.labels(code="insufficient_quota")._value.get()
    return value


async def test_openai_python_sees_a_quota_error_and_does_not_retry(
    gateway: Gateway, tenant: Tenant
) -> None:
    """openai-python 2.x: over the WebSocket (`responses.connect()`) the refusal is an `error`
    event with OpenAI's code and type; over `POST /v1/responses` a `RateLimitError` with code
    `insufficient_quota`, after one request (it retries other 429s twice by default; the
    gateway's `x-should-retry: false` stops it)."""
    import openai
    from openai import AsyncOpenAI

    await exhausted(gateway, tenant)
    client = AsyncOpenAI(base_url=gateway.url("/v1"), api_key=tenant.key)  # max_retries=2
    before = refusals()
    async with client.responses.connect() as conn:
        await conn.response.create(model=MODEL, input="hello", store=False)
        event = await conn.recv()
        assert event.type == "error"
        assert (event.status, event.error.code, event.error.type) == (
            429,
            "insufficient_quota",
            "insufficient_quota",
        )
        print(f"openai-python over the WebSocket: {event.error.code}: {event.error.message}")
    assert refusals() - before == 1

    before = refusals()
    with pytest.raises(openai.RateLimitError) as caught:
        await client.responses.create(model=MODEL, input="hello")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert 0 < int(caught.value.response.headers["retry-after"]) <= 86_401
    print(f"openai-python over POST: {type(caught.value).__name__}: {caught.value}")
    assert refusals() - before == 1  # one request: no retry
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model=MODEL, input="hello", stream=True)
    assert refusals() - before == 2


async def test_counters_are_kept_only_while_a_team_has_a_spend_limit(
    gateway: Gateway, tenant: Tenant, database_url: str
) -> None:
    """A team without limits costs Redis no counter; one that gains a spend limit gets its
    counters rebuilt from the ledger, not read as they were when it last had one."""
    cost, _ = await measured_cost(gateway)
    pattern = f"{gateway.store.prefix}:*{tenant.key_id}*"

    async def counters() -> list[bytes]:
        found = [n async for n in gateway.store.redis.scan_iter(match=f"{gateway.store.prefix}:*")]
        return [n for n in found if b":spend:" in n or n.endswith(b":tpm")]

    async with aiohttp.ClientSession() as http:
        ws = await ws_of(http, gateway, tenant.key)
        for _ in range(2):  # no limits: nothing counted
            assert (await one_turn(ws))["type"] == "response.completed"
        await gateway.node.spend.flush()
        assert await counters() == [], pattern

        await set_limits(tenant, usd_per_day_per_team=1000.0)
        await wait_for_limits(gateway, tenant.team.id, usd_per_day_per_team=1000.0)
        assert (await one_turn(ws))["type"] == "response.completed"  # rebuilt: 2 costs, then 3
        await gateway.node.spend.flush()
        assert len(await counters()) == 1  # the team's day (no month or key limit)

        await set_limits(tenant)  # the limit removed: two more turns, not counted
        await wait_for_limits(gateway, tenant.team.id)
        for _ in range(2):
            assert (await one_turn(ws))["type"] == "response.completed"
        await gateway.node.spend.flush()

        # 5 costs spent; a limit of 5.5: one more response, then refused. The counter left from
        # before says 3: read as it was, it would let three more through.
        cap = float(cost * Decimal("5.5"))
        await set_limits(tenant, usd_per_day_per_team=cap)
        await wait_for_limits(gateway, tenant.team.id, usd_per_day_per_team=cap)

        async def dropped() -> bool:
            return await counters() == []

        await eventually(dropped)
        kinds = [(await one_turn(ws))["type"] for _ in range(3)]
        await ws.close()
    assert kinds == ["response.completed", "error", "error"], kinds
    await gateway.node.ledger.flushed()
    assert await ledger_spend(database_url, tenant.team.id) == cost * 6
