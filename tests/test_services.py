"""The test-suite's own services: throwaway Redis/PostgreSQL, fresh databases and key prefixes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import services

CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _pid_alive(p)]


@pytest.fixture(scope="module")
def postgres() -> Iterator[services.PostgresServer]:
    with services.PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def admin_dsn() -> str:
    return services.postgres_dsn()


@pytest.fixture(scope="module")
def shared_redis_url() -> str:
    return services.redis_url()


# -- probes


def test_probes_say_no_on_a_closed_port() -> None:
    assert not services.redis_answers("127.0.0.1", 1)
    assert not services.postgres_answers("127.0.0.1", 1)


def test_postgres_probe_says_no_to_redis_and_redis_probe_no_to_postgres(
    postgres: services.PostgresServer,
) -> None:
    with services.RedisServer() as redis_server:
        assert not services.postgres_answers("127.0.0.1", redis_server.port, timeout=0.5)
    assert not services.redis_answers("127.0.0.1", postgres.port, timeout=0.5)


# -- throwaway servers


async def test_throwaway_redis_serves_stops_and_restarts_on_the_same_port() -> None:
    with services.RedisServer() as server:
        port = server.port
        client = aioredis.Redis.from_url(server.url)
        try:
            assert await client.ping()
            await client.set("gwtest:k", "v")
            assert await client.get("gwtest:k") == b"v"
        finally:
            await client.aclose()

        server.stop()
        assert not server.running
        assert not services.redis_answers("127.0.0.1", port)

        server.start()
        assert server.port == port
        assert services.redis_answers("127.0.0.1", port)

        server.freeze()  # hangs instead of refusing
        assert not services.redis_answers("127.0.0.1", port, timeout=0.3)
        server.thaw()
        assert services.redis_answers("127.0.0.1", port)
        directory = server.dir
    assert not server.running
    assert not directory.exists()


async def test_throwaway_postgres_outage_keeps_port_and_data(
    postgres: services.PostgresServer,
) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres"
        await conn.execute("CREATE TABLE outage (n int); INSERT INTO outage VALUES (1), (2)")
    finally:
        await conn.close()
    port = postgres.port

    postgres.stop()
    assert not postgres.running
    with pytest.raises(OSError):
        await asyncpg.connect(postgres.dsn, timeout=2)

    postgres.start()
    assert postgres.port == port
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SELECT sum(n) FROM outage") == 3
    finally:
        await conn.close()


def test_postgres_binaries_are_found() -> None:
    bindir = services.find_postgres_bindir()
    assert (bindir / "initdb").exists()
    assert (bindir / "postgres").exists()


# -- choosing servers


def test_env_urls_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_REDIS_URL", "redis://example.invalid:1/3")
    monkeypatch.setenv("TEST_DATABASE_URL", "postgresql://u@example.invalid:1/db")
    assert services.resolve_redis_url() == ("redis://example.invalid:1/3", None)
    assert services.resolve_postgres_dsn() == ("postgresql://u@example.invalid:1/db", None)


def test_running_machine_services_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_REDIS_URL", raising=False)
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.delenv("TEST_PROBE_REDIS", raising=False)
    monkeypatch.delenv("TEST_PROBE_POSTGRES", raising=False)
    if not services.redis_answers("127.0.0.1", 6379):
        pytest.skip("no Redis on 127.0.0.1:6379")
    if not services.postgres_answers("127.0.0.1", 5432):
        pytest.skip("no trust-auth PostgreSQL on 127.0.0.1:5432")
    assert services.resolve_redis_url() == ("redis://127.0.0.1:6379/0", None)
    assert services.resolve_postgres_dsn() == (
        "postgresql://postgres@127.0.0.1:5432/postgres",
        None,
    )


async def test_session_generators_start_and_stop_throwaways_when_nothing_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_REDIS_URL", raising=False)
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    monkeypatch.setenv("TEST_PROBE_REDIS", CLOSED)
    monkeypatch.setenv("TEST_PROBE_POSTGRES", CLOSED)
    monkeypatch.setattr(services, "_resolved", {})

    redis_gen = services.session_redis_url()
    pg_gen = services.session_postgres_admin_dsn()
    url = next(redis_gen)
    dsn = next(pg_gen)
    try:
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url)
        assert url != "redis://127.0.0.1:6379/0"
        assert services.redis_url() == url  # resolved once per process
        client = aioredis.Redis.from_url(url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()

        assert ":5432/" not in dsn
        assert services.postgres_dsn() == dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        for gen in (redis_gen, pg_gen):
            with pytest.raises(StopIteration):
                next(gen)
    redis_port = int(url.rsplit(":", 1)[1].split("/")[0])
    pg_port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    assert not services.redis_answers("127.0.0.1", redis_port)
    assert not services.postgres_answers("127.0.0.1", pg_port)


# -- fresh data


async def test_fresh_database_is_new_usable_and_dropped(admin_dsn: str) -> None:
    dsn, drop = await services.fresh_database_async(admin_dsn)
    other, drop_other = await services.fresh_database_async(admin_dsn)
    try:
        name = dsn.rsplit("/", 1)[1]
        assert re.fullmatch(r"gwtest_[0-9a-f]{32}", name)
        assert other != dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == name
            tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            assert await conn.fetchval(tables) == 0
            await conn.execute("CREATE TABLE t (x int)")
        finally:
            await conn.close()
    finally:
        await drop()
        await drop_other()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(dsn)
    await drop()  # idempotent


async def test_fresh_database_drop_forces_out_open_connections(admin_dsn: str) -> None:
    dsn, drop = await services.fresh_database_async(admin_dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await drop()
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(dsn)


def test_fresh_database_blocking_and_uncreated(admin_dsn: str) -> None:
    dsn, drop = services.fresh_database(admin_dsn)
    try:
        assert services.run_blocking(_current_database(dsn)) == dsn.rsplit("/", 1)[1]
    finally:
        drop()

    missing, drop_missing = services.fresh_database(admin_dsn, create=False)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        services.run_blocking(_current_database(missing))
    drop_missing()


async def _current_database(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT current_database()"))
    finally:
        await conn.close()


async def test_drop_database_refuses_other_databases(admin_dsn: str) -> None:
    for name in ("postgres", "gateway", "gwtest_", "gwtest_x; DROP", admin_dsn):
        with pytest.raises(ValueError):
            await services.drop_database(admin_dsn, name)


async def test_fresh_prefix_and_delete_prefix(shared_redis_url: str) -> None:
    prefix, neighbour = services.fresh_redis_prefix(), services.fresh_redis_prefix()
    assert re.fullmatch(r"gwtest:[0-9a-f]{32}", prefix)
    assert prefix != neighbour
    client = aioredis.Redis.from_url(shared_redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(1200):
                pipe.set(f"{prefix}:k{i}", i)
            pipe.set(f"{neighbour}:keep", 1)
            await pipe.execute()

        assert await services.delete_prefix(shared_redis_url, prefix) == 1200
        assert [k async for k in client.scan_iter(match=f"{prefix}*")] == []
        assert await client.get(f"{neighbour}:keep") == b"1"
        assert await services.delete_prefix(shared_redis_url, neighbour) == 1
    finally:
        await client.aclose()


async def test_delete_prefix_refuses_foreign_prefixes(shared_redis_url: str) -> None:
    for prefix in ("", "gwtest:", "gateway:", "*"):
        with pytest.raises(ValueError):
            await services.delete_prefix(shared_redis_url, prefix)


# -- nothing left behind


def _child(body: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(services.__file__).parent)!r})
        import services
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _read_ready(child: subprocess.Popen[str]) -> tuple[list[int], list[Path]]:
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if not line or line[0] != "READY":
        child.kill()
        _, err = child.communicate(timeout=10)
        pytest.fail(f"child did not start its servers: {line} {err}")
    pids = [int(p) for p in line[1:3]]
    dirs = [Path(d) for d in line[3:5]]
    return pids, dirs


START_BOTH = """
r = services.RedisServer().start()
p = services.PostgresServer().start()
print("READY", r.pid, p.pid, r.dir, p.dir, flush=True)
"""


def test_servers_stop_at_interpreter_exit() -> None:
    child = _child(START_BOTH + "sys.stdin.read()\n")  # stdin is /dev/null: exits at once
    pids, dirs = _read_ready(child)
    assert child.wait(timeout=30) == 0
    assert _wait_gone(pids, 5) == []
    assert not any(d.exists() for d in dirs)


def test_servers_stop_when_the_interpreter_is_killed() -> None:
    child = _child(START_BOTH + "time.sleep(60)\n")
    pids, dirs = _read_ready(child)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert _wait_gone(pids, 15) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(d.exists() for d in dirs):
        time.sleep(0.05)
    assert not any(d.exists() for d in dirs)
