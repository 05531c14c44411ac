"""Spend sums from the ledger, for counters Redis no longer holds (app/spend.py).

Sums are in nano-USD, each row's `cost_usd` rounded to the nearest one first, the way the
gateway rounds a response's cost before adding it to a counter: a rebuilt counter then equals
the one it replaces. Rows the caller still holds unwritten are excluded by id (they may be
committed and still in the writer's hands) and added by the caller.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime

import asyncpg

_TEAM = """
SELECT COALESCE(SUM(round(cost_usd * 1000000000)) FILTER (WHERE received_at >= $3), 0)::bigint,
       COALESCE(SUM(round(cost_usd * 1000000000)), 0)::bigint
FROM turns
WHERE team_id = $1 AND received_at >= $2 AND received_at < $4 AND cost_usd IS NOT NULL
  AND NOT (row_id = ANY($5::uuid[]))
"""
_KEYS = """
SELECT key_id, COALESCE(SUM(round(cost_usd * 1000000000)), 0)::bigint
FROM turns
WHERE key_id = ANY($1::text[]) AND received_at >= $2 AND received_at < $3
  AND cost_usd IS NOT NULL AND NOT (row_id = ANY($4::uuid[]))
GROUP BY key_id
"""


class SpendSums:
    """One connection, opened when first needed and again after a failure; one query at a time
    (rebuilds are rare: a team's first turn of a day, or after Redis lost its counters)."""

    def __init__(self, database_url: str, *, timeout: float = 5.0) -> None:
        self._database_url = database_url
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def team(
        self,
        team_id: str,
        month: tuple[datetime, datetime],
        day_start: datetime,
        exclude: Sequence[uuid.UUID],
    ) -> tuple[int, int]:
        """The team's spend today and this month, in nano-USD."""
        row = await self._fetch(_TEAM, team_id, month[0], day_start, month[1], list(exclude))
        return int(row[0][0]), int(row[0][1])

    async def keys(
        self, key_ids: Sequence[str], day: tuple[datetime, datetime], exclude: Sequence[uuid.UUID]
    ) -> dict[str, int]:
        """Each key's spend today, in nano-USD."""
        rows = await self._fetch(_KEYS, list(key_ids), day[0], day[1], list(exclude))
        found = {str(r[0]): int(r[1]) for r in rows}
        return {key_id: found.get(key_id, 0) for key_id in key_ids}

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self._lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._database_url,
                        timeout=self._timeout,
                        command_timeout=self._timeout,
                        server_settings={"application_name": "gateway-spend"},
                    )
                return list(await self._conn.fetch(sql, *args))
            except BaseException:
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), 2.0)
                except Exception:
                    conn.terminate()
