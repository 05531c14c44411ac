"""What `gateway bench --compare` starts: a simulator, a bare relay and a gateway, as processes.

The gateway gets its own Redis key prefix (on the Redis at REDIS_URL, or a throwaway
redis-server when none answers; a Cluster or Sentinels when GATEWAY_REDIS_CLUSTER or
GATEWAY_REDIS_SENTINELS say so, in the environment or in --gateway-env, which the bench's own key
store then follows too), its own migrated database next to DATABASE_URL's (or
DATABASE_URL itself when no database can be created there), and a dev team and key made with the
key store. Everything is removed again when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit, urlunsplit

from app.bench.load import BenchError, Target
from app.config import DatabaseSettings, RedisSettings, load
from app.keystore import KeyStore
from app.models import Limits, Price, Team

BENCH_TEAM = "bench"
UPSTREAM_KEY = "sk-bench-upstream"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_SIM_READY = re.compile(r"simulator listening on http://([^/\s]+)/v1")
_RELAY_READY = re.compile(r"relay listening on (ws://\S+)")
_GATEWAY_READY = re.compile(r"gateway listening on http://(\S+)")
_HTTP_RELAY_READY = re.compile(r"http relay listening on (http://\S+)")


@dataclass
class Child:
    """A process this run started; its output goes to `log`."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        """SIGTERM (the gateway drains), then SIGKILL if it has not ended in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, _STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 5)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _launch(argv: Sequence[str], env: dict[str, str], workdir: Path, log: Path) -> Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,  # away from the repository's .env: only `env` configures it
            start_new_session=True,  # a ^C reaches the bench, which stops its children itself
        )


def _ready(log: Path, ready: re.Pattern[str]) -> str | None:
    found = ready.search(log.read_text(errors="replace"))
    return found.group(1) if found else None


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: dict[str, str],
    workdir: Path,
    ready: re.Pattern[str],
) -> Child:
    """Start a process and wait for the line that says it listens (`ready`'s group 1)."""
    log = workdir / f"{name}.log"
    child = Child(name, _launch(argv, env, workdir, log), log)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_TIMEOUT
    while loop.time() < deadline:
        address = _ready(log, ready)
        if address is not None:
            child.address = address
            return child
        if child.proc.poll() is not None:
            raise BenchError(f"{name} exited with {child.proc.returncode}:\n{_tail(log)}")
        await asyncio.sleep(0.05)
    await child.stop()
    raise BenchError(f"{name} did not start within {_START_TIMEOUT:g} s:\n{_tail(log)}")


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


# -- Redis and Postgres -------------------------------------------------------------------------


@dataclass
class Backing:
    redis: RedisSettings  # the gateway's topology (REDIS_URL, Cluster or Sentinels), its prefix
    database_url: str
    notes: list[str] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.redis.redis_url

    @property
    def prefix(self) -> str:
        return self.redis.redis_prefix


# What of --gateway-env also says where the bench's own key store goes: the gateway's Redis.
_REDIS_ENV = (
    "REDIS_URL",
    "GATEWAY_REDIS_CLUSTER",
    "GATEWAY_REDIS_SENTINELS",
    "GATEWAY_REDIS_SENTINEL_MASTER",
)


def redis_settings(gateway_env: dict[str, str]) -> RedisSettings:
    """The gateway's Redis settings: the environment's, with --gateway-env's over them."""
    return load(RedisSettings, **{k: v for k, v in gateway_env.items() if k in _REDIS_ENV})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _redis_answers(settings: RedisSettings) -> bool:
    store = KeyStore.from_settings(settings, pool_size=1)
    try:
        return await store.ping()
    finally:
        await store.close()


async def _redis(
    stack: AsyncExitStack, workdir: Path, notes: list[str], settings: RedisSettings
) -> str:
    url = settings.redis_url
    if await _redis_answers(settings):
        return url
    if settings.redis_cluster or settings.sentinel_addresses:
        raise BenchError(f"no Redis answers at {url} (a Cluster or Sentinels: none is started)")
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(server, os.X_OK):
        raise BenchError(f"no Redis answers at {url} and redis-server is not installed")
    port = _free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    env = dict(os.environ)
    child = await spawn("redis", argv, env=env, workdir=workdir, ready=re.compile(r"(Ready)"))
    stack.push_async_callback(child.stop)
    notes.append(f"no Redis answered at {url}: a throwaway redis-server on port {port}")
    return f"redis://127.0.0.1:{port}/0"


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def _migrate(database_url: str, workdir: Path) -> tuple[bool, str]:
    env = dict(os.environ, DATABASE_URL=database_url)
    proc = await asyncio.create_subprocess_exec(
        *_python("-m", "app", "migrate"),
        env=env,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode == 0, out.decode(errors="replace").strip()


async def _drop_database(database_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_with_database(database_url, "postgres"), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _database(stack: AsyncExitStack, workdir: Path, notes: list[str]) -> str:
    """A fresh migrated database beside DATABASE_URL's; else DATABASE_URL; else (spill) as is."""
    configured = load(DatabaseSettings).database_url
    name = f"gwbench_{secrets.token_hex(8)}"
    fresh = _with_database(configured, name)
    ok, output = await _migrate(fresh, workdir)  # `gateway migrate` creates a missing database
    if ok:

        async def drop() -> None:
            with contextlib.suppress(Exception):
                await _drop_database(configured, name)

        stack.push_async_callback(drop)
        return fresh
    ok, output = await _migrate(configured, workdir)
    if ok:
        notes.append("no database could be created beside DATABASE_URL: the ledger writes to it")
        return configured
    notes.append(f"gateway migrate failed ({output.splitlines()[-1:]}): the ledger spills to disk")
    return configured


TEAM_LIMITS = ("all", "rate", "none")


async def _tenant(backing: Backing, model: str, limits: str) -> str:
    """The bench team (all openai/* models, generous limits), a price for `model`, a new key.

    `limits`: `all` (socket caps, responses and tokens per minute, spend budgets), `rate` (socket
    caps and responses per minute only), `none`; high enough never to refuse, so their checks
    run but never bite."""
    store = KeyStore.from_settings(backing.redis)
    try:
        caps = Limits()
        if limits in ("all", "rate"):
            caps = Limits(
                sockets_per_key=1_000_000,
                sockets_per_team=1_000_000,
                responses_per_minute_per_key=100_000_000,
            )
        if limits == "all":
            caps = caps.model_copy(
                update={
                    "tokens_per_minute_per_key": 1_000_000_000_000,
                    "usd_per_day_per_key": 1_000_000.0,
                    "usd_per_day_per_team": 1_000_000.0,
                    "usd_per_month_per_team": 10_000_000.0,
                }
            )
        team = Team(id=BENCH_TEAM, name="gateway bench", allowed_models=["openai/*"], limits=caps)
        await store.put_team(team)
        price = Price(input_per_mtok=Decimal("1.25"), output_per_mtok=Decimal("10"))
        await store.set_price(model, price)
        _key, secret = await store.create_key(BENCH_TEAM, name="gateway bench")
        return secret
    finally:
        await store.close()


async def _forget_prefix(settings: RedisSettings) -> None:
    """The run's keys removed: SCAN for the prefix and UNLINK. On a Cluster, redis-py's client
    scans every primary and splits each UNLINK by hash slot (one command's keys share one)."""
    store = KeyStore.from_settings(settings, pool_size=4)
    prefix = settings.redis_prefix
    try:
        keys = [key async for key in store.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await store.redis.unlink(*keys[start : start + 500])
    finally:
        await store.close()


# -- the three targets --------------------------------------------------------------------------


@dataclass
class Stack:
    """One simulator and the relay and gateway in front of it."""

    sim: Child
    relay: Child
    gateway: Child
    key: str
    loop: str = "auto"  # GATEWAY_EVENT_LOOP of the relay and the gateway
    # More processes in front of the same simulator, by name (`add_relay`, `add_gateway`, …).
    extras: dict[str, Child] = field(default_factory=dict)

    @property
    def sim_ws_url(self) -> str:
        return f"ws://{self.sim.address}/v1/responses"

    @property
    def pids(self) -> list[int]:
        return [
            self.sim.pid,
            self.relay.pid,
            self.gateway.pid,
            *(c.pid for c in self.extras.values()),
        ]

    def extra(self, name: str) -> Target:
        """A target of the extras: a WebSocket relay or gateway, or an HTTP one (`http-…`)."""
        child = self.extras[name]
        if name.startswith("http-relay"):
            return Target(name, f"{child.address}/responses", UPSTREAM_KEY, child.pid)
        if name.startswith("relay"):
            return Target(name, child.address, UPSTREAM_KEY, child.pid)
        return Target(name, f"ws://{child.address}/v1/responses", self.key, child.pid)

    def http_targets(self) -> list[Target]:
        """`POST /v1/responses`: the simulator, the bare HTTP relay, the gateway."""
        return [
            Target("direct", f"http://{self.sim.address}/v1/responses", UPSTREAM_KEY, self.sim.pid),
            self.extra("http-relay"),
            Target(
                "gateway", f"http://{self.gateway.address}/v1/responses", self.key, self.gateway.pid
            ),
        ]

    def targets(self) -> list[Target]:
        gateway_url = f"ws://{self.gateway.address}/v1/responses"
        return [
            Target("direct", self.sim_ws_url, UPSTREAM_KEY, self.sim.pid),
            Target("relay", self.relay.address, UPSTREAM_KEY, self.relay.pid),
            Target("gateway", gateway_url, self.key, self.gateway.pid),
        ]


@dataclass
class Bed:
    """Where stacks run: a work directory, the backing services, the bench tenant's key."""

    workdir: Path
    backing: Backing
    key: str
    model: str
    gateway_env: dict[str, str]
    exits: AsyncExitStack


def _workdir(keep: Path | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="gwbench-"))
    keep.mkdir(parents=True, exist_ok=True)
    return keep.resolve()


@asynccontextmanager
async def bed(
    model: str, *, limits: str, gateway_env: dict[str, str], keep: Path | None = None
) -> AsyncIterator[Bed]:
    """Backing services and a tenant for the run; all removed afterwards."""
    async with AsyncExitStack() as exits:
        workdir = _workdir(keep)
        if keep is None:
            exits.callback(shutil.rmtree, workdir, True)
        notes: list[str] = []
        settings = redis_settings(gateway_env)
        redis_url = await _redis(exits, workdir, notes, settings)
        prefix = f"gwbench:{secrets.token_hex(8)}"
        settings = settings.model_copy(update={"redis_url": redis_url, "redis_prefix": prefix})
        exits.push_async_callback(_forget_prefix, settings)
        database_url = await _database(exits, workdir, notes)
        backing = Backing(settings, database_url, notes)
        key = await _tenant(backing, model, limits)
        yield Bed(workdir, backing, key, model, gateway_env, exits)


def _gateway_env(bed: Bed, upstream_http: str, tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_ENV="dev",
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT="0",
        GATEWAY_NODE_ID=f"bench-{tag}",
        GATEWAY_REDIS_PREFIX=bed.backing.prefix,
        GATEWAY_SPILL_DIR=str(bed.workdir / f"spill-{tag}"),
        GATEWAY_DRAIN_SECONDS="1",
        REDIS_URL=bed.backing.redis_url,
        # The topology the bench's own key store used (the environment's or --gateway-env's).
        GATEWAY_REDIS_CLUSTER=str(bed.backing.redis.redis_cluster).lower(),
        GATEWAY_REDIS_SENTINELS=bed.backing.redis.redis_sentinels,
        GATEWAY_REDIS_SENTINEL_MASTER=bed.backing.redis.redis_sentinel_master,
        DATABASE_URL=bed.backing.database_url,
        OPENAI_BASE_URL=upstream_http,
        OPENAI_API_KEY=UPSTREAM_KEY,
    )
    env.update(bed.gateway_env)
    return env


async def start_stack(bed: Bed, tag: str, *, handshake_delay_ms: float = 0) -> Stack:
    """A simulator, then a relay and a gateway in front of it; stopped when the bed goes."""
    env = dict(os.environ)
    sim_argv = _python("-m", "app", "simulate", "--port", "0")
    sim_argv += ["--handshake-delay-ms", f"{handshake_delay_ms:g}"]
    sim = await spawn(f"simulator-{tag}", sim_argv, env=env, workdir=bed.workdir, ready=_SIM_READY)
    bed.exits.push_async_callback(sim.stop)
    sim_ws = f"ws://{sim.address}/v1/responses"
    gateway_env = _gateway_env(bed, f"http://{sim.address}/v1", tag)
    # The relay runs on the gateway's event loop: the floor is measured on the same stack.
    loop = gateway_env.get("GATEWAY_EVENT_LOOP", "auto")
    relay_argv = _python("-m", "app.bench.relay", "--port", "0", "--upstream", sim_ws)
    relay_argv += ["--loop", loop]
    started = await asyncio.gather(
        spawn(f"relay-{tag}", relay_argv, env=env, workdir=bed.workdir, ready=_RELAY_READY),
        spawn(
            f"gateway-{tag}",
            _python("-m", "app", "serve"),
            env=gateway_env,
            workdir=bed.workdir,
            ready=_GATEWAY_READY,
        ),
        return_exceptions=True,
    )
    for child in started:
        if isinstance(child, Child):
            bed.exits.push_async_callback(child.stop)
    for child in started:
        if isinstance(child, BaseException):
            raise child
    relay, gateway = started
    assert isinstance(relay, Child) and isinstance(gateway, Child)
    return Stack(sim, relay, gateway, bed.key, loop)


async def _extra(bed: Bed, stack: Stack, name: str, child: Awaitable[Child]) -> Child:
    started = await child
    bed.exits.push_async_callback(started.stop)
    stack.extras[name] = started
    return started


async def add_relay(bed: Bed, stack: Stack, name: str, loop: str) -> Child:
    """Another bare WebSocket relay in front of the stack's simulator, on `loop`."""
    argv = _python("-m", "app.bench.relay", "--port", "0", "--upstream", stack.sim_ws_url)
    argv += ["--loop", loop]
    env = dict(os.environ)
    spawned = spawn(name, argv, env=env, workdir=bed.workdir, ready=_RELAY_READY)
    return await _extra(bed, stack, name, spawned)


async def add_http_relay(bed: Bed, stack: Stack) -> Child:
    """The bare aiohttp HTTP relay (app/bench/httprelay.py), as `http-relay`."""
    argv = _python("-m", "app.bench.httprelay", "--port", "0")
    argv += ["--upstream", f"http://{stack.sim.address}/v1", "--loop", stack.loop]
    env = dict(os.environ)
    spawned = spawn("http-relay", argv, env=env, workdir=bed.workdir, ready=_HTTP_RELAY_READY)
    return await _extra(bed, stack, "http-relay", spawned)


async def add_gateway(
    bed: Bed, stack: Stack, name: str, *, env: dict[str, str] | None = None, workers: int = 1
) -> Child:
    """Another gateway in front of the stack's simulator (its own node id, the same tenant)."""
    gateway_env = _gateway_env(bed, f"http://{stack.sim.address}/v1", name)
    gateway_env.update(env or {})
    argv = _python("-m", "app", "serve")
    if workers > 1:
        argv += ["--workers", str(workers)]
    spawned = spawn(name, argv, env=gateway_env, workdir=bed.workdir, ready=_GATEWAY_READY)
    return await _extra(bed, stack, name, spawned)
