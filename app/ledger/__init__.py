"""The audit ledger (CONTRACT.md §6): sockets, turns and admin actions in Postgres.

The only package that runs SQL. Sessions build rows (`rows.py`) and hand them to
`Ledger.record()`, which never blocks; `gateway migrate` calls `migrate()`. See docs/ledger.md.
"""

from app.ledger.errors import LedgerError, MigrationError
from app.ledger.migrate import migrate
from app.ledger.rows import AdminAction, Row, SocketClosed, SocketOpened, TurnRecord
from app.ledger.writer import Ledger, ensure_partitions, prune

__all__ = [
    "AdminAction",
    "Ledger",
    "LedgerError",
    "MigrationError",
    "Row",
    "SocketClosed",
    "SocketOpened",
    "TurnRecord",
    "ensure_partitions",
    "migrate",
    "prune",
]
