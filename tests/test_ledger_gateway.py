"""The ledger as the gateway writes it: real turns through real sockets, then the rows in Postgres;
a Postgres outage in the middle of a stream of turns; a node stopped with rows journaled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import (
    MODEL,
    Connect,
    Gateway,
    Sim,
    Tenant,
    eventually,
    gateway_settings,
    make_tenant,
    recv,
    send,
    turn,
)
from services import PostgresServer, fresh_database_name, run_blocking

from app.ledger import migrate
from app.node import NODE
from app.server import create_app


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def expected_cost(usage: dict[str, Any]) -> Decimal:
    """The tenant's prices: 1.25 input, 0.125 cached input, 10 output (USD per million)."""
    cached = int(usage["input_tokens_details"]["cached_tokens"])
    return (
        (int(usage["input_tokens"]) - cached) * Decimal("1.25")
        + cached * Decimal("0.125")
        + int(usage["output_tokens"]) * Decimal("10")
    ) / Decimal(1_000_000)


async def test_turns_socket_and_codes_are_recorded(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        first = await turn(ws, input=[{"role": "user", "content": "one two three"}])
        r1 = first[-1]["response"]
        await send(ws, {"type": "response.create", "model": "gpt-test"})
        assert (await recv(ws))["error"]["code"] == "invalid_response_create"
        second = await turn(
            ws, input=[{"role": "user", "content": "four"}], previous_response_id=r1["id"]
        )
        r2 = second[-1]["response"]
        broken = await turn(ws, metadata={"sim_fault": "close_1011"})
        assert broken[-1]["error"]["code"] == "upstream_websocket_closed"
    assert await gateway.node.ledger.flushed(10)
    sockets = await fetch(database_url, "SELECT * FROM sockets WHERE key_id = $1", tenant.key_id)
    assert len(sockets) == 1
    sock = sockets[0]
    assert sock["closed_by"] == "client" and sock["close_code"] == 1000
    assert sock["turns"] == 3 and sock["model"] == MODEL and sock["team_id"] == "acme"
    assert sock["upstream_close_code"] == 1011  # the last upstream socket: the fault's close
    assert sock["closed_at"] >= sock["opened_at"]
    rows = await fetch(
        database_url,
        "SELECT * FROM turns WHERE socket_id = $1 ORDER BY received_at",
        sock["socket_id"],
    )
    assert [(r["accepted"], r["error_code"], r["status"]) for r in rows] == [
        (True, None, "completed"),
        (False, "invalid_response_create", None),
        (True, None, "completed"),
        (True, None, "error"),
    ]
    for row, response in ((rows[0], r1), (rows[2], r2)):
        usage = response["usage"]
        assert row["response_id"] == response["id"]
        assert row["input_tokens"] == usage["input_tokens"]
        assert row["cached_tokens"] == usage["input_tokens_details"]["cached_tokens"]
        assert row["output_tokens"] == usage["output_tokens"]
        assert row["reasoning_tokens"] == usage["output_tokens_details"]["reasoning_tokens"]
        assert row["cost_usd"] == expected_cost(usage)
        assert row["ttfe_ms"] > 0 and row["duration_ms"] >= row["ttfe_ms"]
        assert row["retried"] is False and row["http_fallback"] is False
    assert rows[2]["previous_response_id"] == r1["id"]
    assert rows[2]["cached_tokens"] > 0


async def test_retry_and_fallback_are_flagged(
    gateway: Gateway, connect: Connect, database_url: str
) -> None:
    async with connect() as ws:
        r1 = (await turn(ws))[-1]["response"]["id"]
        retried = await turn(ws, previous_response_id=r1, metadata={"sim_fault": "forget"})
        fallback = await turn(ws, temperature=0.5)
    assert await gateway.node.ledger.flushed(10)
    rows = await fetch(
        database_url,
        "SELECT response_id, retried, http_fallback FROM turns WHERE response_id = ANY($1)",
        [retried[-1]["response"]["id"], fallback[-1]["response"]["id"]],
    )
    assert sorted((r["retried"], r["http_fallback"]) for r in rows) == [
        (False, True),
        (True, False),
    ]


# -- the time to first event: the histogram agrees with the ledger -------------------------------


async def ttfe_histogram(gateway: Gateway) -> tuple[float, float]:
    """`gateway_time_to_first_event_seconds`: (count, sum), from the real `/metrics`."""
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url("/metrics")) as resp:
            text = await resp.text()
    values = dict(
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith("gateway_time_to_first_event_seconds_")
    )
    return (
        float(values["gateway_time_to_first_event_seconds_count"]),
        float(values["gateway_time_to_first_event_seconds_sum"]),
    )


async def post_json(gateway: Gateway, tenant: Tenant) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url("/v1/responses"),
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={"model": MODEL, "input": "hello"},
        ) as resp:
            assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    "first",
    [
        "error",  # the upstream's previous_response_not_found, nothing remembered to retry with
        "response.failed",  # a terminal event before any other
        "http_json",  # POST /v1/responses without stream: one answer, its first byte
        "response.created",  # the usual turn, for comparison
    ],
)
async def test_every_turn_with_a_ttfe_observes_the_histogram_once(
    gateway: Gateway, tenant: Tenant, connect: Connect, database_url: str, first: str
) -> None:
    before = await ttfe_histogram(gateway)
    if first == "http_json":
        await post_json(gateway, tenant)
    else:
        choices: dict[str, dict[str, Any]] = {
            "error": {"previous_response_id": "resp_unknown"},
            "response.failed": {
                "metadata": {"sim_fault": "response_failed", "sim_fault_after": "0"}
            },
            "response.created": {},
        }
        fields = choices[first]
        async with connect() as ws:
            events = await turn(ws, **fields)
        assert events[0]["type"] == first, events
    after = await ttfe_histogram(gateway)
    assert await gateway.node.ledger.flushed(10)
    (row,) = await fetch(database_url, "SELECT ttfe_ms FROM turns WHERE key_id = $1", tenant.key_id)
    assert row["ttfe_ms"] is not None and row["ttfe_ms"] > 0
    assert after[0] == before[0] + 1, (before, after)
    assert after[1] - before[1] == pytest.approx(row["ttfe_ms"] / 1000, abs=1e-6)


# -- Postgres outages ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def outage_db(pg_server: PostgresServer) -> str:
    pg_server.start()
    url = pg_server.dsn_for(fresh_database_name())
    run_blocking(migrate(url))
    return url


async def _node(
    aiohttp_server: Any, redis_url: str, prefix: str, db: str, sim: Sim, spill: Path
) -> Gateway:
    settings = gateway_settings(redis_url, prefix, db, sim.base_url, spill)
    app = create_app(settings)
    return Gateway(await aiohttp_server(app), app)


async def _turns(gateway: Gateway, key: str, n: int) -> list[str]:
    """n sockets with one turn each; the response ids the customers saw (never an error)."""
    ids = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            ws = await http.ws_connect(
                gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {key}"}
            )
            events = await turn(ws)
            assert events[-1]["type"] == "response.completed", events[-1]
            ids.append(events[-1]["response"]["id"])
            await ws.close()
    return ids


async def test_postgres_outage_mid_stream_loses_nothing(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    pg_server: PostgresServer,
    outage_db: str,
) -> None:
    gw = await _node(aiohttp_server, redis_url, redis_prefix, outage_db, sim, tmp_path / "spill")
    tenant = await make_tenant(gw.store)
    ids = await _turns(gw, tenant.key, 5)
    await asyncio.to_thread(pg_server.stop)
    ids += await _turns(gw, tenant.key, 10)  # customers see no error while Postgres is away
    assert gw.app[NODE].ledger.pending_rows > 0
    await asyncio.to_thread(pg_server.start)
    assert await gw.app[NODE].ledger.flushed(30)
    rows = await fetch(outage_db, "SELECT response_id FROM turns")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)  # each exactly once
    sockets = await fetch(
        outage_db, "SELECT count(*) AS n FROM sockets WHERE closed_at IS NOT NULL"
    )
    assert sockets[0]["n"] == 15


async def test_rows_journaled_at_shutdown_are_written_after_restart(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    pg_server: PostgresServer,
    outage_db: str,
) -> None:
    spill = tmp_path / "spill"
    gw = await _node(aiohttp_server, redis_url, redis_prefix, outage_db, sim, spill)
    tenant = await make_tenant(gw.store)
    await asyncio.to_thread(pg_server.stop)
    ids = await _turns(gw, tenant.key, 4)
    await gw.server.close()  # graceful stop: rows go to the spill dir
    assert any(p.is_file() and p.stat().st_size for p in spill.rglob("*"))
    await asyncio.to_thread(pg_server.start)
    again = await _node(aiohttp_server, redis_url, redis_prefix, outage_db, sim, spill)
    assert await again.app[NODE].ledger.flushed(30)
    rows = await fetch(outage_db, "SELECT response_id FROM turns")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)


async def test_a_primary_restarted_under_load_loses_no_turn_and_doubles_none(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    pg_server: PostgresServer,
    outage_db: str,
) -> None:
    """Three clients keep running turns while Postgres stops (fast shutdown, so a batch may be
    cut mid-write) and starts again: one `turns` row per response a client saw, none twice.
    The phases are counted in turns seen, not timed."""
    gw = await _node(aiohttp_server, redis_url, redis_prefix, outage_db, sim, tmp_path / "spill")
    tenant = await make_tenant(gw.store)
    seen: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            seen.extend(await _turns(gw, tenant.key, 1))

    async def until(count: int) -> None:
        await eventually(lambda: len(seen) >= count, timeout=60)

    clients = [asyncio.create_task(client()) for _ in range(3)]
    try:
        await until(10)
        before = len(seen)
        await asyncio.to_thread(pg_server.stop)
        await until(before + 10)
        during = len(seen)
        await asyncio.to_thread(pg_server.start)
        await until(during + 10)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert await gw.app[NODE].ledger.flushed(30)
    rows = await fetch(outage_db, "SELECT response_id, count(*) AS n FROM turns GROUP BY 1")
    print(
        f"\n{len(seen)} turns ({before} before the stop, {during - before} with Postgres "
        f"stopped, {len(seen) - during} from the start on): {len(rows)} response ids in turns, "
        f"most rows for one: {max(r['n'] for r in rows)}"
    )
    assert sorted(r["response_id"] for r in rows) == sorted(seen)
    assert all(r["n"] == 1 for r in rows)
