"""Retention and migration on a large ledger: the old row-by-row DELETE vs dropping partitions.

    .venv/bin/python scripts/bench_retention.py [--rows 1000000] [--admin-dsn postgresql://...]

Makes throwaway databases `gwbench_<hex>` on the server of `--admin-dsn` (dropped at the end):

1. 0001 only (unpartitioned), `--rows` turns in two months older than the retention: the time
   of the old `ledger_prune(cutoff)` DELETE of them all.
2. 0001, the same rows, then the time of `migrate` to the partitioned schema (0002: the old table
   attached as one partition), then the time of `ledger_drop_partitions(cutoff)` dropping it.
3. The partitioned schema, the same rows in two monthly partitions: the time of dropping them.

Prints one line per figure. Loading the rows (generate_series in Postgres) is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from app.ledger.migrate import MIGRATIONS_DIR, migrate

_LOAD = """
INSERT INTO turns (row_id, socket_id, node, key_id, key_prefix, team_id, transport, model,
                   received_at, accepted, response_id, status, input_tokens, cached_tokens,
                   output_tokens, reasoning_tokens, cost_usd, ttfe_ms, duration_ms)
SELECT gen_random_uuid(), 'sock-' || (i / 10), 'node-a', 'key-' || (i % 100), 'gw_abc',
       'team-' || (i % 10), 'ws', 'openai/gpt-5',
       $1::timestamptz + (i % 2) * interval '1 month' + (i % 2000000) * interval '1 second',
       true, 'resp_' || i, 'completed', 1000, 200, 50, 10, 0.0015, 12.5, 250.0
FROM generate_series(1, $2::bigint) AS i
"""


def _dsn(admin_dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(admin_dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def _fresh(admin_dsn: str) -> tuple[str, str]:
    name = f"gwbench_{secrets.token_hex(8)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, _dsn(admin_dsn, name)


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _timed(conn: asyncpg.Connection, sql: str, *args: object) -> tuple[str, object]:
    """Run `sql`; '<seconds> s, <WAL> MiB WAL' and its value."""
    lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
    start = time.perf_counter()
    value = await conn.fetchval(sql, *args, timeout=3600)
    seconds = time.perf_counter() - start
    wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn)
    return f"{seconds:.3f} s, {int(wal) / 2**20:.1f} MiB WAL", value


async def _load(conn: asyncpg.Connection, first: datetime, rows: int) -> float:
    start = time.perf_counter()
    await conn.execute(_LOAD, first, rows, timeout=3600)
    await conn.execute("VACUUM ANALYZE turns", timeout=3600)
    return time.perf_counter() - start


async def main(admin_dsn: str, rows: int) -> None:
    now = datetime.now(UTC)
    first = datetime(now.year - 2, now.month, 1, tzinfo=UTC)  # two months, two years ago
    cutoff = now - timedelta(days=365)
    only_first = Path(tempfile.mkdtemp(prefix="gwbench-migrations-"))
    shutil.copy(MIGRATIONS_DIR / "0001_ledger.sql", only_first)
    made: list[str] = []
    try:
        print(f"rows: {rows:,} turns in 2 months older than the retention (cutoff {cutoff:%F})")

        name, dsn = await _fresh(admin_dsn)
        made.append(name)
        await migrate(dsn, only_first)
        conn = await asyncpg.connect(dsn)
        try:
            print(f"load (unmeasured): {await _load(conn, first, rows):.1f} s")
            took, deleted = await _timed(conn, "SELECT ledger_prune($1)", cutoff)
            print(f"old prune, DELETE of {deleted:,} rows: {took}")
            took, _ = await _timed(conn, "VACUUM turns")
            print(f"the VACUUM that DELETE leaves to (auto)vacuum: {took}")
        finally:
            await conn.close()
        await _drop(admin_dsn, made.pop())

        name, dsn = await _fresh(admin_dsn)
        made.append(name)
        await migrate(dsn, only_first)
        conn = await asyncpg.connect(dsn)
        try:
            await _load(conn, first, rows)
            lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
            start = time.perf_counter()
            applied = await migrate(dsn)
            seconds = time.perf_counter() - start
            wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn)
            print(
                f"migrate {applied} on {rows:,} turns: {seconds:.3f} s, "
                f"{int(wal) / 2**20:.1f} MiB WAL"
            )
            count = await conn.fetchval("SELECT count(*) FROM turns")
            assert count == rows, (count, rows)
            took, _ = await _timed(conn, "SELECT count(*) FROM ledger_drop_partitions($1)", cutoff)
            print(f"partition drop (the attached old table, {rows:,} rows): {took}")

            # Monthly partitions made by the partitioned schema itself.
            for m in (0, 1):
                month = datetime(first.year, first.month, 1, tzinfo=UTC) + timedelta(days=31 * m)
                await conn.execute(
                    "SELECT ledger_month_partition('turns', 'received_at', $1)", month
                )
            await _load(conn, first, rows)
            assert await conn.fetchval("SELECT count(*) FROM turns_default") == 0
            took, dropped = await _timed(
                conn, "SELECT array_agg(n) FROM ledger_drop_partitions($1) AS n", cutoff
            )
            print(f"partition drop ({dropped}, {rows:,} rows): {took}")
        finally:
            await conn.close()
    finally:
        for name in made:
            await _drop(admin_dsn, name)
        shutil.rmtree(only_first, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    asyncio.run(main(args.admin_dsn, args.rows))
