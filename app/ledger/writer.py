"""The Ledger: takes rows off the hot path and writes them to Postgres in batches.

The session calls `record(row)`: a synchronous append to a deque, no I/O, no await, no raise.
Everything else happens in background tasks:

- the writer task takes up to `batch_size` rows at a time and writes them in one transaction
  (`statements.plan`), every `flush_interval` or as soon as a batch is full;
- the spill task moves the oldest rows from memory to a sealed journal segment (`journal.py`)
  when memory holds more than `memory_rows`, or when Postgres has been down for a while (so a
  crash during an outage loses little);
- the partition task (CONTRACT.md §6; the tables are partitioned by month) creates the
  partitions of this month and the next two at start and then every hour, so an insert at 00:00
  UTC of a new month always finds its partition, and drops the partitions whose whole month is
  older than `retention` (None: keep forever).

Order. All rows form one queue, oldest first:

    in flight (the batch being written)  <  journal segments (by name)  <  memory (a deque)

The writer takes from the front, the spill task moves the front of memory to the back of the
journal, and a batch whose write failed stays in front. Both take `_order` to move rows, so the
queue order is the order of `record()` calls, across outages and restarts: a socket's open is
written before its close. Because every row carries a UUID and every statement is idempotent,
a batch that may or may not have been committed (a timeout, a crash) is simply written again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from app.ledger.errors import Fault, LedgerError, backoff_delays, fault_of
from app.ledger.journal import Journal
from app.ledger.rows import KIND_OF, Row, TurnRecord, encode_line
from app.ledger.statements import plan
from app.metrics import LEDGER_PENDING_ROWS, LEDGER_WRITE_FAILURES_TOTAL, POSTGRES_UP

log = logging.getLogger(__name__)

# How long Postgres may be down before memory is spilled even under the bound.
_SPILL_WHEN_DOWN_AFTER = 2.0
# An idle writer checks its connection this often, so `postgres_up` stays true to life.
_PING_EVERY = 5.0
# Rows left in the spill dir by a process that stopped while this one runs (an admin command).
_ORPHAN_SCAN_EVERY = 30.0
_MAINTAIN_EVERY = 3600.0  # partitions ahead and retention; hourly (a month needs only daily)
_MAINTAIN_RETRY = 60.0  # after a failure (Postgres down at start, say)
_PRUNE_TIMEOUT = 600.0
MONTHS_AHEAD = 2


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclasses.dataclass(slots=True)
class _Segment:
    path: Path
    count: int  # rows in the file not yet known to be written or rejected
    last_seq: int  # 0 for an adopted segment: older than any row of this instance
    rows: list[Row] | None = None  # read when it reaches the front
    offset: int = 0  # rows of `rows` written


@dataclasses.dataclass(slots=True)
class _Batch:
    rows: list[Row]
    segment: _Segment | None  # None: the in-flight slot


class Ledger:
    """The audit ledger of one node. `record()` is the only call on the hot path."""

    def __init__(
        self,
        database_url: str,
        spill_dir: Path,
        *,
        memory_rows: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
        retention: timedelta | None = timedelta(days=365),
        partitions: bool = True,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
    ) -> None:
        if memory_rows < 1 or batch_size < 1 or flush_interval <= 0:
            raise ValueError("expected memory_rows ≥ 1, batch_size ≥ 1 and flush_interval > 0")
        self._database_url = database_url
        self._memory_rows = memory_rows
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retention = retention
        self._partitions = partitions
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._journal = Journal(Path(spill_dir))

        self._state = _State.NEW
        self._stopping = False  # the spill task's signal to end
        self._memory: collections.deque[tuple[int, Row]] = collections.deque()
        self._in_flight: list[Row] = []
        self._in_flight_last_seq = 0
        self._segments: collections.deque[_Segment] = collections.deque()
        self._adopted_segments = 0
        self._order = asyncio.Lock()
        self._seq = 0  # of the last row recorded
        self._done = 0  # every row of this instance with seq ≤ _done is in Postgres
        self._pending = 0
        self._reported = 0  # the part of _pending already added to the gauge

        self._wake = asyncio.Event()  # the writer: a batch is full, or closing
        self._spill_wake = asyncio.Event()  # the spill task: memory is over its bound
        self._progress = asyncio.Event()  # replaced after each commit; waiters hold the old one
        self._conn: asyncpg.Connection | None = None
        self._up = False
        self._down_since: float | None = None
        self._last_io = 0.0
        self._next_orphan_scan = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._spiller: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- the hot path ---------------------------------------------------------------------------

    def record(self, row: Row) -> None:
        """Queue a row for Postgres. Never blocks, never awaits, never raises."""
        try:
            if type(row) not in KIND_OF:
                log.error("ledger: dropped %s, not a ledger row", type(row).__name__)
                return
            self._seq += 1
            self._memory.append((self._seq, row))
            self._pending += 1  # the gauge follows from the background tasks, off the hot path
            if self._state is _State.CLOSED:
                self._spill_after_close()
            elif len(self._memory) > self._memory_rows:
                self._spill_wake.set()
            elif len(self._memory) >= self._batch_size:
                self._wake.set()
        except Exception:  # a ledger fault must never reach the customer's session
            log.exception("ledger: could not queue a row")

    @property
    def pending_rows(self) -> int:
        """Rows recorded (or found in spill files) and not yet in Postgres."""
        return self._pending

    async def unwritten_turns(self) -> list[TurnRecord]:
        """The turn rows not yet known to be in Postgres: the batch being written (it may be
        committed already), the spill files, memory. For a spend counter rebuilt from the
        ledger (app/spend.py), which excludes these rows' ids from its sum and adds them."""
        async with self._order:
            rows: list[Row] = list(self._in_flight)
            for segment in self._segments:
                if segment.rows is None:
                    with contextlib.suppress(FileNotFoundError):
                        found, _ = await asyncio.to_thread(self._journal.read_segment, segment.path)
                        rows += found
                else:
                    rows += segment.rows[segment.offset :]
            rows += [row for _, row in self._memory]
        return [row for row in rows if type(row) is TurnRecord]

    @property
    def postgres_up(self) -> bool:
        """Whether the last Postgres call succeeded."""
        return self._up

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt spill files left by stopped processes, connect, start the background tasks.

        Postgres being down does not fail the start: the writer keeps trying in the background.
        Raises LedgerError only when the spill dir cannot be used.
        """
        if self._state is not _State.NEW:
            return
        adopted = await asyncio.to_thread(self._journal.open)
        self._take_adopted(adopted)
        self._next_orphan_scan = asyncio.get_running_loop().time() + _ORPHAN_SCAN_EVERY
        self._state = _State.RUNNING
        with contextlib.suppress(Exception):
            await self._connect(timeout=min(self._connect_timeout, 2.0))
        self._writer = asyncio.create_task(self._write_loop(), name="ledger-writer")
        self._spiller = asyncio.create_task(self._spill_loop(), name="ledger-spiller")
        self._tasks = [self._writer, self._spiller]
        if self._partitions:
            self._tasks.append(
                asyncio.create_task(self._partition_loop(), name="ledger-partitions")
            )

    async def flushed(self, timeout: float = 5.0) -> bool:
        """Wait until every row recorded so far (and every adopted one) is in Postgres."""
        target = self._seq
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self._wake.set()
        while not self._flushed_through(target):
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            await self._sleep(min(remaining, 0.1), self._progress)
        return True

    def _take_adopted(self, found: list[tuple[Path, int]]) -> None:
        # Another process's rows: no order to keep with ours, so they simply join the journal.
        for path, count in found:
            self._segments.append(_Segment(path=path, count=count, last_seq=0))
            self._pending += count
        self._adopted_segments += len(found)

    async def _adopt_orphans(self) -> None:
        async with self._order:
            try:
                found = await asyncio.to_thread(self._journal.adopt_orphans)
            except OSError as exc:
                log.warning("ledger: could not scan the spill dir: %s", exc)
                return
            self._take_adopted(found)

    def _flushed_through(self, seq: int) -> bool:
        return self._done >= seq and self._adopted_segments == 0

    async def close(self, deadline: float = 10.0) -> None:
        """Write what Postgres takes within `deadline` seconds; spill the rest. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(deadline))
        await asyncio.shield(self._closing)

    async def _close(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        self._state = _State.CLOSING
        if self._writer is not None:
            # Leave time to spill whatever the writer could not write.
            await self._drain(until=end - min(2.0, deadline / 4))
        for task in self._tasks:
            if task is not self._spiller:
                task.cancel()
        self._stopping = True
        self._spill_wake.set()  # the spill task ends after any spill under way
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._in_flight:
            await self._spill_rows(self._in_flight, self._in_flight_last_seq, head=True)
            self._in_flight = []
        await self._spill(keep=0)
        self._drop_connection()
        await asyncio.to_thread(self._journal.close)
        self._state = _State.CLOSED
        if self._memory:  # recorded while the close was under way
            self._spill_after_close()
        self._report()
        log.info("ledger: closed, %d row(s) left in %s", self._pending, self._journal.root)

    async def _drain(self, until: float) -> None:
        loop = asyncio.get_running_loop()
        target = self._seq
        self._wake.set()
        while self._up and not self._flushed_through(target):
            remaining = until - loop.time()
            if remaining <= 0:
                return
            await self._sleep(min(remaining, 0.1), self._progress)

    # -- the writer -----------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        delays = backoff_delays()
        while True:
            self._report()
            try:
                batch = await self._next_batch()
            except Exception:  # the spill dir failed us; the rows stay where they are
                log.exception("ledger: could not read the spill dir")
                await self._sleep(next(delays))
                continue
            if batch is None:
                await self._idle(delays)
                continue
            try:
                conn = await self._connect(timeout=self._connect_timeout)
                rejected = await self._write_batch(conn, batch.rows)
            except Exception as exc:
                LEDGER_WRITE_FAILURES_TOTAL.inc()
                self._mark_down(exc)
                await self._sleep(next(delays))
                continue
            delays = backoff_delays()
            await self._commit(batch, rejected)

    async def _next_batch(self) -> _Batch | None:
        async with self._order:
            if self._in_flight:
                return _Batch(self._in_flight, None)
            while self._segments:
                segment = self._segments[0]
                if segment.rows is None:
                    await self._load(segment)
                assert segment.rows is not None
                if segment.offset < len(segment.rows):
                    end = segment.offset + self._batch_size
                    return _Batch(segment.rows[segment.offset : end], segment)
                await self._finish(segment)
            if self._memory:
                count = min(self._batch_size, len(self._memory))
                entries = [self._memory.popleft() for _ in range(count)]
                self._in_flight = [row for _, row in entries]
                self._in_flight_last_seq = entries[-1][0]
                return _Batch(self._in_flight, None)
            return None

    async def _load(self, segment: _Segment) -> None:
        rows: list[Row] = []
        try:
            rows, _ = await asyncio.to_thread(self._journal.read_segment, segment.path)
        except FileNotFoundError:
            log.error("ledger: spill file %s vanished before it was written", segment.path)
        lost = segment.count - len(rows)  # bad lines went to rejected.jsonl
        if lost:
            self._settle(lost)
        segment.count = len(rows)
        segment.rows = rows

    async def _finish(self, segment: _Segment) -> None:
        self._segments.popleft()
        self._done = max(self._done, segment.last_seq)
        if segment.last_seq == 0:
            self._adopted_segments -= 1
        try:
            await asyncio.to_thread(self._journal.remove_segment, segment.path)
        except OSError as exc:  # its rows are in Postgres; a replay would change nothing
            log.warning("ledger: could not delete spill file %s: %s", segment.path, exc)

    async def _write_batch(self, conn: asyncpg.Connection, rows: list[Row]) -> int:
        """Write rows in one transaction; returns how many Postgres refused for good."""
        try:
            await self._execute(conn, rows)
            return 0
        except Exception as exc:
            if fault_of(exc) is not Fault.POISON:
                raise
            log.warning("ledger: batch refused (%s); writing its rows one by one", exc)
        refused: list[tuple[Any, str]] = []
        for row in rows:
            try:
                await self._execute(conn, [row])
            except Exception as exc:
                if fault_of(exc) is not Fault.POISON:
                    raise
                refused.append((_rejected_form(row), f"{type(exc).__name__}: {exc}"))
        if refused:
            log.error("ledger: %d row(s) refused by Postgres, kept in rejected.jsonl", len(refused))
            await asyncio.to_thread(self._journal.reject, refused)
        return len(refused)

    async def _execute(self, conn: asyncpg.Connection, rows: list[Row]) -> None:
        statements = plan(rows)
        async with asyncio.timeout(self._command_timeout):
            if len(statements) == 1:
                sql, args = statements[0]
                await conn.execute(sql, *args)
            else:
                async with conn.transaction():
                    for sql, args in statements:
                        await conn.execute(sql, *args)
        self._mark_up()

    async def _commit(self, batch: _Batch, rejected: int) -> None:
        if rejected:
            LEDGER_WRITE_FAILURES_TOTAL.inc()
        async with self._order:
            self._settle(len(batch.rows))
            segment = batch.segment
            if segment is None:
                self._in_flight = []
                self._done = max(self._done, self._in_flight_last_seq)
            else:
                segment.offset += len(batch.rows)
                segment.count -= len(batch.rows)
                if segment.offset >= len(segment.rows or ()):
                    await self._finish(segment)
        self._notify()

    def _settle(self, count: int) -> None:
        self._pending -= count

    def _report(self) -> None:
        """Bring `gateway_ledger_pending_rows` up to date, by difference (several Ledgers add)."""
        change = self._pending - self._reported
        if change:
            LEDGER_PENDING_ROWS.inc(change)
            self._reported += change

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _idle(self, delays: Iterator[float]) -> None:
        """Nothing to write: wait for rows; keep the connection (and `postgres_up`) honest."""
        await self._sleep(self._flush_interval, self._wake)
        self._wake.clear()
        if self._memory or self._segments:
            return
        loop = asyncio.get_running_loop()
        if self._up and loop.time() >= self._next_orphan_scan:
            self._next_orphan_scan = loop.time() + _ORPHAN_SCAN_EVERY
            await self._adopt_orphans()
        if self._conn is None:
            if self._down_since is None or loop.time() - self._last_io >= next(delays):
                with contextlib.suppress(Exception):
                    await self._connect(timeout=self._connect_timeout)
        elif loop.time() - self._last_io >= _PING_EVERY:
            try:
                async with asyncio.timeout(self._command_timeout):
                    await self._conn.fetchval("SELECT 1")
                self._mark_up()
            except Exception as exc:
                self._mark_down(exc)

    @staticmethod
    async def _sleep(seconds: float, event: asyncio.Event | None = None) -> None:
        """Sleep, or less if `event` is set.

        Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that arrives as the
        event is set, and close() cancels these tasks exactly when it has just set one.
        """
        if event is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    # -- the connection -------------------------------------------------------------------------

    async def _connect(self, timeout: float) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._last_io = asyncio.get_running_loop().time()
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                self._database_url,
                timeout=timeout,
                server_settings={"application_name": "gateway-ledger"},
            )
        except Exception as exc:
            self._mark_down(exc)
            raise
        self._conn = conn
        self._mark_up()
        return conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            # terminate(), not close(): a polite close can hang on a server that stopped answering.
            self._conn.terminate()
            self._conn = None

    def _mark_up(self) -> None:
        self._last_io = asyncio.get_running_loop().time()
        if not self._up:
            if self._down_since is not None:
                log.warning("ledger: Postgres is back; %d row(s) pending", self._pending)
            self._up = True
            self._down_since = None
            POSTGRES_UP.set(1)

    def _mark_down(self, exc: BaseException) -> None:
        self._drop_connection()
        loop = asyncio.get_running_loop()
        self._last_io = loop.time()
        if self._up or self._down_since is None:
            log.warning(
                "ledger: Postgres unavailable (%s: %s); rows wait in memory, then in %s",
                type(exc).__name__,
                exc,
                self._journal.root,
            )
            self._down_since = loop.time()
        self._up = False
        POSTGRES_UP.set(0)

    # -- spilling -------------------------------------------------------------------------------

    async def _spill_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._report()
            await self._sleep(0.5, self._spill_wake)
            self._spill_wake.clear()
            if self._stopping:
                return
            if len(self._memory) > self._memory_rows:
                # Down to half the bound, so spill files are not one row each.
                await self._spill(keep=self._memory_rows // 2)
            elif (
                self._down_since is not None
                and loop.time() - self._down_since >= _SPILL_WHEN_DOWN_AFTER
                and self._memory
            ):
                await self._spill(keep=0)

    async def _spill(self, keep: int) -> None:
        """Move the oldest rows of memory, all but `keep`, to a new segment at the back."""
        async with self._order:
            count = len(self._memory) - keep
            if count <= 0:
                return
            entries = [self._memory.popleft() for _ in range(count)]
            rows = [row for _, row in entries]
            if not await self._spill_rows(rows, entries[-1][0], head=False):
                self._memory.extendleft(reversed(entries))

    async def _spill_rows(self, rows: list[Row], last_seq: int, *, head: bool) -> bool:
        try:
            path, written = await asyncio.to_thread(self._journal.write_segment, rows, head=head)
        except OSError as exc:
            log.error("ledger: could not spill %d row(s): %s", len(rows), exc)
            return False
        self._settle(len(rows) - written)  # rows that could not be encoded: rejected
        if path is not None:
            segment = _Segment(path=path, count=written, last_seq=last_seq)
            if head:
                self._segments.appendleft(segment)
            else:
                self._segments.append(segment)
        return True

    def _spill_after_close(self) -> None:
        """A row recorded after close(): no task is left to write it, so spill it at once."""
        rows = [row for _, row in self._memory]
        try:
            _, written = self._journal.write_segment(rows)
        except OSError as exc:
            log.error("ledger: lost %d row(s) recorded after close: %s", len(rows), exc)
            written = 0
        self._memory.clear()
        self._settle(len(rows) - written)
        self._report()

    # -- retention ------------------------------------------------------------------------------

    async def _partition_loop(self) -> None:
        while True:
            delay = _MAINTAIN_EVERY
            try:
                created = await ensure_partitions(self._database_url)
                if created:
                    log.info("ledger: created partitions %s", ", ".join(created))
                if self._retention is not None:
                    dropped = await prune(self._database_url, datetime.now(UTC) - self._retention)
                    if dropped:
                        log.info(
                            "ledger: dropped partitions %s (retention %s)",
                            ", ".join(dropped),
                            self._retention,
                        )
            except Exception as exc:
                log.warning("ledger: partition upkeep failed: %s: %s", type(exc).__name__, exc)
                delay = _MAINTAIN_RETRY
            await asyncio.sleep(delay)


def _rejected_form(row: Row) -> Any:
    """A refused row as `rejected.jsonl` keeps it: the journal's form if it encodes, else text."""
    try:
        return orjson.loads(encode_line(row))
    except (TypeError, KeyError, ValueError):
        return repr(row)


async def prune(
    database_url: str, older_than: datetime, *, timeout: float = _PRUNE_TIMEOUT
) -> list[str]:
    """Drop the partitions entirely older than `older_than`; their names (see
    `ledger_drop_partitions` in migrations). Another node doing it at the same time: []."""
    conn: asyncpg.Connection = await asyncpg.connect(database_url, timeout=10.0)
    try:
        # DROP of a partition locks its parent exclusively: waiting behind a long query would
        # queue every writer behind it, so give up after a while and try again next round.
        await conn.execute("SET lock_timeout = '5s'")
        rows = await conn.fetch(
            "SELECT ledger_drop_partitions($1) AS name", older_than, timeout=timeout
        )
        return [str(row["name"]) for row in rows]
    finally:
        await conn.close()


async def ensure_partitions(
    database_url: str, months_ahead: int = MONTHS_AHEAD, *, timeout: float = _PRUNE_TIMEOUT
) -> list[str]:
    """Create the partitions of this month and `months_ahead` more (UTC); the names created."""
    conn: asyncpg.Connection = await asyncpg.connect(database_url, timeout=10.0)
    try:
        rows = await conn.fetch(
            "SELECT ledger_ensure_partitions($1) AS name", months_ahead, timeout=timeout
        )
        return [str(row["name"]) for row in rows]
    finally:
        await conn.close()


__all__ = ["Ledger", "LedgerError", "ensure_partitions", "prune"]
