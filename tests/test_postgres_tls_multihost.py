"""DATABASE_URL forms of CONTRACT.md §1 against real servers: TLS (`sslmode=require`,
`verify-ca` with `sslrootcert`) and several hosts with `target_session_attrs=read-write`, the
first a hot standby. `gateway migrate` runs as a subprocess, as an operator runs it; the node is
the in-process app the other ledger tests use. The servers are throwaway services.PostgresServer
clusters (self-signed certificate from openssl; the standby made with pg_basebackup -R)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import Gateway, Sim, make_tenant
from services import PostgresServer, fresh_database_name
from test_ledger_gateway import _node as node
from test_ledger_gateway import _turns as turns

from app.ledger.migrate import load_migrations
from app.node import NODE

MIGRATE_SECONDS = 60.0


@pytest.fixture(scope="module")
def tls_server() -> Iterator[PostgresServer]:
    with PostgresServer(tls=True) as pg:
        yield pg


@pytest.fixture(scope="module")
def plain_server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with PostgresServer() as primary, PostgresServer(standby_of=primary) as standby:
        yield primary, standby


def gateway_migrate(tmp_path: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    """`gateway migrate` in a clean environment (none of a developer's settings)."""
    ours = ("GATEWAY_", "REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(GATEWAY_ENV="dev", DATABASE_URL=database_url)
    return subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=MIGRATE_SECONDS,
    )


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def readyz(gateway: Gateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(gateway.url("/readyz")) as resp:
        body: dict[str, Any] = orjson.loads(await resp.read())
        return body


# -- TLS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["require", "verify-ca"])
async def test_migrate_and_the_ledger_over_tls(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    tls_server: PostgresServer,
    mode: str,
) -> None:
    query = f"sslmode={mode}"
    if mode == "verify-ca":
        query += f"&sslrootcert={tls_server.ca_file}"
    url = f"{tls_server.dsn_for(fresh_database_name())}?{query}"
    done = await asyncio.to_thread(gateway_migrate, tmp_path, url)
    assert done.returncode == 0, done.stderr[-600:]
    assert done.stdout.startswith(f"migrations applied: {len(load_migrations())}"), done.stdout

    gw = await node(aiohttp_server, redis_url, redis_prefix, url, sim, tmp_path / "spill")
    tenant = await make_tenant(gw.store)
    ids = await turns(gw, tenant.key, 3)
    assert await gw.app[NODE].ledger.flushed(30)
    rows = await fetch(url, "SELECT response_id FROM turns")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)
    # The writer's own connection is a TLS one (and so is the one reading here).
    ssl = await fetch(
        url,
        "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
        " WHERE a.application_name = 'gateway-ledger' OR s.pid = pg_backend_pid()",
    )
    print(f"\nsslmode={mode}: {len(rows)} turns rows; connections {[tuple(r) for r in ssl]}")
    assert {r["application_name"] for r in ssl if r["ssl"]} >= {"gateway-ledger"}
    assert all(r["ssl"] for r in ssl)


async def test_sslmode_require_against_a_server_without_tls_is_an_outage(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    plain_server: PostgresServer,
) -> None:
    """A server that refuses TLS is treated like a Postgres that is away: migrate says so in one
    line; a node serves, /readyz shows postgres false, rows spill; a node with a URL that works
    writes them (once) from the spill directory."""
    plain = plain_server.dsn_for(fresh_database_name())
    url = f"{plain}?sslmode=require"
    done = await asyncio.to_thread(gateway_migrate, tmp_path, url)
    assert done.returncode == 1, done.stderr[-600:]
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.stderr.startswith("gateway migrate: cannot connect to Postgres"), done.stderr
    print(f"\nmigrate: {done.stderr.strip()}")
    assert (await asyncio.to_thread(gateway_migrate, tmp_path, plain)).returncode == 0

    spill = tmp_path / "spill"
    gw = await node(aiohttp_server, redis_url, redis_prefix, url, sim, spill)
    tenant = await make_tenant(gw.store)
    ids = await turns(gw, tenant.key, 3)
    ready = await readyz(gw)
    print(f"/readyz with sslmode=require on a plain server: {ready}")
    assert ready["postgres"] is False and ready["redis"] is True
    assert gw.app[NODE].ledger.pending_rows > 0
    await gw.server.close()  # graceful stop: the rows go to the spill directory
    assert any(p.is_file() and p.stat().st_size for p in spill.rglob("*"))

    again = await node(aiohttp_server, redis_url, redis_prefix, plain, sim, spill)
    assert await again.app[NODE].ledger.flushed(30)
    rows = await fetch(plain, "SELECT response_id FROM turns")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)


# -- several hosts -------------------------------------------------------------------------------


async def test_several_hosts_read_write_finds_the_primary_behind_a_standby(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    primary_and_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, standby = primary_and_standby
    name = fresh_database_name()
    url = (
        f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/{name}"
        "?target_session_attrs=read-write"
    )
    done = await asyncio.to_thread(gateway_migrate, tmp_path, url)
    assert done.returncode == 0, done.stderr[-600:]
    assert done.stdout.startswith(f"migrations applied: {len(load_migrations())}"), done.stdout

    gw = await node(aiohttp_server, redis_url, redis_prefix, url, sim, tmp_path / "spill")
    tenant = await make_tenant(gw.store)
    ids = await turns(gw, tenant.key, 3)
    assert await gw.app[NODE].ledger.flushed(30)
    on_primary = primary.dsn_for(name)
    rows = await fetch(on_primary, "SELECT response_id FROM turns")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)
    writer = await fetch(
        on_primary, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1",
        "gateway-ledger",
    )  # fmt: skip
    on_standby = await fetch(
        standby.dsn_for(name),
        "SELECT pg_is_in_recovery() AS standby, count(*) FILTER (WHERE application_name = $1)"
        " AS writers FROM pg_stat_activity",
        "gateway-ledger",
    )
    print(
        f"\nstandby :{standby.port} first, primary :{primary.port}: {len(rows)} turns rows on "
        f"the primary; ledger connections: primary {writer[0]['n']}, standby "
        f"{on_standby[0]['writers']} (in recovery: {on_standby[0]['standby']})"
    )
    assert writer[0]["n"] == 1
    assert on_standby[0]["standby"] is True and on_standby[0]["writers"] == 0
