"""`gateway migrate`: apply `migrations/NNNN_name.sql` to `DATABASE_URL`, in order, once each.

Safe to run twice and from two nodes at once:
- a missing database is created under an advisory lock in the maintenance database (two nodes
  that both find it missing would otherwise race on CREATE DATABASE), and a creator that does not
  take the lock is tolerated by its SQLSTATE (42P04 duplicate_database, or 23505 when the two
  CREATE DATABASE statements collide inside the catalog);
- the migrations themselves run under a session advisory lock in the target database, so the
  second node waits, then finds everything applied and applies nothing;
- each file runs in its own transaction together with its row in `schema_migrations`, so a
  failed file leaves no trace and is tried again next time. A file whose first line is
  `-- migrate: no-transaction` runs outside one (for CREATE INDEX CONCURRENTLY).

An applied file must not change: its SHA-256 is kept and checked, and a mismatch stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from app.ledger.errors import MigrationError

# `app/migrations`: in the repository a symlink to the top-level `migrations/` (the schema's one
# source), in a wheel its files, as package data.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_NO_TRANSACTION = "-- migrate: no-transaction"
# Advisory lock keys ('gwmigr' and 'gwcrdb' in hex); nothing else in the gateway takes them.
_MIGRATE_LOCK = 0x67776D696772
_CREATE_DB_LOCK = 0x677763726462
_CONNECT_TIMEOUT = 10.0
_CREATED_DATABASE_WAIT = 30.0  # for a standby listed first to replay CREATE DATABASE

_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str
    sha256: str

    @property
    def transactional(self) -> bool:
        return not self.sql.lstrip().startswith(_NO_TRANSACTION)


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files of `directory`, in order. Raises MigrationError on a misnamed file."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    migrations: list[Migration] = []
    numbers: dict[str, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"expected a migration named NNNN_name.sql, got {path.name}")
        number = match.group(1)
        if number in numbers:
            raise MigrationError(
                f"two migrations numbered {number}: {numbers[number]}, {path.name}"
            )
        numbers[number] = path.name
        sql = path.read_text(encoding="utf-8")
        digest = hashlib.sha256(sql.encode("utf-8")).hexdigest()
        migrations.append(Migration(name=path.name, sql=sql, sha256=digest))
    return migrations


async def migrate(database_url: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Bring the database of `database_url` up to date; the names of the files applied now."""
    migrations = load_migrations(migrations_dir)
    conn = await _connect_creating(database_url)
    try:
        return await _apply(conn, migrations)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migration failed: {_describe(exc)}") from exc
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    # Held until the end of this function; the connection's close releases it in any case.
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
    try:
        await conn.execute(_SCHEMA_MIGRATIONS)
        rows = await conn.fetch("SELECT name, sha256 FROM schema_migrations")
        applied: dict[str, str] = {row["name"]: row["sha256"] for row in rows}
        done: list[str] = []
        for migration in migrations:
            known = applied.get(migration.name)
            if known is not None:
                if known != migration.sha256:
                    raise MigrationError(
                        f"{migration.name} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            await _apply_one(conn, migration)
            done.append(migration.name)
        return done
    finally:
        # A broken connection has released the lock already; don't hide the first error.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)


async def _apply_one(conn: asyncpg.Connection, migration: Migration) -> None:
    record = "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)"
    try:
        if migration.transactional:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(record, migration.name, migration.sha256)
        else:
            await conn.execute(migration.sql)
            await conn.execute(record, migration.name, migration.sha256)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{migration.name} failed: {_describe(exc)}") from exc


async def _connect_creating(database_url: str) -> asyncpg.Connection:
    """A connection to the target database, creating the database first if it is missing."""
    try:
        return await _connect(database_url)
    except asyncpg.InvalidCatalogNameError:  # 3D000: the database does not exist
        pass
    await _create_database(database_url, database_name(database_url))
    # With several hosts (`h1,h2/db?target_session_attrs=read-write`) asyncpg tries them in order
    # and gives up at the first server error, trying no further host: a hot standby listed before
    # the primary answers "database does not exist" until it has replayed our CREATE DATABASE (a
    # moment, on a healthy standby). So wait for it a little, then fail in one line.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CREATED_DATABASE_WAIT
    while True:
        try:
            return await _connect(database_url)
        except asyncpg.InvalidCatalogNameError as exc:
            if loop.time() >= deadline:
                raise MigrationError(
                    f"database {database_name(database_url)!r} was created but is still missing "
                    f"at {_where(database_url)} after {_CREATED_DATABASE_WAIT:.0f} s "
                    "(a standby listed before the primary that does not catch up?)"
                ) from exc
            await asyncio.sleep(0.2)


async def _connect(database_url: str, **overrides: Any) -> asyncpg.Connection:
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            database_url, timeout=_CONNECT_TIMEOUT, **overrides
        )
    except asyncpg.InvalidCatalogNameError:
        raise
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise MigrationError(
            f"cannot connect to Postgres at {_where(database_url)}: {_describe(exc)}"
        ) from exc
    return conn


async def _create_database(database_url: str, name: str) -> None:
    conn = await _connect_maintenance(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _CREATE_DB_LOCK)
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f"CREATE DATABASE {_quote_ident(name)}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another creator that does not take our lock got there first
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"cannot create database {name!r}: {_describe(exc)}") from exc
    finally:
        await conn.close()  # also releases the advisory lock


async def _connect_maintenance(database_url: str) -> asyncpg.Connection:
    """The same server and credentials, in `postgres` (or `template1` where that is missing)."""
    try:
        return await _connect(database_url, database="postgres")
    except asyncpg.InvalidCatalogNameError:
        pass
    try:
        return await _connect(database_url, database="template1")
    except asyncpg.InvalidCatalogNameError as exc:
        raise MigrationError(
            f"cannot create the database: no postgres or template1 database at "
            f"{_where(database_url)}"
        ) from exc


def database_name(database_url: str) -> str:
    """The database a URL names, resolved the way libpq (and asyncpg) resolve it."""
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(parts.query)
    name = urllib.parse.unquote(parts.path.lstrip("/"))
    if not name:
        name = (query.get("dbname") or query.get("database") or [""])[0]
    if not name:
        name = os.environ.get("PGDATABASE", "")
    if not name:
        user = urllib.parse.unquote(parts.username or "")
        name = user or (query.get("user") or [""])[0] or os.environ.get("PGUSER", "postgres")
    return name


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _where(database_url: str) -> str:
    """Host, port and database of a URL, never its password."""
    parts = urllib.parse.urlsplit(database_url)
    try:
        where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    except ValueError:  # several hosts with ports (h1:5432,h2:5433): urllib's port refuses them
        where = parts.netloc.rpartition("@")[2]
    return f"{where}/{database_name(database_url)}"


def _describe(exc: BaseException) -> str:
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
