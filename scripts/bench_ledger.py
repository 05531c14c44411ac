"""Benchmark the audit ledger's writer against a real Postgres.

    python scripts/bench_ledger.py [--database-url URL] [--rows N] [--batch-size B]

Prints three figures:
- sustained: rows per second the writer moves into Postgres while a producer keeps its queue
  fed (a mix of 1 socket open, 8 turns and 1 close per socket, like real sessions);
- record(): what the hot path pays per row meanwhile (the session's only ledger cost);
- replay: rows per second a starting node writes from a journal spilled during an outage.

It works in a throwaway database `gwbench_<hex>` created (by `migrate`) on the server of
`--database-url` (default: `DATABASE_URL`, else the local default) and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.ledger import Ledger, SocketClosed, SocketOpened, TurnRecord, migrate
from app.ledger.rows import Row

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/gateway"
TURNS_PER_SOCKET = 8


def session_rows(n: int) -> list[Row]:
    """`n` rows shaped like real traffic: open, 8 turns, close, socket after socket."""
    rows: list[Row] = []
    now = datetime.now(UTC)
    socket_index = 0
    while len(rows) < n:
        socket_id = f"bench-{socket_index}-{secrets.token_hex(4)}"
        socket_index += 1
        rows.append(
            SocketOpened(
                socket_id=socket_id,
                node="bench",
                key_id=f"key-{socket_index % 50}",
                key_prefix="gw_bench",
                team_id=f"team-{socket_index % 5}",
                model=None,
                opened_at=now,
            )
        )
        for i in range(TURNS_PER_SOCKET):
            rows.append(
                TurnRecord(
                    socket_id=socket_id,
                    node="bench",
                    key_id=f"key-{socket_index % 50}",
                    key_prefix="gw_bench",
                    team_id=f"team-{socket_index % 5}",
                    transport="ws",
                    model="openai/gpt-5",
                    received_at=now + timedelta(milliseconds=i),
                    accepted=True,
                    response_id=f"resp_{secrets.token_hex(12)}",
                    status="completed",
                    previous_response_id=None if i == 0 else "resp_prev",
                    input_tokens=1200,
                    cached_tokens=1000,
                    output_tokens=300,
                    reasoning_tokens=120,
                    cost_usd=Decimal("0.0034125"),
                    ttfe_ms=180.5,
                    duration_ms=2400.0,
                )
            )
        rows.append(
            SocketClosed(
                socket_id=socket_id,
                closed_at=now + timedelta(seconds=30),
                closed_by="client",
                close_code=1000,
                close_reason="",
                upstream_close_code=1000,
                upstream_close_reason="",
                turns=TURNS_PER_SOCKET,
                model="openai/gpt-5",
                opened_at=now,
            )
        )
    return rows[:n]


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def bench_sustained(
    url: str, spill: Path, rows: list[Row], batch_size: int
) -> tuple[float, float]:
    """(rows per second into Postgres, seconds per record() call) with the queue kept fed.

    The producer records 100 rows at a time and waits while more than five batches are pending,
    so memory stays bounded as in a real node and the writer never starves.
    """
    ledger = Ledger(url, spill, batch_size=batch_size)
    await ledger.start()
    high_water = 5 * batch_size
    in_record = 0.0
    started = time.perf_counter()
    for chunk in range(0, len(rows), 100):
        before = time.perf_counter()
        for row in rows[chunk : chunk + 100]:
            ledger.record(row)
        in_record += time.perf_counter() - before
        # Polling a counter: the Ledger offers no event for "below N" (nor needs one).
        while ledger.pending_rows > high_water:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
    if not await ledger.flushed(timeout=600):
        raise SystemExit("the writer did not catch up in 10 minutes")
    elapsed = time.perf_counter() - started
    await ledger.close()
    return len(rows) / elapsed, in_record / len(rows)


async def bench_replay(url: str, spill: Path, rows: list[Row], batch_size: int) -> float:
    """Rows per second a starting node writes from spill files left by an outage."""
    down = Ledger("postgresql://postgres@127.0.0.1:1/none", spill, connect_timeout=0.2)
    for row in rows:
        down.record(row)
    await down.close(deadline=0.5)
    ledger = Ledger(url, spill, batch_size=batch_size)
    started = time.perf_counter()
    await ledger.start()
    if not await ledger.flushed(timeout=600):
        raise SystemExit("the replay did not finish in 10 minutes")
    elapsed = time.perf_counter() - started
    await ledger.close()
    return len(rows) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    name = f"gwbench_{secrets.token_hex(8)}"
    url = with_database(args.database_url, name)
    await migrate(url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spill = Path(tmp)
            sustained, per_row = await bench_sustained(
                url, spill / "sustained", session_rows(args.rows), args.batch_size
            )
            replay = await bench_replay(
                url, spill / "replay", session_rows(args.rows), args.batch_size
            )
    finally:
        admin = await asyncpg.connect(with_database(args.database_url, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    print(f"rows: {args.rows} (per socket: 1 open, {TURNS_PER_SOCKET} turns, 1 close)")
    print(f"batch size: {args.batch_size}")
    print(f"record(): {per_row * 1e6:.2f} µs per row, the hot path's whole ledger cost")
    print(f"sustained: {sustained:,.0f} rows/s written to Postgres")
    print(f"replay: {replay:,.0f} rows/s written from spill files at start")


if __name__ == "__main__":
    asyncio.run(main())
