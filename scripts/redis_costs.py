"""What Redis costs per operation, on one server, under Sentinel and on a Redis Cluster.

    .venv/bin/python scripts/redis_costs.py [--topology single|sentinel|cluster|all]
                                            [--sockets 50] [--turns 200] [--idle-seconds 5]

For each topology it starts throwaway servers with tests/services.py (one redis-server; a
primary, a replica and three Sentinels; six Cluster nodes), then the simulator and one gateway
node in this process (a fresh database beside the tests' PostgreSQL for the ledger), a team with
socket caps and a rate limit high enough never to refuse (so their scripts run, as in `gateway
bench`), a price and a key. It then reads Redis's own `INFO commandstats` (summed over the data
nodes: the server, the Sentinel primary, the Cluster's primaries) around each phase:

- noise: the servers alone, before the gateway starts (replication, Sentinels' pings);
- idle: the gateway with no traffic for --idle-seconds (the node view's poll);
- handshake: --sockets sockets opened one after another and left open (the key's secret is
  looked up once, then cached by the node: the figure is the cached handshake's);
- turn: --turns turns, one after another, spread over the open sockets (the session-record
  rewrite and the rate-limit spares' give-back included: it waits for both);
- close: the sockets closed one after another, after the release batch has flushed.

With `--run CMD…` it only starts the servers of one --topology and runs CMD with REDIS_URL (and
GATEWAY_REDIS_CLUSTER or GATEWAY_REDIS_SENTINELS) set for them, e.g. `gateway bench --compare`.

Each phase's counts less the idle rate times the phase's duration, divided by its operations.
Round trips are counted in the client: every `send_packed_command` of redis-py's asyncio
connections (one per command sent alone, one per pipeline per node; a connection's setup
commands and health-check PINGs count too), wrapped here only. `INFO` (this script's,
Sentinels') and `REPLCONF` (replicas' acknowledgements) are left out of the commands. Not a
test: figures, no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402
from conftest import gateway_settings  # noqa: E402
from redis.asyncio.connection import AbstractConnection  # noqa: E402
from services import (  # noqa: E402
    RedisCluster,
    RedisServer,
    SentinelTopology,
    fresh_database_async,
    fresh_redis_prefix,
    postgres_dsn,
    redis_command,
)

from app.keystore import KeyStore, _HiredisPacking  # noqa: E402
from app.ledger import migrate  # noqa: E402
from app.models import Limits, Price, Team  # noqa: E402
from app.node import NODE  # noqa: E402
from app.server import create_app  # noqa: E402
from app.simulator import SimulatorOptions, create_simulator_app  # noqa: E402

MODEL = "openai/gpt-costs"
TOPOLOGIES = ("single", "sentinel", "cluster")
Counts = collections.Counter[str]


# -- round trips: redis-py's asyncio connections, counted per server port ------------------------

SENT: Counts = collections.Counter()  # writes per server port
PACKED: Counts = collections.Counter()  # commands the client packed, by name
_lock = threading.Lock()
_depth = threading.local()  # a pack_command inside another (the hiredis one's fallback)


def _name(args: tuple[Any, ...]) -> str:
    first = args[0] if args else b"?"
    text = first.decode() if isinstance(first, bytes) else str(first)
    return text.split()[0].upper()


def _count_client_side() -> None:
    """Wrap redis-py's asyncio connections (every class that packs): round trips per port and
    commands by name. Large pipelines are packed on a worker thread, hence the lock."""
    send = AbstractConnection.send_packed_command

    async def sent(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        with _lock:
            SENT[str(getattr(self, "port", "?"))] += 1
        await send(self, command, check_health)

    AbstractConnection.send_packed_command = sent  # type: ignore[method-assign]
    for cls in (AbstractConnection, _HiredisPacking):
        _wrap_pack(cls)


def _wrap_pack(cls: Any) -> None:
    pack = cls.pack_command

    def packed(self: Any, *args: Any) -> Any:
        depth = getattr(_depth, "n", 0)
        if depth == 0:
            with _lock:
                PACKED[_name(args)] += 1
        _depth.n = depth + 1
        try:
            return pack(self, *args)
        finally:
            _depth.n = depth

    cls.pack_command = packed


# -- the servers --------------------------------------------------------------------------------


@dataclass
class Servers:
    env: dict[str, Any]  # the gateway's Redis settings
    data: list[int]  # the ports whose commandstats are summed
    sentinels: list[int] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def start_servers(topology: str) -> Servers:
    if topology == "single":
        server = RedisServer().start()
        return Servers({"REDIS_URL": server.url}, [server.port], close=server.close)
    if topology == "sentinel":
        group = SentinelTopology().start()
        env = {"REDIS_URL": group.url, "GATEWAY_REDIS_SENTINELS": group.sentinel_addresses}
        port = group.master_port()
        assert port is not None
        return Servers(env, [port], [s.port for s in group.sentinels], group.close)
    cluster = RedisCluster().start()
    primaries = [
        n.port
        for n in cluster.nodes
        if redis_command("127.0.0.1", n.port, "INFO", "replication")["role"] == "master"
    ]
    cluster_env: dict[str, Any] = {"REDIS_URL": cluster.url, "GATEWAY_REDIS_CLUSTER": True}
    return Servers(cluster_env, primaries, close=cluster.close)


# This script's INFO (Sentinels send it too) and replicas' acknowledgements (REPLCONF ACK, once a
# second per replica, starting whenever a replica's sync is done): never the gateway's.
_NOT_THE_CLIENTS = frozenset({"INFO", "REPLCONF"})
_INFO: dict[int, Any] = {}  # one connection per node for INFO: no HELLO per snapshot


def commandstats(ports: list[int]) -> Counts:
    import redis

    total: Counts = collections.Counter()
    for port in ports:
        if port not in _INFO:
            _INFO[port] = redis.Redis(port=port, socket_timeout=2, decode_responses=True)
        stats = _INFO[port].info("commandstats")
        for name, fields in stats.items():
            command = name.removeprefix("cmdstat_").upper()
            if command not in _NOT_THE_CLIENTS:
                total[command] += int(fields["calls"])
    return total


@dataclass
class Snapshot:
    at: float
    commands: Counts
    sent: Counts
    packed: Counts


def snapshot(servers: Servers) -> Snapshot:
    with _lock:
        sent, packed = SENT.copy(), PACKED.copy()
    return Snapshot(time.monotonic(), commandstats(servers.data), sent, packed)


@dataclass
class Phase:
    """Counts of one phase per operation, less the idle rate over its duration."""

    commands: dict[str, float]  # as Redis ran them (a script's own calls included)
    sent: dict[str, float]  # as the client sent them (a script call: one EVALSHA)
    round_trips: float  # to the data nodes
    sentinel_round_trips: float
    seconds: float

    @property
    def total(self) -> float:
        return sum(self.commands.values())

    @property
    def total_sent(self) -> float:
        return sum(v for k, v in self.sent.items() if k != "SENTINEL")


def _diff(after: Counts, before: Counts) -> Counts:
    return collections.Counter({k: after[k] - before.get(k, 0) for k in after})


def phase(servers: Servers, a: Snapshot, b: Snapshot, ops: int, idle: Phase | None = None) -> Phase:
    seconds = b.at - a.at
    commands: dict[str, float] = dict(_diff(b.commands, a.commands))
    packed: dict[str, float] = dict(_diff(b.packed, a.packed))
    sent = _diff(b.sent, a.sent)
    data = float(sum(v for k, v in sent.items() if k not in {str(p) for p in servers.sentinels}))
    to_sentinels = float(sum(sent[str(p)] for p in servers.sentinels))
    if idle is not None:
        for name, rate in idle.commands.items():
            commands[name] = commands.get(name, 0) - rate * seconds
        for name, rate in idle.sent.items():
            packed[name] = packed.get(name, 0) - rate * seconds
        data -= idle.round_trips * seconds
        to_sentinels -= idle.sentinel_round_trips * seconds

    def per(counts: dict[str, float]) -> dict[str, float]:
        return {k: v / ops for k, v in counts.items() if abs(v / ops) >= 0.005}

    return Phase(per(commands), per(packed), data / ops, to_sentinels / ops, seconds)


def per_second(p: Phase) -> Phase:
    s = p.seconds
    return Phase(
        {k: v / s for k, v in p.commands.items()},
        {k: v / s for k, v in p.sent.items()},
        p.round_trips / s,
        p.sentinel_round_trips / s,
        1.0,
    )


# -- the gateway in this process -----------------------------------------------------------------


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@dataclass
class Gateway:
    url: str
    key: str
    store: KeyStore
    lease_refreshes: list[float]


@asynccontextmanager
async def gateway(servers: Servers) -> AsyncIterator[Gateway]:
    database_url, drop = await fresh_database_async(postgres_dsn())
    runners: list[web.AppRunner] = []
    spill = tempfile.TemporaryDirectory(prefix="gw-costs-")
    try:
        await migrate(database_url)
        sim_runner, sim_base = await _serve(create_simulator_app(SimulatorOptions()))
        runners.append(sim_runner)
        settings = gateway_settings(
            servers.env["REDIS_URL"],
            fresh_redis_prefix(),
            database_url,
            sim_base + "/v1",
            Path(spill.name),
            **{"GATEWAY_REDIS_CLUSTER": False, **servers.env},
        )
        app = create_app(settings)
        gw_runner, base = await _serve(app)
        runners.append(gw_runner)
        store: KeyStore = app[NODE].store
        big = 1_000_000
        limits = Limits(sockets_per_key=big, sockets_per_team=big, responses_per_minute_per_key=big)
        await store.put_team(Team(id="costs", allowed_models=["openai/*"], limits=limits))
        await store.set_price(MODEL, Price(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)))
        _, key = await store.create_key("costs")
        refreshes: list[float] = []
        refresh = store.refresh_leases

        async def noted(sessions: list[Any]) -> None:
            if sessions:
                refreshes.append(time.monotonic())
            await refresh(sessions)

        store.refresh_leases = noted  # type: ignore[method-assign]
        yield Gateway(base.replace("http", "ws") + "/v1/responses", key, store, refreshes)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await drop()
        spill.cleanup()


FRAME = orjson.dumps(
    {"type": "response.create", "model": MODEL, "input": [{"role": "user", "content": "hi"}]}
).decode()


async def turn(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str(FRAME)
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"the socket ended mid-turn: {msg.type}")
        if '"response.completed"' in msg.data[:40]:
            return
        if '"error"' in msg.data[:20]:
            raise RuntimeError(f"turn refused: {msg.data[:200]}")


async def settle(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dataclass
class Result:
    topology: str
    data_nodes: int
    noise: Phase
    idle: Phase
    handshake: Phase
    turn: Phase
    close: Phase
    notes: list[str]


async def measure(topology: str, sockets: int, turns: int, idle_seconds: float) -> Result:
    servers = await asyncio.to_thread(start_servers, topology)
    notes: list[str] = []
    try:
        await settle(1.0)
        a = snapshot(servers)
        await settle(idle_seconds)
        noise = per_second(phase(servers, a, snapshot(servers), 1))
        async with gateway(servers) as gw, aiohttp.ClientSession() as http:
            await settle(1.0)  # the view's first loads, the pool's first connections
            a = snapshot(servers)
            await settle(idle_seconds)
            idle = per_second(phase(servers, a, snapshot(servers), 1))
            headers = {"Authorization": f"Bearer {gw.key}"}
            # One socket first: the secret's lookup and the pool's connections are not counted.
            warm = await http.ws_connect(gw.url, headers=headers)
            await turn(warm)
            await warm.close()
            await settle(0.6)
            a = snapshot(servers)
            open_: list[aiohttp.ClientWebSocketResponse] = []
            for _ in range(sockets):
                open_.append(await http.ws_connect(gw.url, headers=headers))
            await settle(0.3)
            b = snapshot(servers)
            handshake = phase(servers, a, b, sockets, idle)
            for i in range(turns):
                await turn(open_[i % sockets])
            await settle(1.2)  # session records (0.25 s) and unused rate spares (0.5 s)
            c = snapshot(servers)
            turned = phase(servers, b, c, turns, idle)
            for ws in open_:
                await ws.close()
            await settle(0.5)  # the release batch (0.05 s)
            d = snapshot(servers)
            closed = phase(servers, c, d, sockets, idle)
            if any(a.at <= t <= d.at for t in gw.lease_refreshes):
                notes.append("a lease renewal (every 15 s) fell inside the phases: rerun")
    finally:
        for port in servers.data:
            with contextlib.suppress(Exception):
                _INFO.pop(port).close()
        await asyncio.to_thread(servers.close)
    return Result(topology, len(servers.data), noise, idle, handshake, turned, closed, notes)


# -- the table ------------------------------------------------------------------------------------


def _which(counts: dict[str, float]) -> str:
    parts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return " ".join(f"{k} {v:.2f}" for k, v in parts if v >= 0.005) or "-"


def _rt(p: Phase) -> str:
    text = f"{p.round_trips:.2f}"
    if abs(p.sentinel_round_trips) >= 0.005:
        text += f" +{p.sentinel_round_trips:.2f}S"
    return text


def print_table(results: list[Result], sockets: int, turns: int) -> None:
    head = (
        f"{'topology':9} {'nodes':>5} {'operation':>10} {'sent':>6} {'round trips':>12}"
        f" {'run by Redis':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for name, p in _rows(r):
            sent = f"{p.total_sent:.2f}" if name != "noise/s" else "-"
            rt = _rt(p) if name != "noise/s" else "-"
            print(
                f"{r.topology:9} {r.data_nodes:>5} {name:>10} {sent:>6} {rt:>12} {p.total:>12.2f}"
            )
    print()
    print(
        textwrap.fill(
            "nodes: data nodes summed (the server; the Sentinel primary; the Cluster's primaries)."
            " sent: commands the client sent (a script: one EVALSHA); round trips: the client's"
            " writes to the data nodes (a Cluster pipeline writes to each node it touches, in"
            " parallel: which primaries the prefix's keys land on varies from run to run); +xS:"
            " round trips to Sentinels; run by Redis: INFO commandstats, a script's"
            " own calls included. Per operation, less the idle rate. idle/s: the gateway with no"
            " traffic, the servers' own noise (noise/s: replication, Sentinels) taken out.",
            100,
        )
    )
    for r in results:
        print(f"\n{r.topology}: which commands (sent | run by Redis)")
        for name, p in _rows(r):
            if name == "noise/s":
                print(f"  {name:9} run:  {_which(p.commands)}")
                continue
            print(f"  {name:9} sent: {_which(p.sent)}")
            print(f"  {'':9} run:  {_which(p.commands)}")
        for note in r.notes:
            print(f"  note: {note}")
    print(f"\n{sockets} sockets opened and closed one after another, {turns} turns one at a time.")


def _rows(r: Result) -> list[tuple[str, Phase]]:
    own = {k: v - r.noise.commands.get(k, 0.0) for k, v in r.idle.commands.items()}
    idle = Phase(
        {k: v for k, v in own.items() if abs(v) >= 0.005},
        r.idle.sent,
        r.idle.round_trips,
        r.idle.sentinel_round_trips,
        1.0,
    )
    return [
        ("handshake", r.handshake),
        ("turn", r.turn),
        ("close", r.close),
        ("idle/s", idle),
        ("noise/s", r.noise),
    ]


def run_against(topology: str, argv: list[str]) -> int:
    servers = start_servers(topology)
    try:
        env = dict(os.environ)
        env.update({k: str(v).lower() if v is True else str(v) for k, v in servers.env.items()})
        print(
            f"{topology}: REDIS_URL={env['REDIS_URL']} data nodes {servers.data}", file=sys.stderr
        )
        return subprocess.run(argv, env=env, check=False).returncode
    finally:
        servers.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", choices=(*TOPOLOGIES, "all"), default="all")
    parser.add_argument("--sockets", type=int, default=50)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument(
        "--run",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="start one --topology's servers and run CMD against them (REDIS_URL etc. set)",
    )
    args = parser.parse_args()
    if args.run:
        if args.topology == "all":
            parser.error("--run needs one --topology")
        sys.exit(await asyncio.to_thread(run_against, args.topology, args.run))
    _count_client_side()
    chosen = TOPOLOGIES if args.topology == "all" else (args.topology,)
    results = []
    for topology in chosen:
        print(f"{topology}: starting the servers and measuring…", file=sys.stderr)
        results.append(await measure(topology, args.sockets, args.turns, args.idle_seconds))
    print_table(results, args.sockets, args.turns)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
