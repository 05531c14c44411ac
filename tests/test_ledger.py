"""The audit ledger against a real Postgres: migrations, the writer, idempotency, the docs' queries.

Each module gets its own `gwtest_<hex>` database on the admin server (`pg_admin_dsn`, see
services.py), dropped at the end; tests empty its tables before they start. Outages and restarts
live in test_ledger_outage.py, on a throwaway server they can stop.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from services import fresh_database, run_blocking

from app.ledger import (
    AdminAction,
    Ledger,
    MigrationError,
    SocketClosed,
    SocketOpened,
    TurnRecord,
    ensure_partitions,
    migrate,
    prune,
)
from app.ledger.errors import Fault, backoff_delays, fault_of
from app.ledger.journal import Journal
from app.ledger.migrate import MIGRATIONS_DIR, database_name, load_migrations
from app.ledger.rows import Row, decode_line, encode_line
from app.metrics import REGISTRY

DOCS = Path(__file__).resolve().parents[1] / "docs" / "ledger.md"
TABLES = ("sockets", "turns", "admin_actions")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_db(pg_admin_dsn: str) -> Iterator[str]:
    dsn, drop = fresh_database(pg_admin_dsn)
    run_blocking(migrate(dsn))
    yield dsn
    drop()


@pytest.fixture
async def db(ledger_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(ledger_db)
    await conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def ledger(ledger_db: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    led = Ledger(ledger_db, tmp_path / "spill", batch_size=100, flush_interval=0.02)
    await led.start()
    try:
        yield led
    finally:
        await led.close(deadline=5)


# -- rows -------------------------------------------------------------------------------------

NOW = datetime.now(UTC).replace(microsecond=0)


def opened(socket_id: str, **kw: Any) -> SocketOpened:
    values: dict[str, Any] = {
        "socket_id": socket_id,
        "node": "node-a",
        "key_id": "key-1",
        "key_prefix": "gw_abc",
        "team_id": "acme",
        "model": None,
        "opened_at": NOW,
    }
    values.update(kw)
    return SocketOpened(**values)


def closed(socket_id: str, **kw: Any) -> SocketClosed:
    values: dict[str, Any] = {
        "socket_id": socket_id,
        "closed_at": NOW + timedelta(seconds=30),
        "closed_by": "client",
        "close_code": 1000,
        "close_reason": "bye",
        "upstream_close_code": 1000,
        "upstream_close_reason": "",
        "turns": 2,
        "model": "openai/gpt-5",
        "opened_at": NOW,
    }
    values.update(kw)
    return SocketClosed(**values)


def turn(**kw: Any) -> TurnRecord:
    values: dict[str, Any] = {
        "socket_id": "sock-1",
        "node": "node-a",
        "key_id": "key-1",
        "key_prefix": "gw_abc",
        "team_id": "acme",
        "transport": "ws",
        "model": "openai/gpt-5",
        "received_at": NOW,
        "accepted": True,
        "response_id": f"resp_{uuid.uuid4().hex}",
        "status": "completed",
        "previous_response_id": None,
        "input_tokens": 1000,
        "cached_tokens": 200,
        "output_tokens": 50,
        "reasoning_tokens": 10,
        "cost_usd": Decimal("0.0015250"),
        "ttfe_ms": 12.5,
        "duration_ms": 250.0,
    }
    values.update(kw)
    return TurnRecord(**values)


def admin(**kw: Any) -> AdminAction:
    values: dict[str, Any] = {
        "actor": "alice",
        "remote_addr": "10.0.0.7",
        "action": "keys.revoke",
        "target": "key-9",
        "at": NOW,
        "details": {"grace_seconds": 0, "why": ["leaked"]},
    }
    values.update(kw)
    return AdminAction(**values)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# -- migrations -------------------------------------------------------------------------------


async def test_migrate_creates_the_database_and_applies_nothing_twice(pg_admin_dsn: str) -> None:
    dsn, drop = fresh_database(pg_admin_dsn, create=False)
    try:
        assert await migrate(dsn) == [m.name for m in load_migrations()]
        assert await migrate(dsn) == []
        conn = await asyncpg.connect(dsn)
        try:
            names = await conn.fetchval(
                "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p') "
                "AND NOT relispartition"
            )
            applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        finally:
            await conn.close()
        assert names == ["admin_actions", "schema_migrations", "sockets", "turns"]
        assert applied == len(load_migrations())
    finally:
        drop()


async def test_concurrent_migrations_on_a_missing_database_both_succeed(pg_admin_dsn: str) -> None:
    dsn, drop = fresh_database(pg_admin_dsn, create=False)
    try:
        results = await asyncio.gather(migrate(dsn), migrate(dsn), migrate(dsn))
        applied = [name for result in results for name in result]
        assert sorted(applied) == [m.name for m in load_migrations()]  # each exactly once
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
            assert await conn.fetchval("SELECT to_regclass('public.turns') IS NOT NULL")
        finally:
            await conn.close()
    finally:
        drop()


async def test_an_edited_migration_stops_the_run(pg_admin_dsn: str, tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    dsn, drop = fresh_database(pg_admin_dsn, create=False)
    try:
        await migrate(dsn, migrations)
        first = sorted(migrations.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match=first.name):
            await migrate(dsn, migrations)
    finally:
        drop()


async def test_a_failed_migration_leaves_no_trace_and_names_itself(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    (migrations / "9000_broken.sql").write_text("CREATE TABLE half_done (x int);\nSELEKT 1;\n")
    dsn, drop = fresh_database(pg_admin_dsn, create=False)
    try:
        with pytest.raises(MigrationError, match=r"9000_broken\.sql.*42601"):
            await migrate(dsn, migrations)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('public.half_done')") is None
            applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            assert applied == len(load_migrations())
        finally:
            await conn.close()
    finally:
        drop()


def test_misnamed_migration_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql, got 1_init\.sql"):
        load_migrations(tmp_path)


async def test_migrate_reports_an_unreachable_server_in_one_line() -> None:
    with pytest.raises(MigrationError) as caught:
        await migrate("postgresql://postgres:secret@127.0.0.1:1/gateway")
    message = str(caught.value)
    assert "127.0.0.1:1/gateway" in message and "secret" not in message
    assert "\n" not in message


def test_database_name_follows_libpq() -> None:
    assert database_name("postgresql://u@h/gw") == "gw"
    assert database_name("postgresql://u@h/?dbname=other") == "other"
    assert database_name("postgresql://alice@h") == "alice"


# -- small pure pieces ------------------------------------------------------------------------


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    delays = backoff_delays(base=0.1, cap=1.0)
    first = [next(delays) for _ in range(8)]
    assert 0.05 <= first[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in first[5:])


def test_faults_are_judged_by_sqlstate_class() -> None:
    assert fault_of(asyncpg.exceptions.CheckViolationError()) is Fault.POISON  # 23514
    assert fault_of(asyncpg.exceptions.NumericValueOutOfRangeError()) is Fault.POISON  # 22003
    assert fault_of(asyncpg.exceptions.AdminShutdownError()) is Fault.TRANSIENT  # 57P01
    assert fault_of(asyncpg.exceptions.UndefinedTableError()) is Fault.TRANSIENT  # 42P01
    assert fault_of(asyncpg.exceptions.TooManyConnectionsError()) is Fault.TRANSIENT  # 53300
    assert fault_of(asyncpg.DataError("bad argument")) is Fault.POISON
    assert fault_of(ConnectionRefusedError()) is Fault.TRANSIENT
    assert fault_of(TimeoutError()) is Fault.TRANSIENT


def test_every_kind_of_row_survives_the_journal_encoding() -> None:
    for row in (opened("s", model="openai/x"), closed("s"), turn(), admin(), turn(cost_usd=None)):
        assert decode_line(encode_line(row)) == row


def test_a_spill_directory_being_made_is_never_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers start at once: one hunts orphans at the worst moment for the other, after
    the other made its directory and before it locked it. The hunter must not take it (before:
    `spill directory … is locked by another process`, and the worker did not start)."""
    from app.ledger import journal

    other = Journal(tmp_path)
    other.open()
    real_lock = journal._try_lock
    hunted: list[Path] = []

    def hunt_first(directory: Path) -> int | None:
        if not hunted:
            hunted.append(directory)
            other.adopt_orphans()
        return real_lock(directory)

    monkeypatch.setattr(journal, "_try_lock", hunt_first)
    mine = Journal(tmp_path)
    assert mine.open() == []
    assert mine.directory.is_dir() and not other._adopted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [other.directory.name, mine.directory.name]
    )


def test_journal_keeps_order_and_puts_a_head_segment_first(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.open() == []
    tail_a, _ = journal.write_segment([turn(response_id="a")])
    tail_b, _ = journal.write_segment([turn(response_id="b")])
    head, count = journal.write_segment([turn(response_id="h1"), turn(response_id="h2")], head=True)
    assert count == 2 and head is not None and tail_a is not None and tail_b is not None
    assert sorted([tail_b, head, tail_a]) == [head, tail_a, tail_b]
    assert not list(journal.directory.glob("*.tmp"))
    # While this journal holds its lock, nobody adopts its files; once released, one does.
    bystander = Journal(tmp_path)
    assert bystander.open() == []
    bystander.close()
    journal.close()
    adopter = Journal(tmp_path)
    found = adopter.open()
    assert [path.name for path, _ in found] == [head.name, tail_a.name, tail_b.name]
    assert [count for _, count in found] == [2, 1, 1]
    rows, bad = adopter.read_segment(found[0][0])
    assert [r.response_id for r in rows if isinstance(r, TurnRecord)] == ["h1", "h2"] and not bad
    for path, _ in found:
        adopter.remove_segment(path)
    assert not journal.directory.exists()  # the emptied orphan is deleted
    adopter.close()
    assert list(tmp_path.iterdir()) == []


# -- the writer -------------------------------------------------------------------------------


async def test_every_row_is_written_once_with_its_values(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    sockets = [f"sock-{i}" for i in range(150)]
    turns = [
        turn(
            socket_id=sockets[i % len(sockets)] if i % 5 else None,
            transport="ws" if i % 5 else "http",
            accepted=i % 7 != 0,
            error_code="rate_limit_exceeded" if i % 7 == 0 else None,
            response_id=None if i % 7 == 0 else f"resp_{i}",
            status=None if i % 7 == 0 else "completed",
            previous_response_id=f"resp_{i - 1}" if i % 3 == 0 else None,
            retried=i % 11 == 0,
            http_fallback=i % 13 == 0,
            memory_bound_exceeded=i % 17 == 0,
            cost_usd=Decimal(i) / Decimal(1000),
            received_at=NOW + timedelta(milliseconds=i),
        )
        for i in range(400)
    ]
    admins = [admin(target=f"key-{i}", details={"i": i}) for i in range(120)]
    for socket_id in sockets:
        ledger.record(opened(socket_id))
    for turn_row in turns:
        ledger.record(turn_row)
    for admin_row in admins:
        ledger.record(admin_row)
    for socket_id in sockets:
        ledger.record(closed(socket_id, close_code=1001, upstream_close_code=None))
    # The same rows again (same row_id): nothing more is written.
    again: list[Row] = [*turns[:50], *admins[:20]]
    for row in again:
        ledger.record(row)
    assert await ledger.flushed(timeout=10)
    assert ledger.pending_rows == 0 and ledger.postgres_up

    assert await db.fetchval("SELECT count(*) FROM turns") == len(turns)
    assert await db.fetchval("SELECT count(*) FROM admin_actions") == len(admins)
    assert await db.fetchval("SELECT count(*) FROM sockets") == len(sockets)
    stored = {r["row_id"]: r for r in await db.fetch("SELECT * FROM turns")}
    for row in turns:
        got = stored[row.row_id]
        for field in (
            "socket_id key_id key_prefix team_id transport model received_at accepted error_code "
            "response_id status previous_response_id retried http_fallback memory_bound_exceeded "
            "input_tokens cached_tokens output_tokens reasoning_tokens cost_usd ttfe_ms "
            "duration_ms"
        ).split():
            assert got[field] == getattr(row, field), field
    got_admin = await db.fetchrow("SELECT * FROM admin_actions WHERE target = 'key-7'")
    assert json.loads(got_admin["details"]) == {"i": 7}
    assert got_admin["actor"] == "alice" and got_admin["remote_addr"] == "10.0.0.7"
    sock = await db.fetchrow("SELECT * FROM sockets WHERE socket_id = 'sock-3'")
    assert (sock["node"], sock["key_id"], sock["team_id"]) == ("node-a", "key-1", "acme")
    assert sock["opened_at"] == NOW and sock["closed_at"] == NOW + timedelta(seconds=30)
    assert (sock["closed_by"], sock["close_code"], sock["close_reason"]) == ("client", 1001, "bye")
    assert (sock["upstream_close_code"], sock["turns"], sock["model"]) == (None, 2, "openai/gpt-5")


async def test_a_close_may_land_before_its_open_and_replays_change_nothing(
    ledger_db: str, ledger: Ledger, db: asyncpg.Connection, tmp_path: Path
) -> None:
    close_row = closed("early", model="openai/locked", closed_by="gateway", close_code=1008)
    open_row = opened("early", model=None)
    ledger.record(close_row)
    assert await ledger.flushed()
    ledger.record(open_row)
    assert await ledger.flushed()
    row = await db.fetchrow("SELECT * FROM sockets WHERE socket_id = 'early'")
    assert row["model"] == "openai/locked" and row["close_code"] == 1008
    assert row["opened_at"] == NOW and row["node"] == "node-a"

    # Another process replays the same rows (a journal written twice): nothing changes.
    other = Ledger(ledger_db, tmp_path / "other-spill", flush_interval=0.02)
    await other.start()
    other.record(opened("early", model="openai/other", row_id=open_row.row_id))
    other.record(close_row)
    assert await other.flushed()
    await other.close()
    again = await db.fetchrow("SELECT * FROM sockets WHERE socket_id = 'early'")
    assert dict(again) == dict(row)


async def test_a_close_spilled_before_partitioning_finds_its_open_half(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    ledger.record(opened("upgraded"))
    assert await ledger.flushed()
    ledger.record(closed("upgraded", opened_at=None, close_code=1001))
    assert await ledger.flushed()
    rows = await db.fetch("SELECT opened_at, close_code FROM sockets WHERE socket_id = 'upgraded'")
    assert [tuple(r) for r in rows] == [(NOW, 1001)]


async def test_record_is_cheap_and_never_raises(ledger: Ledger) -> None:
    ledger.record(object())  # type: ignore[arg-type]
    ledger.record(None)  # type: ignore[arg-type]
    rows = [turn() for _ in range(20_000)]
    started = time.perf_counter()
    for row in rows:
        ledger.record(row)
    per_row = (time.perf_counter() - started) / len(rows)
    assert per_row < 50e-6, f"record() took {per_row * 1e6:.1f} µs a row"
    assert await ledger.flushed(timeout=20)


async def test_a_refused_row_is_set_aside_and_the_rest_written(
    ledger: Ledger, db: asyncpg.Connection, tmp_path: Path
) -> None:
    failures = metric("gateway_ledger_write_failures_total")
    good = [turn() for _ in range(30)]
    bad = turn(transport="carrier-pigeon")  # breaks the CHECK: 23514
    for row in [*good[:15], bad, *good[15:]]:
        ledger.record(row)
    assert await ledger.flushed()
    assert ledger.pending_rows == 0
    assert await db.fetchval("SELECT count(*) FROM turns") == len(good)
    rejected = (tmp_path / "spill" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1
    kept = json.loads(rejected[0])
    assert "CheckViolationError" in kept["error"]
    assert decode_line(json.dumps(kept["row"]).encode()) == bad  # an operator can re-enter it
    assert metric("gateway_ledger_write_failures_total") > failures


async def test_rows_recorded_after_close_are_spilled_for_the_next_start(
    ledger_db: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    spill = tmp_path / "late"
    first = Ledger(ledger_db, spill)
    await first.start()
    await first.close()
    late = admin(target="late")
    first.record(late)
    assert first.pending_rows == 1  # spilled: it is the next process's to write
    assert len(list(spill.glob("*/*.jsonl"))) == 1
    second = Ledger(ledger_db, spill, flush_interval=0.02)
    await second.start()
    assert await second.flushed()
    await second.close()
    assert await db.fetchval("SELECT count(*) FROM admin_actions WHERE target = 'late'") == 1
    assert [p.name for p in spill.iterdir()] == []


def month_start(at: datetime, months: int = 0) -> datetime:
    """The first instant (UTC) of the month `months` after the one of `at`."""
    index = at.year * 12 + at.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def partitions(db: asyncpg.Connection, table: str) -> list[str]:
    names: list[str] | None = await db.fetchval(
        "SELECT array_agg(inhrelid::regclass::text ORDER BY 1) FROM pg_inherits "
        "WHERE inhparent = $1::regclass",
        table,
    )
    return names or []


async def test_retention_drops_only_whole_partitions_older_than_the_cutoff(
    ledger_db: str, ledger: Ledger, db: asyncpg.Connection
) -> None:
    cutoff = month_start(NOW, -6)
    old = [month_start(NOW, -8) + timedelta(days=3), month_start(NOW, -7) + timedelta(days=9)]
    kept = cutoff + timedelta(days=1)  # its partition's month is not entirely older
    for month in [*old, kept]:
        for table, key in (
            ("sockets", "opened_at"),
            ("turns", "received_at"),
            ("admin_actions", "at"),
        ):
            await db.execute("SELECT ledger_month_partition($1, $2, $3)", table, key, month)
    for i, at in enumerate([*old, kept, NOW]):
        ledger.record(turn(received_at=at))
        ledger.record(opened(f"s{i}", opened_at=at))
        ledger.record(closed(f"s{i}", opened_at=at, closed_at=at + timedelta(minutes=5)))
        ledger.record(admin(at=at))
    assert await ledger.flushed()
    before = {t: await partitions(db, t) for t in TABLES}

    dropped = await prune(ledger_db, cutoff)
    print("dropped:", dropped)
    expected = sorted(
        f"{t}_p{m:%Y_%m}" for t in TABLES for m in (month_start(old[0]), month_start(old[1]))
    )
    assert sorted(dropped) == expected
    for t in TABLES:
        assert sorted(set(before[t]) - set(await partitions(db, t))) == [
            name for name in expected if name.startswith(f"{t}_p")
        ]
    assert await db.fetchval("SELECT count(*) FROM turns") == 2
    assert await db.fetchval("SELECT array_agg(socket_id ORDER BY 1) FROM sockets") == ["s2", "s3"]
    assert await db.fetchval("SELECT count(*) FROM admin_actions") == 2
    assert await prune(ledger_db, cutoff) == []  # nothing more to drop


async def test_partitions_ahead_exist_and_a_row_of_a_future_month_is_written(
    ledger_db: str, ledger: Ledger, db: asyncpg.Connection
) -> None:
    await ensure_partitions(ledger_db)
    assert await ensure_partitions(ledger_db) == []  # created once
    for t in TABLES:
        names = await partitions(db, t)
        for ahead in range(3):
            assert f"{t}_p{month_start(NOW, ahead):%Y_%m}" in names
    first_instant = month_start(NOW, 2)  # 00:00 UTC of the month after next
    ledger.record(turn(received_at=first_instant))
    ledger.record(opened("future", opened_at=first_instant))
    ledger.record(admin(at=first_instant))
    assert await ledger.flushed()
    where = f"{first_instant:%Y_%m}"
    assert await db.fetchval(f"SELECT count(*) FROM turns_p{where}") == 1
    assert await db.fetchval(f"SELECT count(*) FROM sockets_p{where}") == 1
    assert await db.fetchval(f"SELECT count(*) FROM admin_actions_p{where}") == 1
    for t in TABLES:
        assert await db.fetchval(f"SELECT count(*) FROM {t}_default") == 0


async def test_migration_from_an_unpartitioned_ledger_keeps_every_row(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    shutil.copy(MIGRATIONS_DIR / "0001_ledger.sql", only_first)
    dsn, drop = fresh_database(pg_admin_dsn, create=False)
    try:
        assert await migrate(dsn, only_first) == ["0001_ledger.sql"]
        conn = await asyncpg.connect(dsn)
        try:
            # 5 months of rows: 100 turns, 50 sockets, 20 admin actions a month.
            first = month_start(NOW, -5)
            month = "$1::timestamptz + (i % 5) * interval '1 month'"
            await conn.execute(
                "INSERT INTO turns (row_id, node, key_id, key_prefix, team_id, transport, "
                "received_at, accepted, cost_usd) SELECT gen_random_uuid(), 'n', "
                f"'key-' || (i % 3), 'gw_', 'acme', 'ws', {month} + i * interval '1 minute', "
                "true, 0.01 FROM generate_series(1, 500) AS i",
                first,
            )
            await conn.execute(
                "INSERT INTO sockets (socket_id, node, opened_at, closed_at, closed_by, "
                f"close_code) SELECT 'sock-' || i, 'n', {month} + i * interval '1 minute', "
                f"{month} + i * interval '2 minute', 'client', 1000 "
                "FROM generate_series(1, 250) AS i",
                first,
            )
            # A close whose open never arrived: no opened_at.
            await conn.execute(
                "INSERT INTO sockets (socket_id, closed_at, closed_by) "
                "VALUES ('orphan', $1, 'client')",
                NOW,
            )
            await conn.execute(
                "INSERT INTO admin_actions (row_id, actor, action, target, at) "
                f"SELECT gen_random_uuid(), 'a', 'keys.create', 't', {month} "
                "FROM generate_series(1, 100) AS i",
                first,
            )
            by_id = "SELECT array_agg({0}::text ORDER BY {0}) FROM {1}"
            ids = {
                "turns": by_id.format("row_id", "turns"),
                "sockets": by_id.format("socket_id", "sockets"),
                "admin_actions": by_id.format("row_id", "admin_actions"),
            }
            before = {t: await conn.fetchval(q) for t, q in ids.items()}
            counts = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}
            responses = await conn.fetchval("SELECT count(*) FROM responses")

            # Two migrators at once: the advisory lock lets one apply, the other finds it done.
            results = await asyncio.gather(migrate(dsn), migrate(dsn))
            assert sorted(name for r in results for name in r) == [
                "0002_partitions.sql",
                "0003_spend_index.sql",
            ]
            assert await migrate(dsn) == []  # and again: nothing

            after = {t: await conn.fetchval(q) for t, q in ids.items()}
            print("rows per table before/after:", counts, {t: len(v) for t, v in after.items()})
            assert after == before
            assert {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES} == counts
            assert await conn.fetchval("SELECT count(*) FROM responses") == responses
            for t in TABLES:
                assert (
                    await conn.fetchval(
                        "SELECT relkind::text FROM pg_class WHERE oid = $1::regclass", t
                    )
                    == "p"
                )
                # The old table is one partition (attached, not copied) for its months.
                assert f"{t}_legacy" in await partitions(conn, t)
                assert await conn.fetchval(f"SELECT count(*) FROM {t}_legacy") == counts[t] - (
                    t == "sockets"
                )
            assert await conn.fetchval("SELECT socket_id FROM sockets_default") == "orphan"
        finally:
            await conn.close()

        # The writer's statements work on the migrated ledger, replays included.
        led = Ledger(dsn, tmp_path / "spill", flush_interval=0.02)
        await led.start()
        try:
            row = turn(received_at=month_start(NOW, 1))
            led.record(row)
            led.record(row)
            led.record(opened("new", opened_at=NOW))
            led.record(closed("new", opened_at=NOW, closed_at=NOW))
            led.record(closed("new", opened_at=NOW, closed_at=NOW))
            assert await led.flushed()
        finally:
            await led.close()
        conn = await asyncpg.connect(dsn)
        try:
            assert (
                await conn.fetchval("SELECT count(*) FROM turns WHERE row_id = $1", row.row_id) == 1
            )
            assert await conn.fetchval("SELECT count(*) FROM sockets WHERE socket_id = 'new'") == 1
        finally:
            await conn.close()
    finally:
        drop()


async def test_explain_of_each_documented_query_reads_only_the_partitions_in_range(
    pg_admin_dsn: str,
) -> None:
    """A ledger with month partitions from three months back to the ones ahead: each query of
    docs/ledger.md reads only the partitions its range reaches (the others pruned, at planning
    or, for `now()`, at executor start)."""
    dsn, drop = fresh_database(pg_admin_dsn)
    try:
        await migrate(dsn)
        await ensure_partitions(dsn)  # this month and two ahead
        db = await asyncpg.connect(dsn)
        try:
            for back in (-3, -2, -1):
                for table, key in (("sockets", "opened_at"), ("turns", "received_at")):
                    await db.execute(
                        "SELECT ledger_month_partition($1, $2, $3)",
                        table,
                        key,
                        month_start(NOW, back),
                    )
            months = sorted(p.removeprefix("turns_") for p in await partitions(db, "turns"))
            assert sorted(p.removeprefix("sockets_") for p in await partitions(db, "sockets")) == (
                months
            )
            past = [f"p{month_start(NOW, m):%Y_%m}" for m in (-3, -2, -1, 0, 1)]
            assert set(past) < set(months) and "default" in months, months
            # A range inside the month two months back: that month's partition alone.
            start = month_start(NOW, -2)
            queries: dict[str, tuple[tuple[Any, ...], list[str]]] = {
                "responses_of_key": (
                    ("key-1", start + timedelta(days=1), start + timedelta(days=2)),
                    [past[1]],
                ),
                "spend_per_team_per_day": (
                    (start.date(), (start + timedelta(days=2)).date()),
                    [past[1]],
                ),
            }
            # Closed in the last hour: opened since 27 hours ago (the month of that on, the
            # partitions ahead included) or never matched (opened_at NULL, the default one).
            since = datetime.now(UTC) - timedelta(hours=27)
            recent = [m for m in months if f"p{since:%Y_%m}" <= m < "q"]  # "default" sorts after
            queries["close_codes_last_hour"] = ((), [*recent, "default"])
            for name, (args, expected) in queries.items():
                text = await explain(db, doc_query(name), args)
                print(f"{name}:\n{text}")
                read = re.findall(r"\b(?:turns|sockets)_(p\d{4}_\d{2}|legacy|default)\b", text)
                assert sorted(set(read)) == sorted(expected), text
        finally:
            await db.close()
    finally:
        drop()


# -- the three queries of docs/ledger.md -----------------------------------------------------------


def doc_query(name: str) -> str:
    blocks: list[str] = re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)
    for block in blocks:
        if block.startswith(f"-- query: {name}\n"):
            return block
    raise AssertionError(f"no query {name!r} in {DOCS}")


async def explain(db: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> str:
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        await db.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        plan = await db.fetch(f"EXPLAIN {sql}", *args)
    return "\n".join(line["QUERY PLAN"] for line in plan)


async def uses_index(db: asyncpg.Connection, sql: str, args: tuple[Any, ...], index: str) -> bool:
    """Whether the plan reads `index` of a partitioned table (through its partitions' copies)."""
    text = await explain(db, sql, args)
    copies = await db.fetchval(
        "SELECT array_agg(inhrelid::regclass::text) FROM pg_inherits "
        "WHERE inhparent = $1::regclass",
        index,
    )
    return any(f" {name} " in text + " " for name in [index, *(copies or [])])


async def test_query_responses_of_a_key_in_a_time_range(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    for minute in range(10):
        ledger.record(
            turn(
                key_id="key-q",
                response_id=f"resp_{minute}",
                received_at=start + timedelta(minutes=minute),
            )
        )
    ledger.record(
        turn(key_id="key-q", accepted=False, error_code="model_mismatch", received_at=start)
    )
    for i in range(3000):  # other keys' traffic in the same minutes, so the index pays
        ledger.record(turn(key_id=f"key-{i % 300}", received_at=start + timedelta(seconds=i / 5)))
    assert await ledger.flushed()
    await db.execute("ANALYZE turns")
    sql = doc_query("responses_of_key")
    args = ("key-q", start + timedelta(minutes=2), start + timedelta(minutes=5))
    rows = await db.fetch(sql, *args)
    assert [r["response_id"] for r in rows] == ["resp_2", "resp_3", "resp_4"]
    assert rows[0]["cost_usd"] == Decimal("0.0015250") and rows[0]["input_tokens"] == 1000
    assert await uses_index(db, sql, args, "turns_key_received_idx")


async def test_query_close_codes_of_the_last_hour_by_side(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    closes = [
        ("a", "client", 1000, 1000),
        ("b", "client", 1000, None),
        ("c", "client", 1001, 1006),
        ("d", "gateway", 1008, 1000),
        ("e", "gateway", 1001, None),
        ("f", "gateway", 1001, 1006),
    ]
    for socket_id, side, code, upstream in closes:
        ledger.record(opened(socket_id, opened_at=now - timedelta(minutes=20)))
        ledger.record(
            closed(
                socket_id,
                closed_at=now - timedelta(minutes=5),
                closed_by=side,
                close_code=code,
                upstream_close_code=upstream,
            )
        )
    ledger.record(closed("old", closed_at=now - timedelta(hours=2), close_code=1011))
    ledger.record(opened("still-open"))
    # Counted though its open is far back: a socket that lived its whole 24 h lifetime and then
    # finished a long response.
    lived = now - timedelta(hours=25, minutes=30)
    ledger.record(opened("lived", opened_at=lived))
    ledger.record(
        closed("lived", opened_at=lived, closed_at=now - timedelta(minutes=10), close_code=1000)
    )
    # Counted though it has no opened_at: a close spilled before partitioning whose open half
    # was never written (sockets_default).
    ledger.record(
        closed("unmatched", opened_at=None, closed_at=now - timedelta(minutes=10), close_code=1001)
    )
    assert await ledger.flushed()
    assert await db.fetchval("SELECT count(*) FROM sockets_default WHERE opened_at IS NULL") == 1
    sql = doc_query("close_codes_last_hour")
    rows = [tuple(r) for r in await db.fetch(sql)]
    assert rows == [
        ("client", 1000, 3),
        ("client", 1001, 2),
        ("gateway", 1001, 2),
        ("gateway", 1008, 1),
        ("upstream", 1000, 4),
        ("upstream", 1006, 2),
    ]
    assert await uses_index(db, sql, (), "sockets_closed_at_idx")


async def test_query_spend_per_team_per_day(ledger: Ledger, db: asyncpg.Connection) -> None:
    day1 = datetime(2026, 5, 1, tzinfo=UTC)
    day2 = day1 + timedelta(days=1)
    spend = [
        ("acme", day1 + timedelta(hours=1), "0.10"),
        ("acme", day1 + timedelta(hours=23, minutes=59), "0.25"),
        ("acme", day2 + timedelta(hours=2), "1.00"),
        ("globex", day1 + timedelta(hours=5), "0.005"),
        ("globex", day2 + timedelta(days=1), "9.99"),  # the day after the range
    ]
    for team, at, cost in spend:
        ledger.record(turn(team_id=team, received_at=at, cost_usd=Decimal(cost)))
    ledger.record(
        turn(team_id="acme", received_at=day1, accepted=False, cost_usd=None, status=None)
    )
    assert await ledger.flushed()
    sql = doc_query("spend_per_team_per_day")
    args = (date(2026, 5, 1), date(2026, 5, 3))
    rows = [tuple(r) for r in await db.fetch(sql, *args)]
    assert rows == [
        ("acme", date(2026, 5, 1), 2, Decimal("0.35")),
        ("globex", date(2026, 5, 1), 1, Decimal("0.005")),
        ("acme", date(2026, 5, 2), 1, Decimal("1.00")),
    ]
    assert await uses_index(db, sql, args, "turns_received_idx")


async def test_a_slow_postgres_spills_and_close_keeps_everything(
    ledger_db: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Postgres answers but a lock holds every write: timeouts, spill files, a bounded close."""
    spill = tmp_path / "spill"
    ledger = Ledger(
        ledger_db, spill, memory_rows=30, batch_size=10, flush_interval=0.02, command_timeout=0.3
    )
    await ledger.start()
    failures = metric("gateway_ledger_write_failures_total")
    locker = await asyncpg.connect(ledger_db)
    locked = locker.transaction()
    await locked.start()
    await locker.execute("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE")
    try:
        rows = [turn(response_id=f"resp_slow_{i}") for i in range(200)]
        started = time.perf_counter()
        for row in rows:
            ledger.record(row)
        assert time.perf_counter() - started < 0.2  # the write timeout alone is 0.3 s
        deadline = time.monotonic() + 10
        while (
            not list(spill.glob("*/*.jsonl"))
            or metric("gateway_ledger_write_failures_total") <= failures
        ):
            assert time.monotonic() < deadline, "no spill file and no failure while locked"
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        await ledger.close(deadline=1.0)
        assert time.perf_counter() - started < 2.0
        assert ledger.pending_rows == len(rows)
    finally:
        await locked.rollback()
        await locker.close()
    replay = Ledger(ledger_db, spill, flush_interval=0.02)
    await replay.start()
    assert await replay.flushed(timeout=10)
    await replay.close()
    count = await db.fetchval("SELECT count(*) FROM turns WHERE response_id LIKE 'resp_slow_%'")
    assert count == len(rows)
    assert list(spill.iterdir()) == []
