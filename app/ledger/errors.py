"""The ledger's exceptions, how it judges a Postgres failure, and its retry pacing.

    LedgerError              anything the ledger raises to its callers
     └── MigrationError      `migrate()` could not bring the schema up to date

The writer never raises to the session: it judges each failure with `fault_of`, by SQLSTATE class
(never by message text), as either

- TRANSIENT: Postgres is away, slow, restarting, short of resources, or not migrated yet. The
  rows wait (memory, then spill files) and the batch is tried again after `backoff_delays`.
- POISON: Postgres refuses these very rows (a bad value, a CHECK). Retrying cannot help, so the
  writer isolates the offending rows one by one and sets them aside in `rejected.jsonl`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator

import asyncpg


class LedgerError(Exception):
    """Base of the ledger's own exceptions."""


class MigrationError(LedgerError):
    """The schema could not be brought up to date; the message is one line for an operator."""


class Fault(enum.Enum):
    TRANSIENT = "transient"
    POISON = "poison"


# SQLSTATE classes in which Postgres judges the data itself: retrying the same rows cannot work.
#   21 cardinality violation, 22 data exception, 23 integrity constraint violation.
_POISON_CLASSES = frozenset({"21", "22", "23"})


def fault_of(exc: BaseException) -> Fault:
    """Whether a failed write may succeed later as it is (TRANSIENT) or never will (POISON)."""
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        return Fault.POISON if sqlstate[:2] in _POISON_CLASSES else Fault.TRANSIENT
    if isinstance(exc, asyncpg.DataError):
        # asyncpg could not encode an argument: a value of the wrong type in a row.
        return Fault.POISON
    # Connection refused or reset, timeouts, a closed connection, unknown client trouble: the
    # rows themselves are not to blame, so they wait.
    return Fault.TRANSIENT


def backoff_delays(base: float = 0.05, cap: float = 2.0) -> Iterator[float]:
    """Jittered exponential delays: base, 2·base, … up to cap, each scaled by 0.5–1.0.

    The jitter keeps the nodes of a fleet from reconnecting in lockstep after an outage; the cap
    is low because a ledger that is back should drain its journal soon.
    """
    ceiling = base
    while True:
        yield ceiling * random.uniform(0.5, 1.0)
        ceiling = min(cap, ceiling * 2)
