"""REDIS_URL and DATABASE_URL at start-up (CONTRACT.md §1): a value that cannot be parsed fails
`gateway serve`, `gateway migrate` and the admin commands with one line naming the variable, no
traceback, exit non-zero; a well-formed one whose server does not answer is an outage, not a bad
value. The commands run as real subprocesses, as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from app import dsn
from app.config import ConfigError, DatabaseSettings, RedisSettings, load

SECRET = "s3cret-pw"  # must never reach stderr
# A bad value is judged before anything starts; a command still running after this is a fail.
EXIT_SECONDS = 10.0
START_SECONDS = 30.0

BAD_REDIS = [
    "nonsense",
    "http://x",
    "redis://host:notaport",
    "redis://127.0.0.1:99999/0",
    f"redis://u:{SECRET}@127.0.0.1:6379/0?no_such_option=1",
    "redis://127.0.0.1:6379/0?socket_timeout=soon",
    "unix://",
]
BAD_DATABASE = [
    "nonsense",
    "http://x",
    "host=127.0.0.1 dbname=gateway",  # libpq's keyword/value form: asyncpg takes URLs only
    "postgresql://h:99999/db",
    f"postgresql://u:{SECRET}@h:notaport/db",
    "postgresql://h/db?sslmode=bogus",
    "postgresql://h1,,h2/db",
    "postgresql://h1,h2/db?target_session_attrs=writable",
]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The environment of a `gateway` subprocess: none of a developer's settings, a dev node on
    any free port, and `values`."""
    ours = ("GATEWAY_", "REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "PG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(
        GATEWAY_ENV="dev",
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT="0",
        GATEWAY_SPILL_DIR=str(tmp_path / "spill"),
        **values,
    )
    return env


def gateway(tmp_path: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "app", *argv],
            cwd=tmp_path,  # no .env of a developer's checkout
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXIT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise AssertionError(
            f"`gateway {' '.join(argv)}` still running after {EXIT_SECONDS:.0f} s; "
            f"stderr: {err[:400]!r}"
        ) from None


def assert_one_line(done: subprocess.CompletedProcess[str], variable: str) -> None:
    assert done.returncode != 0, (done.stdout[-400:], done.stderr[-400:])
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[-600:]
    assert variable in lines[0], lines[0]
    assert SECRET not in done.stderr
    assert done.stdout == ""


@pytest.fixture
def good(redis_url: str, redis_prefix: str, database_url: str) -> dict[str, str]:
    """The suite's own services, for the variable a case does not spoil."""
    return {
        "REDIS_URL": redis_url,
        "GATEWAY_REDIS_PREFIX": redis_prefix,
        "DATABASE_URL": database_url,
    }


@pytest.mark.parametrize("value", BAD_REDIS)
def test_serve_refuses_a_bad_redis_url_in_one_line(
    tmp_path: Path, good: dict[str, str], value: str
) -> None:
    env = command_env(tmp_path, **{**good, "REDIS_URL": value})
    assert_one_line(gateway(tmp_path, env, "serve"), "REDIS_URL")


@pytest.mark.parametrize("value", BAD_DATABASE)
def test_serve_refuses_a_bad_database_url_in_one_line(
    tmp_path: Path, good: dict[str, str], value: str
) -> None:
    env = command_env(tmp_path, **{**good, "DATABASE_URL": value})
    assert_one_line(gateway(tmp_path, env, "serve"), "DATABASE_URL")


@pytest.mark.parametrize("value", BAD_DATABASE)
def test_migrate_refuses_a_bad_database_url_in_one_line(tmp_path: Path, value: str) -> None:
    env = command_env(tmp_path, DATABASE_URL=value)
    assert_one_line(gateway(tmp_path, env, "migrate"), "DATABASE_URL")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("REDIS_URL", v) for v in BAD_REDIS[:3]] + [("DATABASE_URL", v) for v in BAD_DATABASE[:4]],
)
def test_admin_commands_refuse_a_bad_url_in_one_line(
    tmp_path: Path, good: dict[str, str], variable: str, value: str
) -> None:
    env = command_env(tmp_path, **{**good, variable: value})
    assert_one_line(gateway(tmp_path, env, "teams", "list"), variable)


def test_migrate_with_postgres_away_is_one_line(tmp_path: Path) -> None:
    """Several hosts with ports, none answering: an outage, told in migrate's own line."""
    one, two = closed_port(), closed_port()
    url = f"postgresql://postgres@127.0.0.1:{one},127.0.0.1:{two}/gw?sslmode=prefer"
    done = gateway(tmp_path, command_env(tmp_path, DATABASE_URL=url), "migrate")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.stderr.startswith("gateway migrate: cannot connect to Postgres at 127.0.0.1:")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("redis_form", "database_form"),
    [
        ("redis://127.0.0.1:{p}/0", "postgresql://postgres@127.0.0.1:{p}/gw"),
        (
            "rediss://:pw@127.0.0.1:{p}/3?ssl_cert_reqs=none",
            "postgresql://127.0.0.1:{p},127.0.0.1:{q}/gw?target_session_attrs=read-write"
            "&sslmode=require",
        ),
    ],
)
async def test_serve_starts_while_its_servers_are_away(
    tmp_path: Path, redis_form: str, database_form: str
) -> None:
    """Well-formed URLs of servers that do not answer: an outage; /readyz tells it."""
    env = command_env(
        tmp_path,
        REDIS_URL=redis_form.format(p=closed_port()),
        DATABASE_URL=database_form.format(p=closed_port(), q=closed_port()),
        GATEWAY_REDIS_PREFIX="gwtest:never-reached",
    )
    out = tmp_path / "stdout.log"
    with out.open("wb") as stdout:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.DEVNULL,
        )
    try:
        base = await _listening(proc, out)
        async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
            assert resp.status == 503
            body = orjson.loads(await resp.read())
        assert body == {"redis": False, "postgres": False, "draining": False}
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), START_SECONDS) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _listening(proc: asyncio.subprocess.Process, out: Path) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_SECONDS
    while loop.time() < deadline and proc.returncode is None:
        for line in (await asyncio.to_thread(out.read_text)).splitlines():
            if line.startswith("gateway listening on "):
                return line.split()[-1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"gateway serve did not start (exit {proc.returncode})")


# -- the values themselves, against the clients that will use them --------------------------------

GOOD_DATABASE = [
    "postgresql://postgres@127.0.0.1:{p}/gateway",
    "postgres://u:p%40ss@127.0.0.1:{p}/gateway",
    "POSTGRESQL://127.0.0.1:{p}/gateway",
    "postgresql://127.0.0.1:{p},127.0.0.1:{q}/gw?target_session_attrs=read-write",
    "postgresql://127.0.0.1:{p},127.0.0.1/gw?sslmode=require&ssl_min_protocol_version=TLSv1.3",
    "postgresql://[::1]:{p}/gw?sslmode=disable&application_name=gw",
    "postgresql:///gw?host=127.0.0.1&port={p}",
    "postgresql:///gw?host=127.0.0.1,127.0.0.1&port={p},{q}&sslmode=allow",
    "postgresql://%2Ftmp%2Fno-such-dir/gw",
]
# Each also fails in asyncpg before any connection, or fails every connection the same way
# (a port out of range, an empty host): not an outage that could end.
BAD_DATABASE_MORE = [
    "postgresql:gateway",  # libpq and asyncpg's docs both want `postgresql://`
    "postgresql://h:0/db",
    "postgresql://:5432/db",
    "postgresql://h/db?sslmode",
    "postgresql://h/db?sslnegotiation=direct",
    "postgresql://h/db?sslnegotiation=direct&sslmode=allow",
    "postgresql://h/db?ssl_min_protocol_version=SSLv3",
    "postgresql://h/db?gsslib=kerberos",
    "postgresql:///db?host=h1,h2&port=1,2,3",
    "postgresql://[::1/db",
]
GOOD_REDIS = [
    "redis://127.0.0.1:{p}/0",
    "redis://:pw@127.0.0.1:{p}",
    "rediss://user:pw@127.0.0.1:{p}/2?ssl_cert_reqs=none",
    "redis://127.0.0.1:{p}/0?socket_timeout=2&health_check_interval=10&max_connections=8",
    "unix:///tmp/no-such-dir/redis.sock?db=1",
]
BAD_REDIS_MORE = [
    "redis:127.0.0.1",
    "redis://h:0",
    "rediss://h?ssl_cert_reqs=sometimes",
    "redis://h/0?protocol=4",
    "redis://h/0?db=first",
]


def _filled(form: str) -> str:
    return form.format(p=closed_port(), q=closed_port())


@pytest.mark.parametrize("form", GOOD_DATABASE)
async def test_database_urls_asyncpg_takes_are_accepted(form: str) -> None:
    url = _filled(form)
    assert load(DatabaseSettings, DATABASE_URL=url).database_url == url
    with pytest.raises(OSError):  # asyncpg got as far as the network: an outage, not a bad value
        await asyncpg.connect(url, timeout=5)


@pytest.mark.parametrize("value", BAD_DATABASE + BAD_DATABASE_MORE)
def test_database_urls_that_cannot_work_are_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(DatabaseSettings, DATABASE_URL=value)
    message = str(caught.value)
    assert message.startswith("DATABASE_URL: ") and "\n" not in message
    assert SECRET not in message


@pytest.mark.parametrize("form", GOOD_REDIS)
async def test_redis_urls_redis_py_takes_are_accepted(form: str) -> None:
    url = _filled(form)
    assert load(RedisSettings, REDIS_URL=url).redis_url == url
    client = aioredis.Redis.from_url(url)
    try:
        with pytest.raises(RedisConnectionError):  # got as far as the network
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize("value", BAD_REDIS + BAD_REDIS_MORE)
def test_redis_urls_that_cannot_work_are_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(RedisSettings, REDIS_URL=value)
    message = str(caught.value)
    assert message.startswith("REDIS_URL: ") and "\n" not in message
    assert SECRET not in message


def test_the_option_values_are_asyncpgs_own() -> None:
    """app/dsn.py copies asyncpg's accepted values (its parser is private): still the same."""
    from asyncpg import connect_utils

    assert {m.name.replace("_", "-") for m in connect_utils.SSLMode} == set(dsn.SSL_MODES)
    assert {a.value for a in connect_utils.SessionAttribute} == set(dsn.TARGET_SESSION_ATTRS)
    assert {n.value for n in connect_utils.SSLNegotiation} == set(dsn.SSL_NEGOTIATIONS)
