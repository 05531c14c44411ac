"""Shared fixtures: real Redis, real Postgres, the simulator and the gateway on real ports."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from services import (
    delete_cluster_prefix,
    delete_prefix,
    fresh_database,
    fresh_redis_prefix,
    run_blocking,
    session_postgres_admin_dsn,
    session_redis_cluster_url,
    session_redis_url,
    session_sentinel_topology,
)

from app.config import Settings
from app.keystore import KeyStore
from app.ledger.migrate import migrate
from app.models import Limits, Price, Team
from app.node import NODE, Node
from app.server import create_app
from app.session import Session
from app.simulator import SimulatorOptions, create_simulator_app

UPSTREAM_KEY = "sk-upstream-test-0123456789"
MODEL = "openai/gpt-test"
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}

# TEST_REDIS_TOPOLOGY=cluster (`make test-cluster`): the same tests against a Redis Cluster
# (tests/services.py `RedisCluster`, or TEST_REDIS_CLUSTER_URL), the gateway and every store
# with GATEWAY_REDIS_CLUSTER. TEST_REDIS_TOPOLOGY=sentinel (`make test-sentinel`): against a
# primary, a replica and three Sentinels; the gateway finds the primary through the Sentinels,
# stores a test makes itself talk to the primary directly.
REDIS_TOPOLOGY = os.environ.get("TEST_REDIS_TOPOLOGY", "").strip()
REDIS_CLUSTER = REDIS_TOPOLOGY == "cluster"
REDIS_SENTINEL = REDIS_TOPOLOGY == "sentinel"
# The session topology's primary URL -> its GATEWAY_REDIS_SENTINELS (a test that points a
# gateway at another Redis, an unreachable one say, gets no Sentinels).
_SENTINELS: dict[str, str] = {}


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if REDIS_CLUSTER:
        yield from session_redis_cluster_url()
    elif REDIS_SENTINEL:
        for topology in session_sentinel_topology():
            _SENTINELS[topology.primary.url] = topology.sentinel_addresses
            yield topology.primary.url
    else:
        yield from session_redis_url()


pg_admin_dsn = pytest.fixture(scope="session")(session_postgres_admin_dsn)


@pytest.fixture(scope="session")
def database_url(pg_admin_dsn: str) -> Iterator[str]:
    dsn, drop = fresh_database(pg_admin_dsn)
    run_blocking(migrate(dsn))
    yield dsn
    drop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    prefix = fresh_redis_prefix()
    yield prefix
    run_blocking((delete_cluster_prefix if REDIS_CLUSTER else delete_prefix)(redis_url, prefix))


@dataclass
class Sim:
    server: TestServer
    app: web.Application

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as http:
            async with http.request(method, self.server.make_url(path), json=body) as resp:
                resp.raise_for_status()
                return await resp.json() if resp.content_type == "application/json" else None

    async def requests(self) -> list[dict[str, Any]]:
        """The `response.create` bodies the simulator received, in order."""
        data = (await self._json("GET", "/_sim/requests"))["data"]
        return [r for r in data if r.get("kind") == "request"]

    async def handshakes(self) -> list[dict[str, Any]]:
        data = (await self._json("GET", "/_sim/requests"))["data"]
        return [r for r in data if r.get("kind") == "handshake"]

    async def arm(self, handshake: str, count: int = 1) -> None:
        await self._json("POST", "/_sim/faults", {"handshake": handshake, "count": count})


def make_sim_options(**overrides: Any) -> SimulatorOptions:
    return SimulatorOptions(**overrides)


@pytest.fixture
def sim_options(request: pytest.FixtureRequest) -> SimulatorOptions:
    """Parametrize indirectly with a dict of `SimulatorOptions` fields to change the simulator."""
    return make_sim_options(**getattr(request, "param", {}))


@pytest.fixture
async def sim(aiohttp_server: Any, sim_options: SimulatorOptions) -> Sim:
    app = create_simulator_app(sim_options)
    server = await aiohttp_server(app)
    return Sim(server, app)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or with `indirect`) to change the gateway's settings."""
    return {}


def gateway_settings(
    redis_url: str, prefix: str, database_url: str, upstream: str, spill: Path, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "REDIS_URL": redis_url,
        "GATEWAY_REDIS_CLUSTER": REDIS_CLUSTER,
        "GATEWAY_REDIS_SENTINELS": _SENTINELS.get(redis_url, ""),
        "GATEWAY_REDIS_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": upstream,
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "GATEWAY_ENV": "dev",
        "ADMIN_TOKEN": "admin-test-token",
        "GATEWAY_SPILL_DIR": str(spill),
        "GATEWAY_DRAIN_SECONDS": 2,
    }
    values.update(extra)
    return Settings(**values)


@dataclass
class Gateway:
    server: TestServer
    app: web.Application

    @property
    def node(self) -> Node:
        return self.app[NODE]

    @property
    def store(self) -> KeyStore:
        return self.node.store

    @property
    def sessions(self) -> list[Session]:
        """The node's live sockets as the sessions they are (the node sees `LiveSocket`s)."""
        found = list(self.node.sessions)
        assert all(isinstance(s, Session) for s in found), found
        return cast(list[Session], found)

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def gateway(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    database_url: str,
    sim: Sim,
    tmp_path: Path,
    settings_overrides: dict[str, Any],
) -> Gateway:
    settings = gateway_settings(
        redis_url,
        redis_prefix,
        database_url,
        sim.base_url,
        tmp_path / "spill",
        **settings_overrides,
    )
    app = create_app(settings)
    server = await aiohttp_server(app)
    return Gateway(server, app)


@pytest.fixture
async def node_b(gateway: Gateway, aiohttp_server: Any, tmp_path: Path) -> Gateway:
    """A second node beside `gateway` (node A): same settings (Redis prefix, Postgres, upstream)
    but its node id and spill directory."""
    settings = gateway.node.settings.model_copy(
        update={"node_id": "node-b", "spill_dir": tmp_path / "spill-b"}
    )
    app = create_app(settings)
    return Gateway(await aiohttp_server(app), app)


@dataclass
class Tenant:
    team: Team
    key: str
    key_id: str
    store: KeyStore = field(repr=False)


async def make_tenant(
    store: KeyStore,
    team_id: str = "acme",
    models: tuple[str, ...] = ("openai/gpt-*",),
    limits: Limits | None = None,
    credential: str = "OPENAI_API_KEY",
    prices: tuple[str, ...] = (MODEL, "openai/gpt-other", "openai/o3"),
) -> Tenant:
    team = Team(
        id=team_id,
        name=team_id.title(),
        allowed_models=list(models),
        upstream_credential=credential,
        limits=limits or Limits(),
    )
    await store.put_team(team)
    for model in prices:
        await store.set_price(
            model,
            Price(
                input_per_mtok=Decimal("1.25"),
                cached_input_per_mtok=Decimal("0.125"),
                output_per_mtok=Decimal("10"),
            ),
        )
    key, secret = await store.create_key(team.id, name="test")
    return Tenant(team=team, key=secret, key_id=key.id, store=store)


@pytest.fixture
async def tenant(gateway: Gateway) -> Tenant:
    return await make_tenant(gateway.store)


Connect = Callable[..., Any]


@pytest.fixture
def connect(gateway: Gateway, tenant: Tenant) -> Connect:
    @asynccontextmanager
    async def _connect(
        path: str = "/v1/responses",
        key: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        hdrs = {"Authorization": f"Bearer {key or tenant.key}", **(headers or {})}
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(
                gateway.url(path), headers=hdrs, max_msg_size=64 * 1024 * 1024, **kwargs
            ) as ws:
                yield ws

    return _connect


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
    value = orjson.loads(msg.data)
    assert isinstance(value, dict)
    return value


async def send(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any] | str) -> None:
    await ws.send_str(frame if isinstance(frame, str) else orjson.dumps(frame).decode())


def create(**fields: Any) -> dict[str, Any]:
    fields.setdefault("model", MODEL)
    fields.setdefault("input", [{"role": "user", "content": "hello"}])
    return {"type": "response.create", **fields}


async def until_terminal(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        event = await recv(ws, timeout)
        events.append(event)
        if event.get("type") in TERMINAL:
            return events


async def turn(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0, **fields: Any
) -> list[dict[str, Any]]:
    await send(ws, create(**fields))
    return await until_terminal(ws, timeout)


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta")


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Call `check` (sync or async) until it is met, and return what it returned.

    Met: it returned something true, or it returned None without raising AssertionError (a
    check written with asserts). Not met: it returned False (or another false value), or raised
    AssertionError. Past `timeout` the last AssertionError is raised again, or one saying what
    the check returned. The one polling loop of the suite: a test waits on an event it can
    observe, never on a sleep of a guessed length.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        failure: AssertionError | None = None
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
        except AssertionError as exc:
            failure = exc
        else:
            if result is None or result:
                return result
        if loop.time() > deadline:
            if failure is not None:
                raise failure
            raise AssertionError(f"not met within {timeout} s (the check returned {result!r})")
        await asyncio.sleep(interval)


async def drop_upstream_connections(sim: Sim) -> int:
    """Cut every open upstream socket of the simulator (the gateway sees a 1006 drop)."""
    conns = (await sim._json("GET", "/_sim/connections"))["data"]
    for conn in conns:
        await sim._json("POST", f"/_sim/connections/{conn['id']}/drop")
    return len(conns)
