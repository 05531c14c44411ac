"""The four kinds of ledger row, and their journal encoding.

Rows are plain dataclasses, not frozen: the session builds one per event on the hot path (a
frozen one's `__init__` sets each field through `object.__setattr__`: 2.7 us for a turn's 23
fields against 0.85 us), and nothing changes a row once recorded. Nor slotted: orjson writes a
dataclass from its instance `__dict__` in one pass, a slotted one field by field through
`getattr` (a turn's row for the ledger's statement: 2.6 us against 1.5 us). They do no
validation of their own (Postgres' CHECK constraints and column types do, in the writer, off the
hot path; a row they refuse goes to the spill dir's `rejected.jsonl` rather than blocking the
queue).

Every row carries `row_id`, a UUID made when the row is built: it is the idempotency key that
lets the writer replay a batch (after a timeout, a crash or a journal replay) without writing
anything twice.

Journal lines are JSON objects `{"k": <kind>, "r": {<fields>}}`; `decode_line` turns one back
into the same row. Times are RFC 3339 with their offset, `cost_usd` a decimal string.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import orjson

from app import ids


def _new_row_id() -> uuid.UUID:
    return ids.uuid4()


@dataclasses.dataclass(kw_only=True)
class SocketOpened:
    """A client WebSocket accepted by this node."""

    socket_id: str
    node: str
    key_id: str
    key_prefix: str
    team_id: str
    model: str | None
    opened_at: datetime
    row_id: uuid.UUID = dataclasses.field(default_factory=_new_row_id)


@dataclasses.dataclass(kw_only=True)
class SocketClosed:
    """The end of a client WebSocket; fills in the socket row `SocketOpened` made."""

    socket_id: str
    closed_at: datetime
    closed_by: Literal["client", "gateway"]
    close_code: int | None
    close_reason: str
    upstream_close_code: int | None = None
    upstream_close_reason: str | None = None
    turns: int = 0
    model: str | None = None
    # The socket row's partition key (sockets are partitioned by month on opened_at). None only
    # in a close spilled before partitioning; the statement then looks it up.
    opened_at: datetime | None = None
    row_id: uuid.UUID = dataclasses.field(default_factory=_new_row_id)


@dataclasses.dataclass(kw_only=True)
class TurnRecord:
    """One `response.create` (accepted or refused), `POST /v1/responses` or compaction."""

    socket_id: str | None
    node: str
    key_id: str
    key_prefix: str
    team_id: str
    transport: Literal["ws", "http", "compact"]
    model: str | None
    received_at: datetime
    accepted: bool
    error_code: str | None = None
    response_id: str | None = None
    status: str | None = None
    previous_response_id: str | None = None
    retried: bool = False
    http_fallback: bool = False
    memory_bound_exceeded: bool = False
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: Decimal | None = None
    ttfe_ms: float | None = None
    duration_ms: float | None = None
    row_id: uuid.UUID = dataclasses.field(default_factory=_new_row_id)


@dataclasses.dataclass(kw_only=True)
class AdminAction:
    """One admin write, from the API or the shell."""

    actor: str
    remote_addr: str | None
    action: str
    target: str
    at: datetime
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    row_id: uuid.UUID = dataclasses.field(default_factory=_new_row_id)


Row = SocketOpened | SocketClosed | TurnRecord | AdminAction

# The journal's name for each kind; never change one (old spill files name them).
KIND_OF: dict[type[Any], str] = {
    SocketOpened: "socket_opened",
    SocketClosed: "socket_closed",
    TurnRecord: "turn",
    AdminAction: "admin_action",
}
_CLASS_OF: dict[str, type[Any]] = {kind: cls for cls, kind in KIND_OF.items()}

# Fields that JSON cannot carry as themselves, and how to read them back.
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "row_id": uuid.UUID,
    "opened_at": datetime.fromisoformat,
    "closed_at": datetime.fromisoformat,
    "received_at": datetime.fromisoformat,
    "at": datetime.fromisoformat,
    "cost_usd": Decimal,
}


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    # Whatever else hides in `AdminAction.details` is kept as text rather than refused.
    return str(value)


def encode_line(row: Row) -> bytes:
    """One journal line (with its newline). Raises TypeError for an object that is not a row."""
    kind = KIND_OF[type(row)]
    return orjson.dumps(
        {"k": kind, "r": row},
        default=_json_default,
        option=orjson.OPT_APPEND_NEWLINE,
    )


def decode_line(line: bytes) -> Row:
    """The row of one journal line. Raises ValueError (or KeyError, TypeError) on a bad line."""
    obj = orjson.loads(line)
    cls = _CLASS_OF[obj["k"]]
    fields: dict[str, Any] = obj["r"]
    for name, value in fields.items():
        decoder = _DECODERS.get(name)
        if decoder is not None and value is not None:
            fields[name] = decoder(value)
    row: Row = cls(**fields)
    return row
