"""The SQL the writer runs: one statement per kind of row per batch.

A batch of one kind travels as a single JSON array parameter and is inserted with
`SELECT … FROM json_to_recordset($1::json) AS r(<column> <type>, …)`: one round trip, one
parameter, whatever the batch size. orjson serializes the dataclasses in C and Postgres parses
them in C: 1.5 times the rows per second of binding one array per column, where asyncpg
checks every element in Python (scripts/bench_ledger.py). Postgres converts each field to its
column type, so a bad value fails as a SQLSTATE class 22 error: the writer's refused row.

Idempotency, which makes replays harmless. The tables are partitioned by month on their time
column (migrations/0002_partitions.sql), and a unique key must include it, so each key is
(id, time); every row carries its time and a replay carries the same one, so this is as
exactly-once as the id alone was:
- turns and admin actions: `ON CONFLICT (row_id, <time>) DO NOTHING`;
- sockets: one row per socket, keyed by (socket_id, opened_at), filled in two halves; the close
  carries the socket's opened_at (a close spilled before partitioning, without one, takes it
  from the open half already written, if any). An open fills the open half only while
  `open_row_id` is NULL, a close the close half only while `close_row_id` is NULL, each by upsert,
  so either may land first (a close replayed from a journal before its open, say) and a replayed
  half changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import orjson

from app.ledger.rows import AdminAction, Row, SocketClosed, SocketOpened, TurnRecord

Statement = tuple[str, list[Any]]

# (table column, row field, Postgres type), in table order.
_OPEN_COLUMNS = (
    ("socket_id", "socket_id", "text"),
    ("open_row_id", "row_id", "uuid"),
    ("node", "node", "text"),
    ("key_id", "key_id", "text"),
    ("key_prefix", "key_prefix", "text"),
    ("team_id", "team_id", "text"),
    ("model", "model", "text"),
    ("opened_at", "opened_at", "timestamptz"),
)
_CLOSE_COLUMNS = (
    ("socket_id", "socket_id", "text"),
    ("close_row_id", "row_id", "uuid"),
    ("closed_at", "closed_at", "timestamptz"),
    ("closed_by", "closed_by", "text"),
    ("close_code", "close_code", "integer"),
    ("close_reason", "close_reason", "text"),
    ("upstream_close_code", "upstream_close_code", "integer"),
    ("upstream_close_reason", "upstream_close_reason", "text"),
    ("turns", "turns", "integer"),
    ("model", "model", "text"),
    ("opened_at", "opened_at", "timestamptz"),
)
# A close without opened_at (spilled before partitioning) finds it in its socket's open half.
_FILL = {
    "opened_at": "COALESCE(r.opened_at, (SELECT s.opened_at FROM sockets AS s "
    "WHERE s.socket_id = r.socket_id AND s.opened_at IS NOT NULL LIMIT 1))"
}
_TURN_COLUMNS = tuple(
    (name, name, pgtype)
    for name, pgtype in (
        ("row_id", "uuid"),
        ("socket_id", "text"),
        ("node", "text"),
        ("key_id", "text"),
        ("key_prefix", "text"),
        ("team_id", "text"),
        ("transport", "text"),
        ("model", "text"),
        ("received_at", "timestamptz"),
        ("accepted", "boolean"),
        ("error_code", "text"),
        ("response_id", "text"),
        ("status", "text"),
        ("previous_response_id", "text"),
        ("retried", "boolean"),
        ("http_fallback", "boolean"),
        ("memory_bound_exceeded", "boolean"),
        ("input_tokens", "integer"),
        ("cached_tokens", "integer"),
        ("output_tokens", "integer"),
        ("reasoning_tokens", "integer"),
        ("cost_usd", "numeric"),
        ("ttfe_ms", "double precision"),
        ("duration_ms", "double precision"),
    )
)
_ADMIN_COLUMNS = tuple(
    (name, name, pgtype)
    for name, pgtype in (
        ("row_id", "uuid"),
        ("actor", "text"),
        ("remote_addr", "text"),
        ("action", "text"),
        ("target", "text"),
        ("at", "timestamptz"),
        ("details", "jsonb"),
    )
)

Columns = tuple[tuple[str, str, str], ...]


def _insert(table: str, columns: Columns, tail: str, fill: dict[str, str] | None = None) -> str:
    names = ", ".join(column for column, _, _ in columns)
    fields = ", ".join((fill or {}).get(column, f"r.{field}") for column, field, _ in columns)
    record = ", ".join(f"{field} {pgtype}" for _, field, pgtype in columns)
    return (
        f"INSERT INTO {table} ({names}) SELECT {fields} "
        f"FROM json_to_recordset($1::json) AS r({record}) {tail}"
    )


def _set(columns: Columns, special: dict[str, str]) -> str:
    assignments = []
    for column, _, _ in columns[1:]:  # never the conflict key
        if column == "opened_at":  # the partition key, part of the conflict key
            continue
        value = special.get(column, f"EXCLUDED.{column}")
        assignments.append(f"{column} = {value}")
    return ", ".join(assignments)


OPEN_SQL = _insert(
    "sockets",
    _OPEN_COLUMNS,
    "ON CONFLICT (socket_id, opened_at) DO UPDATE SET "
    + _set(_OPEN_COLUMNS, {"model": "COALESCE(sockets.model, EXCLUDED.model)"})
    + " WHERE sockets.open_row_id IS NULL",
)
CLOSE_SQL = _insert(
    "sockets",
    _CLOSE_COLUMNS,
    "ON CONFLICT (socket_id, opened_at) DO UPDATE SET "
    + _set(_CLOSE_COLUMNS, {"model": "COALESCE(EXCLUDED.model, sockets.model)"})
    + " WHERE sockets.close_row_id IS NULL",
    _FILL,
)
TURN_SQL = _insert("turns", _TURN_COLUMNS, "ON CONFLICT (row_id, received_at) DO NOTHING")
ADMIN_SQL = _insert("admin_actions", _ADMIN_COLUMNS, "ON CONFLICT (row_id, at) DO NOTHING")


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: Postgres reads it into numeric as written
    return str(value)  # whatever hides in AdminAction.details is kept as text


def _json(rows: Sequence[Row]) -> str:
    # Naive datetimes are taken as UTC (the gateway's times are UTC; asyncpg would say local).
    text = orjson.dumps(list(rows), default=_json_default, option=orjson.OPT_NAIVE_UTC).decode()
    # Postgres text and json cannot hold NUL (SQLSTATE 22P05); a client can send one in a string
    # the ledger keeps (previous_response_id, a refused model). U+FFFD keeps the row.
    return text.replace("\\u0000", "\\ufffd")


def plan(rows: Sequence[Row]) -> list[Statement]:
    """The statements that write `rows`: at most one per kind, opens before closes.

    Duplicates inside the batch are dropped here (an upsert may not touch one row twice in one
    statement): the first row per `row_id`, and per socket the first open and the first close,
    as the idempotency guards would keep.
    """
    opens: dict[str, SocketOpened] = {}
    closes: dict[str, SocketClosed] = {}
    turns: dict[Any, TurnRecord] = {}
    admins: dict[Any, AdminAction] = {}
    for row in rows:
        if isinstance(row, TurnRecord):
            turns.setdefault(row.row_id, row)
        elif isinstance(row, SocketOpened):
            opens.setdefault(row.socket_id, row)
        elif isinstance(row, SocketClosed):
            closes.setdefault(row.socket_id, row)
        else:
            admins.setdefault(row.row_id, row)
    statements: list[Statement] = []
    if opens:
        statements.append((OPEN_SQL, [_json(list(opens.values()))]))
    if closes:
        statements.append((CLOSE_SQL, [_json(list(closes.values()))]))
    if turns:
        statements.append((TURN_SQL, [_json(list(turns.values()))]))
    if admins:
        statements.append((ADMIN_SQL, [_json(list(admins.values()))]))
    return statements
