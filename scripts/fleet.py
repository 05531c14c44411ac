"""Fleet: HAProxy in front of N `gateway serve` nodes, many clients, rolling restarts.

    .venv/bin/python scripts/fleet.py [--clients 200] [--nodes 3] [--seconds 90] [--seed 1]

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

Prints the figures; exits 1 when one of these fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402
from conftest import UPSTREAM_KEY, make_tenant  # noqa: E402
from fleet_harness import (  # noqa: E402
    ADMIN_TOKEN,
    Figures,
    Fleet,
    haproxy_binary,
    ledger_counts,
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
        figures = Figures()
        stop = asyncio.Event()
        began = time.monotonic()
        drains: list[float] = []
        async with aiohttp.ClientSession() as http:
            for i in range(args.nodes):
                await fleet.start(i, http)
            async with run_haproxy(
                Path(workdir.name), fleet.ports, "inter 200ms fall 1 rise 2"
            ) as haproxy:
                await haproxy.wait_up(http)
                clients = asyncio.create_task(
                    run_agents(haproxy.ws_url, tenant.key, args.clients, stop, figures, args.seed)
                )
                await asyncio.sleep(3)
                rounds = 0
                while rounds == 0 or time.monotonic() - began < args.seconds:
                    drains += await rolling_restart(fleet, haproxy, http, pause=2)
                    rounds += 1
                    print(f"round {rounds} at {time.monotonic() - began:.0f}s: {figures.summary()}")
                stop.set()
                await asyncio.wait_for(clients, 120)
                held: dict[str, int] = {}
                for _ in range(100):
                    held = await slots_held(redis, prefix, tenant.key_id, tenant.team.id)
                    if not any(held.values()):
                        break
                    await asyncio.sleep(0.2)
            for i in range(args.nodes):
                code = await fleet.stop(i)
                assert code == 0, f"node {i} exited {code} at the end"
        rows = await ledger_counts(database_url, tenant.key_id)
        took = time.monotonic() - began
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
            failures.append(
                f"ledger: {len(missing)} missing, {len(extra)} extra, {len(twice)} twice"
            )
        if any(held.values()):
            failures.append(f"slots left: {held}")
        return failures
    finally:
        if fleet is not None:
            await fleet.close()
        await sim_runner.cleanup()
        await delete_prefix(redis, prefix)
        await drop()
        workdir.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=90.0, help="rolling restarts until then")
    parser.add_argument("--seed", type=int, default=1)
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
