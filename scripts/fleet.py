"""Fleet: HAProxy in front of N `gateway serve` nodes, many clients, rolling restarts or a kill.

    .venv/bin/python scripts/fleet.py [--clients 200] [--nodes 3] [--seconds 90] [--seed 1]
                                      [--kill]

tests/test_fleet.py at scale (the harness is tests/fleet_harness.py): Debian's haproxy with
ops/haproxy.cfg (real ports, 200 ms checks), N nodes as subprocesses on their own ports sharing
the Redis and Postgres the tests use (a fresh key prefix and a throwaway database, removed
afterwards) and a simulator in this process. Clients run agent loops (chained turns, tool calls,
on a close a new socket with the whole conversation) while the nodes are restarted one at a time
(SIGTERM, drain, exit 0, start, ready, back in HAProxy's rotation), round after round until
`--seconds` has passed (at least one round). Then the clients stop, the nodes drain, and:
- no response a client saw start was cut, and each ended with response.completed;
- every close the clients saw was 1001, and the next turn after it succeeded (times printed);
- the ledger has exactly one `turns` row per response id the clients saw;
- no socket slot or session is left in Redis.

With --kill, no restart: once node 0 holds sockets whose responses are streaming (responses of
about 2 s: 40 deltas 50 ms apart), it is SIGKILLed (no drain), and the run goes on until
--seconds (at least 10 s after the kill). Then it reports the clients that saw a close, their
reconnect times (close to the next turn's completion, through HAProxy onto the other nodes), the
responses cut (only the killed node's: at most the sockets it held, and none of them written by
another node), the ledger rows the kill lost (rows still in the killed node's memory: up to its
0.1 s flush), and how long the killed node's socket slots stayed live in Redis (their 45 s
leases are no longer renewed: under a minute, CONTRACT.md §4). It fails when a slot outlives a
minute, a response not on the killed node was cut, a turn got an error, a reconnect took over
10 s, or a response started after the kill has no ledger row.

Prints the figures; exits 1 when one of these fails.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from aiohttp import web  # noqa: E402
from conftest import UPSTREAM_KEY, Tenant, make_tenant  # noqa: E402
from fleet_harness import (  # noqa: E402
    ADMIN_TOKEN,
    Figures,
    Fleet,
    HAProxy,
    haproxy_binary,
    ledger_counts,
    live_slots,
    rolling_restart,
    run_agents,
    run_haproxy,
    slots_held,
)
from services import (  # noqa: E402
    delete_prefix,
    fresh_database_async,
    fresh_redis_prefix,
    postgres_dsn,
    redis_url,
)

from app.keystore import KeyStore  # noqa: E402
from app.ledger import migrate  # noqa: E402
from app.models import Limits  # noqa: E402
from app.simulator import SimulatorOptions, create_simulator_app  # noqa: E402


@dataclass
class Run:
    """What both modes work with: the fleet behind HAProxy, its tenant, where its data lives."""

    args: argparse.Namespace
    fleet: Fleet
    haproxy: HAProxy
    http: aiohttp.ClientSession
    tenant: Tenant
    redis: str
    prefix: str
    database_url: str
    began: float


async def run(args: argparse.Namespace) -> list[str]:
    """The failures (empty: all held)."""
    redis, admin_dsn = redis_url(), postgres_dsn()
    database_url, drop = await fresh_database_async(admin_dsn)
    prefix = fresh_redis_prefix()
    workdir = tempfile.TemporaryDirectory(prefix="gw-fleet-")
    sim_runner = web.AppRunner(create_simulator_app(SimulatorOptions()), access_log=None)
    fleet: Fleet | None = None
    try:
        await migrate(database_url)
        await sim_runner.setup()
        site = web.TCPSite(sim_runner, "127.0.0.1", 0)
        await site.start()
        host, port = sim_runner.addresses[0][:2]
        store = KeyStore(redis, prefix)
        cap = 10 * args.clients
        tenant = await make_tenant(store, limits=Limits(sockets_per_key=cap, sockets_per_team=cap))
        await store.close()
        fleet = Fleet.make(
            Path(workdir.name),
            args.nodes,
            REDIS_URL=redis,
            GATEWAY_REDIS_PREFIX=prefix,
            DATABASE_URL=database_url,
            OPENAI_BASE_URL=f"http://{host}:{port}/v1",
            OPENAI_API_KEY=UPSTREAM_KEY,
            GATEWAY_ENV="dev",
            ADMIN_TOKEN=ADMIN_TOKEN,
            GATEWAY_DRAIN_SECONDS="20",
            GATEWAY_TRUST_FORWARDED_FOR="true",
            GATEWAY_LOG_LEVEL="WARNING",
        )
        began = time.monotonic()
        async with aiohttp.ClientSession() as http:
            for i in range(args.nodes):
                await fleet.start(i, http)
            async with run_haproxy(
                Path(workdir.name), fleet.ports, "inter 200ms fall 1 rise 2"
            ) as haproxy:
                await haproxy.wait_up(http)
                setup = Run(args, fleet, haproxy, http, tenant, redis, prefix, database_url, began)
                return await (kill(setup) if args.kill else restarts(setup))
    finally:
        if fleet is not None:
            await fleet.close()
        await sim_runner.cleanup()
        await delete_prefix(redis, prefix)
        await drop()
        workdir.cleanup()


async def restarts(run: Run) -> list[str]:
    """Rolling restarts until --seconds; the failures."""
    args, fleet, tenant = run.args, run.fleet, run.tenant
    figures = Figures()
    stop = asyncio.Event()
    drains: list[float] = []
    clients = asyncio.create_task(
        run_agents(run.haproxy.ws_url, tenant.key, args.clients, stop, figures, args.seed)
    )
    await asyncio.sleep(3)
    rounds = 0
    while rounds == 0 or time.monotonic() - run.began < args.seconds:
        drains += await rolling_restart(fleet, run.haproxy, run.http, pause=2)
        rounds += 1
        print(f"round {rounds} at {time.monotonic() - run.began:.0f}s: {figures.summary()}")
    stop.set()
    await asyncio.wait_for(clients, 120)
    held: dict[str, int] = {}
    for _ in range(100):
        held = await slots_held(run.redis, run.prefix, tenant.key_id, tenant.team.id)
        if not any(held.values()):
            break
        await asyncio.sleep(0.2)
    for i in range(args.nodes):
        code = await fleet.stop(i)
        assert code == 0, f"node {i} exited {code} at the end"
    rows = await ledger_counts(run.database_url, tenant.key_id)
    took = time.monotonic() - run.began
    print(
        f"fleet: {args.nodes} nodes, {args.clients} clients, {rounds} rolling restarts in "
        f"{took:.0f}s, drains max {max(drains):.1f}s\n{figures.summary()}\n"
        f"ledger rows {sum(rows.values())} for {len(figures.started)} responses; "
        f"slots left {held}"
    )
    failures = []
    if figures.cut:
        failures.append(f"{len(figures.cut)} responses cut")
    if figures.errors:
        failures.append(f"{len(figures.errors)} errors, first {figures.errors[0]}")
    if set(figures.closes) - {1001}:
        failures.append(f"closes other than 1001: {dict(figures.closes)}")
    if max(figures.reconnects, default=0.0) > 10:
        failures.append(f"a reconnect took {max(figures.reconnects):.1f}s")
    if rows != dict.fromkeys(figures.started, 1):
        missing = figures.started - set(rows)
        extra = set(rows) - figures.started
        twice = [r for r, n in rows.items() if n > 1]
        failures.append(f"ledger: {len(missing)} missing, {len(extra)} extra, {len(twice)} twice")
    if any(held.values()):
        failures.append(f"slots left: {held}")
    return failures


async def sessions_on(run: Run, node: str) -> set[str]:
    """Ids of the live sockets of `node`, from GET /admin/v1/sessions on the last node (never
    the victim). A dead node's sockets are listed until their leases lapse."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    url = run.fleet.base(len(run.fleet.ports) - 1) + "/admin/v1/sessions"
    async with run.http.get(url, headers=headers) as resp:
        data = (await resp.json())["data"]
    return {str(s["id"]) for s in data if s["node"] == node}


async def lapse_of(run: Run, sockets: set[str], since: float) -> float | None:
    """Seconds from `since` until none of `sockets` holds a live slot (lease deadline in the
    future) in the key's or the team's slot set; None after 90 s."""
    store = KeyStore(run.redis, run.prefix)
    client = aioredis.from_url(run.redis)
    ids = sorted(sockets)
    try:
        while time.monotonic() - since < 90:
            now = time.time() * 1000
            live = 0
            for name in (store.key_slots(run.tenant.key_id), store.team_slots(run.tenant.team.id)):
                scores = await client.zmscore(name, ids)
                live += sum(1 for score in scores if score is not None and score > now)
            if live == 0:
                return time.monotonic() - since
            await asyncio.sleep(0.25)
        return None
    finally:
        await client.aclose()
        await store.close()


def _p50_max(seconds: list[float]) -> str:
    p50 = statistics.median(seconds) if seconds else 0.0
    return f"p50 {p50:.2f}s max {max(seconds, default=0.0):.2f}s"


async def kill(run: Run) -> list[str]:
    """SIGKILL node 0 mid-stream; the failures. tests/test_fleet.py's kill test, at scale."""
    args, fleet, tenant = run.args, run.fleet, run.tenant
    if args.nodes < 2:
        return ["--kill needs at least 2 nodes"]
    figures = Figures()
    stop = asyncio.Event()
    # Responses of about 2 s with short pauses: most sockets are mid-stream at any moment.
    clients = asyncio.create_task(
        run_agents(
            run.haproxy.ws_url,
            tenant.key,
            args.clients,
            stop,
            figures,
            args.seed,
            think=(0.05, 0.2),
            deltas=40,
            delay_ms=50,
        )
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(await sessions_on(run, "n0")) >= 2:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # their responses are streaming
    before = set(figures.started)
    await fleet.stop(0, signal.SIGKILL)
    killed_at = time.monotonic()
    # Listed once the session records written in the kill's last second are visible.
    await asyncio.sleep(1)
    victims = await sessions_on(run, "n0")
    lapse = asyncio.create_task(lapse_of(run, victims, killed_at))
    print(f"killed n0 at {killed_at - run.began:.0f}s, holding {len(victims)} sockets")
    await asyncio.sleep(max(10.0, args.seconds - (killed_at - run.began)))
    stop.set()
    await asyncio.wait_for(clients, 120)
    lapsed = await lapse
    # Every client has closed its sockets: none is live any more.
    held: dict[str, int] = {}
    for _ in range(100):
        held = await live_slots(run.redis, run.prefix, tenant.key_id, tenant.team.id)
        if not any(held.values()):
            break
        await asyncio.sleep(0.5)
    for i in range(1, args.nodes):
        code = await fleet.stop(i)
        assert code == 0, f"node {i} exited {code} at the end"
    rows = await ledger_counts(run.database_url, tenant.key_id)
    after = figures.started - before
    cut = set(figures.cut)
    lost = figures.started - cut - set(rows)  # ended, but the row died with the node
    recon = sorted(figures.reconnects)
    reopen = sorted(figures.reopens)
    closes = sum(figures.closes.values())
    codes = {int(c) if c is not None else None: n for c, n in figures.closes.items()}
    print(
        f"kill: {args.nodes} nodes, {args.clients} clients, n0 SIGKILLed holding {len(victims)}"
        f" sockets\n{figures.summary()}\n"
        f"clients that saw a close: {closes} (codes {codes}); new socket open after"
        f" {_p50_max(reopen)}; the next turn (a 2 s response) completed after {_p50_max(recon)}"
        f" ({len(recon)} clients)\n"
        f"responses cut: {len(cut)}; ledger rows of cut responses: {len(cut & set(rows))};"
        f" rows lost with the node: {len(lost)}\n"
        f"the killed node's slots lapsed "
        + (f"{lapsed:.1f}s after the kill" if lapsed is not None else "not within 90 s")
        + f"; slots live once the clients left: {held}"
    )
    failures = []
    if lapsed is None or lapsed >= 60:
        failures.append(f"the killed node's slots outlived a minute: {lapsed}")
    if len(cut) > len(victims) or closes > len(victims):
        failures.append(f"{len(cut)} cut, {closes} closes, with {len(victims)} sockets on n0")
    if cut & set(rows):
        failures.append(f"{len(cut & set(rows))} cut responses have a ledger row")
    if figures.errors:
        failures.append(f"{len(figures.errors)} errors, first {figures.errors[0]}")
    if max(recon, default=0.0) > 10:
        failures.append(f"a reconnect took {max(recon):.1f}s")
    if not after or any(rows.get(r) != 1 for r in after):
        failures.append("a response started after the kill has no ledger row (or two)")
    if any(n > 1 for n in rows.values()):
        failures.append("a response has two ledger rows")
    if any(held.values()):
        failures.append(f"slots left: {held}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=90.0, help="rolling restarts until then")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--kill", action="store_true", help="SIGKILL node 0 mid-stream instead of restarting"
    )
    args = parser.parse_args()
    if haproxy_binary() is None:
        print("haproxy is not installed (make deps installs it)", file=sys.stderr)
        return 2
    failures = asyncio.run(run(args))
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
