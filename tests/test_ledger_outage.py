"""The ledger across Postgres outages and node restarts, on a throwaway server we stop and start.

The server is services.PostgresServer (initdb in a temp dir, its own port): never the machine's
own Postgres. A trigger in the test database logs the order in which socket halves arrive, so
the tests see the order the writer kept, not just the final rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from conftest import eventually
from services import PostgresServer, fresh_database_name, run_blocking

from app.ledger import AdminAction, Ledger, SocketClosed, SocketOpened, TurnRecord, migrate
from app.ledger.rows import Row
from app.metrics import REGISTRY

ARRIVALS = """
CREATE TABLE arrivals (n bigserial PRIMARY KEY, socket_id text NOT NULL, half text NOT NULL);
CREATE FUNCTION note_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO arrivals (socket_id, half)
        VALUES (NEW.socket_id, CASE WHEN NEW.open_row_id IS NOT NULL THEN 'open' ELSE 'close' END);
    ELSIF NEW.close_row_id IS DISTINCT FROM OLD.close_row_id THEN
        INSERT INTO arrivals (socket_id, half) VALUES (NEW.socket_id, 'close');
    ELSIF NEW.open_row_id IS DISTINCT FROM OLD.open_row_id THEN
        INSERT INTO arrivals (socket_id, half) VALUES (NEW.socket_id, 'open');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER note_arrival AFTER INSERT OR UPDATE ON sockets
    FOR EACH ROW EXECUTE FUNCTION note_arrival();
"""


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def database_url(server: PostgresServer) -> str:
    server.start()  # a failed test may have left it stopped
    url = server.dsn_for(fresh_database_name())
    run_blocking(migrate(url))  # creates the database
    run_blocking(_execute(url, ARRIVALS))
    return url


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def conversation(socket_id: str, turns: int) -> list[Row]:
    """What one socket leaves in the ledger: its open, its turns, its close."""
    now = datetime.now(UTC)
    rows: list[Row] = [
        SocketOpened(
            socket_id=socket_id,
            node="node-a",
            key_id="key-1",
            key_prefix="gw_abc",
            team_id="acme",
            model=None,
            opened_at=now,
        )
    ]
    for i in range(turns):
        rows.append(
            TurnRecord(
                socket_id=socket_id,
                node="node-a",
                key_id="key-1",
                key_prefix="gw_abc",
                team_id="acme",
                transport="ws",
                model="openai/gpt-5",
                received_at=now + timedelta(milliseconds=i),
                accepted=True,
                response_id=f"resp_{socket_id}_{i}",
                status="completed",
                input_tokens=10,
                cached_tokens=0,
                output_tokens=5,
                reasoning_tokens=0,
                cost_usd=Decimal("0.0001"),
            )
        )
    rows.append(
        SocketClosed(
            socket_id=socket_id,
            closed_at=now + timedelta(seconds=1),
            closed_by="client",
            close_code=1000,
            close_reason="",
            turns=turns,
            model="openai/gpt-5",
            opened_at=now,
        )
    )
    return rows


async def check_written_once(url: str, sockets: list[str], turns: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM sockets") == len(sockets)
        assert await conn.fetchval("SELECT count(*) FROM turns") == len(sockets) * turns
        assert await conn.fetchval("SELECT count(*) FROM sockets WHERE closed_at IS NULL") == 0
        halves = await conn.fetch("SELECT socket_id, half FROM arrivals ORDER BY n")
    finally:
        await conn.close()
    seen: dict[str, list[str]] = {}
    for row in halves:
        seen.setdefault(row["socket_id"], []).append(row["half"])
    # Each half arrived once, and every open before its close.
    assert seen == {socket_id: ["open", "close"] for socket_id in sockets}


def segments(spill: Path) -> list[Path]:
    return sorted(spill.glob("*/*.jsonl"))


async def test_an_outage_loses_nothing_and_writes_nothing_twice(
    server: PostgresServer, database_url: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    ledger = Ledger(
        database_url,
        spill,
        memory_rows=50,
        batch_size=20,
        flush_interval=0.02,
        connect_timeout=1.0,
        command_timeout=2.0,
    )
    await ledger.start()
    assert ledger.postgres_up and metric("gateway_postgres_up") == 1
    before = [f"up-{i}" for i in range(10)]
    for socket_id in before:
        for row in conversation(socket_id, turns=2):
            ledger.record(row)
    assert await ledger.flushed()
    failures = metric("gateway_ledger_write_failures_total")
    gauge = metric("gateway_ledger_pending_rows")

    await asyncio.to_thread(server.stop)
    during = [f"down-{i}" for i in range(100)]
    slowest = 0.0
    recorded = 0
    for socket_id in during:
        for row in conversation(socket_id, turns=2):
            started = time.perf_counter()
            ledger.record(row)
            slowest = max(slowest, time.perf_counter() - started)
            recorded += 1
        await asyncio.sleep(0)  # sessions yield between frames; so does this one
    # Far below any connect or write timeout: record() never waits for Postgres. (Not tighter:
    # one call may absorb a garbage collection pause on a busy machine.)
    assert slowest < 0.05, f"record() took {slowest * 1000:.1f} ms during the outage"
    assert ledger.pending_rows == recorded
    await eventually(lambda: metric("gateway_ledger_pending_rows") == gauge + recorded, timeout=10)
    # Over the memory bound (50): the oldest rows are in fsynced spill files.
    await eventually(
        lambda: len(segments(spill)) > 0 and ledger.pending_rows == recorded, timeout=10
    )
    await eventually(lambda: not ledger.postgres_up, timeout=10)
    await eventually(lambda: metric("gateway_ledger_write_failures_total") > failures, timeout=10)
    assert metric("gateway_postgres_up") == 0

    await asyncio.to_thread(server.start)
    assert await ledger.flushed(timeout=20)
    assert ledger.pending_rows == 0 and ledger.postgres_up
    await eventually(lambda: metric("gateway_ledger_pending_rows") == gauge, timeout=10)
    assert segments(spill) == []
    await check_written_once(database_url, before + during, turns=2)
    await ledger.close()
    assert list(spill.iterdir()) == []


async def test_a_node_stopped_during_an_outage_writes_its_journal_when_started_again(
    server: PostgresServer, database_url: str, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    await asyncio.to_thread(server.stop)
    first = Ledger(database_url, spill, flush_interval=0.02, connect_timeout=1.0)
    await first.start()  # Postgres is down: the start does not fail
    assert not first.postgres_up
    sockets = [f"sock-{i}" for i in range(40)]
    for socket_id in sockets:
        for row in conversation(socket_id, turns=3):
            first.record(row)
    first.record(
        AdminAction(
            actor="alice",
            remote_addr=None,
            action="teams.disable",
            target="acme",
            at=datetime.now(UTC),
        )
    )
    recorded = len(sockets) * 5 + 1
    started = time.monotonic()
    await first.close(deadline=5)
    assert time.monotonic() - started < 2.5  # Postgres is down: spill at once, don't wait
    assert first.pending_rows == recorded
    assert sum(len(p.read_bytes().splitlines()) for p in segments(spill)) == recorded

    await asyncio.to_thread(server.start)
    second = Ledger(database_url, spill, flush_interval=0.02)
    await second.start()
    assert second.pending_rows == recorded  # the orphaned journal, adopted
    assert await second.flushed(timeout=15)
    await second.close()
    await check_written_once(database_url, sockets, turns=3)
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM admin_actions") == 1
    finally:
        await conn.close()
    assert list(spill.iterdir()) == []
