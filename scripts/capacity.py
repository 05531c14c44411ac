"""Capacity: 1, 2 and 4 `gateway serve` nodes on one Redis and one Postgres, four loads, and
what each load costs Redis and Postgres per second and per operation.

    .venv/bin/python scripts/capacity.py [--nodes 1,2,4] [--seconds 8] [--sockets 120]
                                         [--idle-sockets 1000] [--idle-seconds 30]
                                         [--no-rate-limit]

What it starts: a throwaway redis-server (tests/services.py `RedisServer`: its `INFO
commandstats` counts this run's commands and nothing else), the bundled simulator as a process
(`gateway simulate`, no pacing: `sim_delay_ms` 0), and for each node count a fresh Redis key
prefix, a fresh database on the tests' PostgreSQL (migrated; dropped afterwards) and N `gateway
serve` nodes as processes (tests/fleet_harness.py `Fleet`), each on its own port. A team with a
socket cap and a responses-per-minute limit far above the load (so their scripts run on every
handshake and turn, as in `gateway bench`; `--no-rate-limit` leaves the limit unset), a price
and a key. The clients are this process, on the load generator of `gateway bench`
(app/bench/load.py), spread evenly over the nodes' ports (no proxy in front: HAProxy's own cost
is not what is measured here). Everything is removed at the end, or on ^C or SIGTERM.

The loads, each for --seconds on every node count:
- handshakes: raw WebSocket handshakes (no library), 64 in flight per node, in rounds of
  --sockets per node opened then closed: a handshake here is an open and its close;
- short turns: --sockets sockets looping turns back to back, alternately a tool call (7 events:
  the simulator's `[[call:lookup …]]`) and the answer to a tool output (17 events), 12 events a
  turn on average: an agent's tool loop;
- long turns: the same sockets, text turns of 92 deltas (100 events);
- paced turns: --sockets new sockets, each with a key of its own, running the short turns with a
  second's pause after each: per key a turn a second or so, the rate of an agent, at which the
  rate limiter's spares (app/keystore.py) are given back unused and every turn asks Redis (the
  back-to-back loads share one key at thousands of turns a second: most turns use spares).
Before the loads, the nodes idle for 3 s with no socket: their own rate (the admin-version poll,
4 a second) is taken out of every figure. On the last node count, --idle-sockets sockets then
sit idle on one node for --idle-seconds: what an idle socket costs (lease renewals, every 15 s:
counted per renewal, the renewals told by the session records' SET) and the node's RSS per
socket.

Around each phase it reads Redis's `INFO commandstats` (calls per command, a script's own calls
included; the script's own INFO left out) and `INFO cpu` (the main thread's CPU time), and the
run database's `pg_stat_database` (xact_commit, read from another database so that reading it
is no transaction of the run's) and `pg_stat_user_tables` (n_tup_ins, n_tup_upd per table, month
partitions summed under their parent). The reading after a phase waits 1.5 s (the ledger's 0.1 s
flush, the session records' 0.25 s batch, the rate-limit spares' 0.5 s give-back), then until the
statistics count the rows the ledger's tables hold (a Postgres backend that has just sent its
statistics sends the next up to 10 s later), 15 s at most. Prints rates and per-operation
costs, and the CPU each process used. Measures, asserts nothing.

On a 2-core host the nodes, the simulator, Redis, Postgres and this client share two cores: the
throughput columns say what this host sustains, not what a node does; the per-operation columns
(commands, transactions, rows per handshake or turn) do not depend on the load and are what
docs/scaling.md extrapolates from.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from conftest import UPSTREAM_KEY, make_tenant  # noqa: E402
from fleet_harness import ADMIN_TOKEN, Fleet  # noqa: E402
from services import (  # noqa: E402
    RedisServer,
    delete_prefix,
    fresh_database_async,
    fresh_redis_prefix,
    postgres_dsn,
)

from app import eventloop  # noqa: E402
from app.bench.load import (  # noqa: E402
    Recorder,
    Target,
    client_session,
    close_all,
    connect,
    handshake_rate,
    open_sockets,
    run_turn,
)
from app.bench.proc import CpuMeter, HostLoad, rss_bytes  # noqa: E402
from app.bench.stack import Child, spawn  # noqa: E402
from app.keystore import KeyStore  # noqa: E402
from app.ledger import migrate  # noqa: E402
from app.models import Limits  # noqa: E402

MODEL = "openai/gpt-test"  # priced by conftest.make_tenant
SETTLE_SECONDS = 1.5
STATS_WAIT_SECONDS = 15.0
BASELINE_SECONDS = 3.0
TURN_TIMEOUT = 60.0
HANDSHAKES_IN_FLIGHT = 64  # per node
PACE_SECONDS = 1.0  # paced turns: a turn, then a pause this long
BIG = 1_000_000_000
_SIM_READY = re.compile(r"simulator listening on http://([^/\s]+)/v1")
_PARTITION = re.compile(r"_(p\d{4}_\d{2}|default|legacy)$")
TOOLS = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a thing up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]
Counts = collections.Counter[str]
Work = tuple[int, float, int, int]  # operations, seconds, turns, events


def _frame(input_: list[dict[str, Any]], deltas: int | None = None) -> str:
    body: dict[str, Any] = {"type": "response.create", "model": MODEL, "input": input_}
    metadata = {"sim_delay_ms": "0"}
    if deltas is not None:
        metadata["sim_deltas"] = str(deltas)
    body["metadata"] = metadata
    body["tools"] = TOOLS
    return orjson.dumps(body).decode()


_ASK = {"role": "user", "content": 'find it [[call:lookup {"q": "x"}]]'}
_CALL = {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"}
_OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "found"}
# A tool call (7 events), then the answer to its output (9 deltas: 17 events): 12 on average.
SHORT = (_frame([_ASK]), _frame([_ASK, _CALL, _OUTPUT], deltas=9))
LONG = (_frame([{"role": "user", "content": "write at length"}], deltas=92),)  # 100 events


# -- what Redis and Postgres counted ------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    redis: Counts
    redis_cpu: float  # seconds of Redis's main thread
    xacts: int
    own: int  # this script's statements in the run database so far (each a transaction)
    inserted: Counts  # per parent table
    updated: Counts
    written: int  # ledger rows as counted in the tables: turns, sockets opened, sockets closed


# The run database's statistics and its ledger rows counted, in one statement (one transaction).
_TABLES = """
SELECT coalesce(json_agg(json_build_array(relname, n_tup_ins, n_tup_upd)), '[]') AS tables,
       (SELECT count(*) FROM turns) + (SELECT count(*) FROM sockets)
       + (SELECT count(*) FROM sockets WHERE closed_at IS NOT NULL) AS written
FROM pg_stat_user_tables
"""


@dataclass
class Meters:
    redis: aioredis.Redis
    pg: asyncpg.Connection  # the run database
    admin: asyncpg.Connection  # another database: its reads are not the run database's xacts
    database: str
    own: int = 0

    async def snapshot(self) -> Snapshot:
        stats = await self.redis.info("commandstats")
        redis = collections.Counter(
            {
                name.removeprefix("cmdstat_").upper(): int(fields["calls"])
                for name, fields in stats.items()
                if name != "cmdstat_info"
            }
        )
        cpu = await self.redis.info("cpu")
        redis_cpu = float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])
        xacts = await self.admin.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", self.database
        )
        self.own += 1
        row = await self.pg.fetchrow(_TABLES)
        assert row is not None
        inserted: Counts = collections.Counter()
        updated: Counts = collections.Counter()
        for name, ins, upd in orjson.loads(row["tables"]):
            parent = _PARTITION.sub("", name)
            inserted[parent] += ins
            updated[parent] += upd
        return Snapshot(
            time.monotonic(),
            redis,
            redis_cpu,
            int(xacts),
            self.own,
            inserted,
            updated,
            int(row["written"]),
        )

    async def settled(self) -> Snapshot:
        """A snapshot once the ledger has written what the load made and Postgres's statistics
        show it: a backend that has just flushed its statistics sends the next ones up to 10 s
        later (PGSTAT_IDLE_INTERVAL)."""
        await asyncio.sleep(SETTLE_SECONDS)
        deadline = time.monotonic() + STATS_WAIT_SECONDS
        while True:
            snap = await self.snapshot()
            counted = sum(snap.inserted[t] + snap.updated[t] for t in ("turns", "sockets"))
            if counted == snap.written or time.monotonic() > deadline:
                return snap
            await asyncio.sleep(0.5)


@dataclass
class Cost:
    """One phase: its operations and what Redis and Postgres did meanwhile, less the nodes'
    idle rate over the phase's duration."""

    ops: int
    seconds: float
    redis: dict[str, float]  # commands by name
    redis_cpu: float  # seconds of Redis's main thread
    xacts: float
    inserted: dict[str, float]
    updated: dict[str, float]
    turns: int = 0
    events: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # cores per process during the load

    @property
    def redis_total(self) -> float:
        return sum(self.redis.values())

    def per_op(self, value: float) -> float:
        return value / self.ops if self.ops else 0.0

    def per_s(self, value: float) -> float:
        return value / self.seconds if self.seconds else 0.0

    def scaled(self, by: float) -> Cost:
        """Every count divided by `by` (per second, per socket...)."""
        return Cost(
            1,
            1.0,
            {k: v / by for k, v in self.redis.items()},
            self.redis_cpu / by,
            self.xacts / by,
            {k: v / by for k, v in self.inserted.items()},
            {k: v / by for k, v in self.updated.items()},
        )


def _delta(after: Counts, before: Counts) -> dict[str, float]:
    return {k: float(after[k] - before.get(k, 0)) for k in after if after[k] != before.get(k, 0)}


def cost(a: Snapshot, b: Snapshot, ops: int, idle: Cost | None, seconds: float) -> Cost:
    """From a to b, less `idle` (a rate) over b.at - a.at; `seconds`: the load's own time."""
    window = b.at - a.at
    redis = _delta(b.redis, a.redis)
    redis_cpu = b.redis_cpu - a.redis_cpu
    # This script's own statements in the run database are transactions there too.
    xacts = float(b.xacts - a.xacts - (b.own - a.own))
    if idle is not None:
        for name, rate in idle.redis.items():
            redis[name] = redis.get(name, 0.0) - rate * window
        redis_cpu -= idle.redis_cpu * window
        xacts -= idle.xacts * window
    return Cost(
        ops,
        seconds,
        {k: v for k, v in redis.items() if v > 0.5},
        max(redis_cpu, 0.0),
        max(xacts, 0.0),
        _delta(b.inserted, a.inserted),
        _delta(b.updated, a.updated),
    )


# -- the loads ------------------------------------------------------------------------------------


async def storm(targets: list[Target], per_node: int, seconds: float) -> tuple[int, float]:
    """Rounds of `per_node` raw handshakes on every node, opened then closed, until `seconds`."""
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        results = await asyncio.gather(
            *(
                handshake_rate(t, per_node, HANDSHAKES_IN_FLIGHT, timeout=TURN_TIMEOUT)
                for t in targets
            )
        )
        for r in results:
            if r.failed:
                raise RuntimeError(f"{r.failed} handshakes failed; first: {r.first_failure}")
            done += r.count
    return done, time.perf_counter() - began


async def loop_turns(
    sockets: list[aiohttp.ClientWebSocketResponse],
    frames: tuple[str, ...],
    seconds: float,
    pause: float = 0.0,
) -> tuple[Recorder, float]:
    """Every socket runs turns (cycling through `frames`), `pause` apart, until `seconds`."""
    rec = Recorder()
    began = time.perf_counter()

    async def one(ws: aiohttp.ClientWebSocketResponse, first: int) -> None:
        i = first
        while time.perf_counter() - began < seconds:
            await run_turn(ws, frames[i % len(frames)], rec, timeout=TURN_TIMEOUT)
            i += 1
            if pause:
                await asyncio.sleep(pause)

    step = pause / len(sockets)  # paced sockets start spread over one pause, not in lockstep
    await asyncio.gather(*(_later(n * step, one(ws, n)) for n, ws in enumerate(sockets)))
    if rec.errors:
        raise RuntimeError(f"{rec.errors} turns failed; first: {rec.first_error}")
    return rec, time.perf_counter() - began


async def _later(delay: float, job: Awaitable[None]) -> None:
    await asyncio.sleep(delay)
    await job


async def open_spread(
    http: aiohttp.ClientSession, targets: list[Target], count: int, keys: list[str] | None = None
) -> list[aiohttp.ClientWebSocketResponse]:
    """`count` sockets, spread evenly over the nodes (socket i on node i mod N, with key i when
    `keys` is given), each warmed by one turn (its upstream socket opened)."""
    gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)

    async def one(i: int) -> aiohttp.ClientWebSocketResponse:
        target = targets[i % len(targets)]
        if keys is not None:
            target = Target(target.name, target.url, keys[i])
        async with gate:
            return await connect(http, target)

    opened = list(await asyncio.gather(*(one(i) for i in range(count))))
    warm = _frame([{"role": "user", "content": "warm"}], deltas=1)
    await asyncio.gather(*(run_turn(ws, warm, None, timeout=TURN_TIMEOUT) for ws in opened))
    return opened


async def measured(
    meters: Meters,
    idle: Cost | None,
    pids: dict[str, int],
    work: Callable[[], Awaitable[Work]],
) -> Cost:
    """Snapshot, run `work` (-> operations, seconds, turns, events), settle, snapshot."""
    meter = CpuMeter(pids)
    a = await meters.settled()  # what came before (sockets opened, their rows) is counted
    meter.start()
    host = HostLoad(list(pids.values()))
    ops, seconds, turns, events = await work()
    cpu = meter.stop()
    cpu["others"] = host.others_cores() * seconds
    c = cost(a, await meters.settled(), ops, idle, seconds)
    c.turns, c.events, c.cpu = turns, events, {k: v / seconds for k, v in cpu.items()}
    return c


# -- one node count -------------------------------------------------------------------------------


@dataclass
class Run:
    nodes: int
    baseline: Cost  # per second, the nodes idle
    loads: dict[str, Cost]
    idle: Idle | None = None


@asynccontextmanager
async def fleet_of(
    nodes: int,
    redis_url: str,
    sim: str,
    workdir: Path,
    keys: int,
    rate_limit: bool,
    spend_limits: bool = False,
) -> AsyncIterator[tuple[Fleet, list[Target], list[str], Meters]]:
    """N nodes on a fresh prefix and a fresh database, a tenant with `keys` more keys; all
    removed afterwards."""
    database_url, drop = await fresh_database_async(postgres_dsn())
    prefix = fresh_redis_prefix()
    fleet: Fleet | None = None
    meters: Meters | None = None
    try:
        await migrate(database_url)
        store = KeyStore(redis_url, prefix)
        rate = BIG if rate_limit else 0
        limits = Limits(
            sockets_per_key=BIG, sockets_per_team=BIG, responses_per_minute_per_key=rate
        )
        if spend_limits:  # none bites: every turn's check 8 is the spend script
            limits = limits.model_copy(
                update={
                    "tokens_per_minute_per_key": BIG,
                    "usd_per_day_per_key": float(BIG),
                    "usd_per_day_per_team": float(BIG),
                    "usd_per_month_per_team": float(BIG),
                }
            )
        tenant = await make_tenant(store, limits=limits)
        more = [(await store.create_key(tenant.team.id, name=f"k{i}"))[1] for i in range(keys)]
        await store.close()
        fleet = Fleet.make(
            workdir / f"fleet{nodes}",
            nodes,
            REDIS_URL=redis_url,
            GATEWAY_REDIS_PREFIX=prefix,
            DATABASE_URL=database_url,
            OPENAI_BASE_URL=f"http://{sim}/v1",
            OPENAI_API_KEY=UPSTREAM_KEY,
            GATEWAY_ENV="dev",
            ADMIN_TOKEN=ADMIN_TOKEN,
            GATEWAY_LOG_LEVEL="WARNING",
            GATEWAY_DRAIN_SECONDS="5",
        )
        fleet.workdir.mkdir()
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(fleet.start(i, http) for i in range(nodes)))
        targets = [
            Target(f"n{i}", f"ws://127.0.0.1:{port}/v1/responses", tenant.key)
            for i, port in enumerate(fleet.ports)
        ]
        meters = Meters(
            aioredis.from_url(redis_url),
            await asyncpg.connect(database_url),
            await asyncpg.connect(postgres_dsn()),
            urlsplit(database_url).path.lstrip("/"),
        )
        yield fleet, targets, more, meters
    finally:
        if meters is not None:
            await meters.redis.aclose()
            await meters.pg.close()
            await meters.admin.close()
        if fleet is not None:
            for i, proc in enumerate(fleet.procs):
                if proc is not None and proc.returncode is None:
                    await fleet.stop(i)
            await fleet.close()
        await delete_prefix(redis_url, prefix)
        await drop()


def _pids(fleet: Fleet) -> dict[str, int]:
    return {f"n{i}": p.pid for i, p in enumerate(fleet.procs) if p is not None}


async def run_nodes(
    nodes: int,
    redis_url: str,
    redis_pid: int,
    sim: Child,
    workdir: Path,
    args: argparse.Namespace,
    idle: bool,
) -> Run:
    async with fleet_of(
        nodes, redis_url, sim.address, workdir, args.sockets, args.rate_limit, args.spend_limits
    ) as (
        fleet,
        targets,
        keys,
        meters,
    ):
        pids = {**_pids(fleet), "sim": sim.pid, "redis": redis_pid}
        await asyncio.sleep(1.0)  # the nodes' first view loads
        a = await meters.snapshot()
        await asyncio.sleep(BASELINE_SECONDS)
        b = await meters.snapshot()
        baseline = cost(a, b, 1, None, b.at - a.at).scaled(b.at - a.at)
        loads: dict[str, Cost] = {}

        async def handshakes() -> Work:
            per_node = max(args.sockets // nodes, 1)
            done, seconds = await storm(targets, per_node, args.seconds)
            return done, seconds, 0, 0

        print(f"{nodes} node(s): handshakes", file=sys.stderr)
        loads["handshakes"] = await measured(meters, baseline, pids, handshakes)
        async with client_session() as http:
            opened = await open_spread(http, targets, args.sockets)
            try:
                for name, frames in (("short turns", SHORT), ("long turns", LONG)):
                    print(f"{nodes} node(s): {name}", file=sys.stderr)

                    async def turns(frames: tuple[str, ...] = frames) -> Work:
                        rec, seconds = await loop_turns(opened, frames, args.seconds)
                        return rec.turns, seconds, rec.turns, rec.events

                    loads[name] = await measured(meters, baseline, pids, turns)
            finally:
                await close_all(opened)
            print(f"{nodes} node(s): paced turns", file=sys.stderr)
            opened = await open_spread(http, targets, args.sockets, keys)
            try:

                async def paced() -> Work:
                    rec, seconds = await loop_turns(opened, SHORT, args.seconds, PACE_SECONDS)
                    return rec.turns, seconds, rec.turns, rec.events

                loads["paced turns"] = await measured(meters, baseline, pids, paced)
            finally:
                await close_all(opened)
        run = Run(nodes, baseline, loads)
        if idle:
            print(f"{nodes} node(s): {args.idle_sockets} idle sockets", file=sys.stderr)
            await asyncio.sleep(SETTLE_SECONDS)
            run.idle = await idle_sockets(targets[0], fleet, meters, baseline, args)
        return run


@dataclass
class Idle:
    """What an idle socket costs: per socket and lease renewal (every 15 s), and node RSS."""

    sockets: int
    renewals: int  # renewals seen in the window (a renewal rewrites each socket's record: SET)
    per_renewal: Cost
    rss: float  # bytes per socket


async def idle_sockets(
    target: Target, fleet: Fleet, meters: Meters, baseline: Cost, args: argparse.Namespace
) -> Idle:
    """--idle-sockets sockets on node 0, idle for --idle-seconds."""
    proc = fleet.procs[0]
    assert proc is not None
    before = rss_bytes(proc.pid)
    async with client_session() as http:
        opened = await open_sockets(http, target, args.idle_sockets, HANDSHAKES_IN_FLIGHT)
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            rss = (rss_bytes(proc.pid) - before) / args.idle_sockets
            a = await meters.snapshot()
            await asyncio.sleep(args.idle_seconds)
            b = await meters.snapshot()
        finally:
            await close_all(opened)
    c = cost(a, b, args.idle_sockets, baseline, b.at - a.at)
    renewals = round(c.redis.get("SET", 0.0) / args.idle_sockets)
    return Idle(args.idle_sockets, renewals, c.scaled(max(renewals, 1) * args.idle_sockets), rss)


# -- the report -----------------------------------------------------------------------------------


def _top(counts: dict[str, float], per: float, limit: int = 12) -> str:
    parts = sorted(((k, v / per) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{k} {v:.2f}" for k, v in parts[:limit] if v >= 0.005]
    return " ".join(shown) or "-"


def _by_command(c: Cost) -> str:
    parts = sorted(c.redis.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [
        f"{k} {c.per_op(v):.2f} ({c.per_s(v):.0f}/s)" for k, v in parts if c.per_op(v) >= 0.005
    ]
    return " ".join(shown) or "-"


def _rows(c: Cost) -> tuple[float, float]:
    return sum(c.inserted.values()), sum(c.updated.values())


def report(runs: list[Run], args: argparse.Namespace) -> None:
    head = (
        f"{'nodes':>5} {'load':11} {'ops/s':>6} {'turns/s':>7} {'events/s':>8} {'redis/s':>7}"
        f" {'pg xact/s':>9} {'ins/s':>6} {'upd/s':>5} | {'redis/op':>8} {'redis us/op':>11}"
        f" {'xact/op':>7} {'ins/op':>6} {'upd/op':>6} | cores: nodes sim redis client others"
    )
    print(head)
    print("-" * len(head))
    for run in runs:
        for name, c in run.loads.items():
            ins, upd = _rows(c)
            nodes_cpu = sum(v for k, v in c.cpu.items() if k.startswith("n"))
            print(
                f"{run.nodes:>5} {name:11} {c.per_s(c.ops):>6.0f} {c.per_s(c.turns):>7.0f}"
                f" {c.per_s(c.events):>8.0f} {c.per_s(c.redis_total):>7.0f}"
                f" {c.per_s(c.xacts):>9.1f} {c.per_s(ins):>6.0f} {c.per_s(upd):>5.0f} |"
                f" {c.per_op(c.redis_total):>8.2f} {c.per_op(c.redis_cpu) * 1e6:>11.1f}"
                f" {c.per_op(c.xacts):>7.3f} {c.per_op(ins):>6.2f} {c.per_op(upd):>6.2f} |"
                f" {nodes_cpu:.2f} {c.cpu.get('sim', 0.0):.2f} {c.per_s(c.redis_cpu):.2f}"
                f" {c.cpu.get('client', 0.0):.2f} {c.cpu.get('others', 0.0):.2f}"
            )
    print(
        "\nops: handshakes (an open and its close) or turns. redis: INFO commandstats calls (a"
        " script's own calls included; EVALSHA is the call the client sent), less the nodes'"
        " idle rate; redis us/op: CPU time of Redis's main thread per operation. pg: the run"
        " database's xact_commit and n_tup_ins / n_tup_upd summed over its tables (a socket's"
        " open is an insert, its close an update of that row; a turn an insert). cores: CPU"
        " seconds per second of the load (nodes together; redis: its main thread; others: the rest"
        " of the host, Postgres included)."
    )
    print("\nRedis commands by command, per operation (and per second):")
    for run in runs:
        for name, c in run.loads.items():
            print(f"  {run.nodes} node(s), {name}: {_by_command(c)}")
    print("\nPostgres rows per operation, by table (inserted; updated):")
    for run in runs:
        for name, c in run.loads.items():
            inserted = _top(c.inserted, c.ops, 4)
            updated = _top(c.updated, c.ops, 4)
            print(f"  {run.nodes} node(s), {name}: {inserted}; {updated}")
    print("\nThe nodes idle, no socket (per second, all nodes together):")
    for run in runs:
        b = run.baseline
        print(
            f"  {run.nodes} node(s): redis {b.redis_total:.1f} commands/s ({_top(b.redis, 1)});"
            f" pg xact {b.xacts:.2f}/s"
        )
    for run in runs:
        if run.idle is not None:
            i, r = run.idle, run.idle.per_renewal
            print(
                f"\nAn idle socket ({i.sockets} on one node, {args.idle_seconds:g} s,"
                f" {i.renewals} lease renewals seen): redis {r.redis_total:.2f} commands per"
                f" renewal ({_top(r.redis, 1, 6)}), {r.redis_cpu * 1e6:.1f} us of Redis CPU;"
                f" pg xact {r.xacts:.4f}; node RSS {i.rss / 1024:.1f} KiB per socket"
            )
    print(
        f"\n{args.sockets} sockets for the turn loads, spread evenly over the nodes; handshake"
        f" rounds of {args.sockets} per node; {args.seconds:g} s per load; rate limit"
        f" {'on' if args.rate_limit else 'off'}; spend and token limits"
        f" {'on' if args.spend_limits else 'off'}; host cores:"
        f" {os.cpu_count()}."
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load and node count")
    parser.add_argument("--sockets", type=int, default=120, help="sockets of the turn loads")
    parser.add_argument("--idle-sockets", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="0: no idle phase")
    parser.add_argument(
        "--no-rate-limit",
        dest="rate_limit",
        action="store_false",
        help="the team without responses_per_minute_per_key (its socket caps kept)",
    )
    parser.add_argument(
        "--spend-limits",
        action="store_true",
        help="the team also with tokens per minute and USD budgets (none bites): check 8 is the "
        "spend script every turn",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    began = time.monotonic()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM cancels the run like ^C does, so the nodes stop and the database is dropped.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    server = await asyncio.to_thread(lambda: RedisServer().start())
    workdir = tempfile.TemporaryDirectory(prefix="gw-capacity-")
    sim: Child | None = None
    runs: list[Run] = []
    try:
        sim = await spawn(
            "simulator",
            [sys.executable, "-m", "app", "simulate", "--port", "0"],
            env=dict(os.environ),
            workdir=Path(workdir.name),
            ready=_SIM_READY,
        )
        for i, nodes in enumerate(counts):
            last = i == len(counts) - 1 and args.idle_seconds > 0
            assert server.pid is not None
            runs.append(
                await run_nodes(nodes, server.url, server.pid, sim, Path(workdir.name), args, last)
            )
    finally:
        if sim is not None:
            await sim.stop()
        await asyncio.to_thread(server.close)
        workdir.cleanup()
    report(runs, args)
    print(f"took {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    try:
        eventloop.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("interrupted; the nodes stopped, the run's database and key prefix removed")
        sys.exit(130)
