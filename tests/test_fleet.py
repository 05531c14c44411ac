"""Three `gateway serve` nodes behind HAProxy (ops/haproxy.cfg, Debian's haproxy), 24 clients
running agent loops through it, and a rolling restart (CONTRACT.md §6): no response is cut, a
client whose socket closed with 1001 gets its next turn served elsewhere within seconds, the
ledger has one row per response, and no socket slot is left behind. The figures are printed
(`pytest -s`). scripts/fleet.py runs the same with hundreds of clients.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import UPSTREAM_KEY, Sim, Tenant, eventually, make_tenant
from fleet_harness import (
    ADMIN_TOKEN,
    Figures,
    Fleet,
    haproxy_binary,
    ledger_counts,
    live_slots,
    rolling_restart,
    run_agents,
    run_haproxy,
    slots_held,
)

from app.keystore import KeyStore
from app.models import Limits

CLIENTS = 24
NODES = 3

pytestmark = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (make deps installs it)"
)


async def tenant_and_fleet(
    sim: Sim,
    redis_url: str,
    redis_prefix: str,
    database_url: str,
    tmp_path: Path,
    **settings: str,
) -> tuple[Tenant, Fleet]:
    """A tenant with socket caps (every socket takes a slot of the key's and the team's sets)
    and NODES `gateway serve` nodes behind HAProxy, not started yet."""
    store = KeyStore(redis_url, redis_prefix)
    tenant = await make_tenant(store, limits=Limits(sockets_per_key=1000, sockets_per_team=1000))
    await store.close()
    fleet = Fleet.make(
        tmp_path,
        NODES,
        REDIS_URL=redis_url,
        GATEWAY_REDIS_PREFIX=redis_prefix,
        DATABASE_URL=database_url,
        OPENAI_BASE_URL=sim.base_url,
        OPENAI_API_KEY=UPSTREAM_KEY,
        GATEWAY_ENV="dev",
        ADMIN_TOKEN=ADMIN_TOKEN,
        GATEWAY_LOG_LEVEL="WARNING",
        **settings,
    )
    return tenant, fleet


async def test_rolling_restart_behind_haproxy_cuts_nothing(
    sim: Sim, redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path
) -> None:
    tenant, fleet = await tenant_and_fleet(
        sim,
        redis_url,
        redis_prefix,
        database_url,
        tmp_path,
        GATEWAY_DRAIN_SECONDS="15",
        GATEWAY_TRUST_FORWARDED_FOR="true",
    )
    figures = Figures()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        try:
            for i in range(NODES):
                await fleet.start(i, http)
            async with run_haproxy(tmp_path, fleet.ports, "inter 200ms fall 1 rise 2") as haproxy:
                await haproxy.wait_up(http)
                clients = asyncio.create_task(
                    run_agents(haproxy.ws_url, tenant.key, CLIENTS, stop, figures)
                )
                await asyncio.sleep(2)  # every client is in its loop
                drains = await rolling_restart(fleet, haproxy, http, pause=1.5)
                await asyncio.sleep(1)
                stop.set()
                await asyncio.wait_for(clients, 60)

                # Every client closed its socket: no session and no slot is left.
                async def released() -> None:
                    held = await slots_held(redis_url, redis_prefix, tenant.key_id, tenant.team.id)
                    assert held == {"key": 0, "team": 0, "sessions": 0}, held
                    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                    url = fleet.base(0) + "/admin/v1/sessions"
                    async with http.get(url, headers=headers) as resp:
                        assert (await resp.json())["data"] == []

                await eventually(released, timeout=20, interval=0.2)
            for i in range(NODES):  # a drain flushes the ledger
                assert await fleet.stop(i) == 0
        finally:
            await fleet.close()

    rows = await ledger_counts(database_url, tenant.key_id)
    recon = figures.reconnects
    print(
        f"\nfleet: {NODES} nodes, {CLIENTS} clients, drains "
        f"{', '.join(f'{d:.1f}s' for d in drains)}\n{figures.summary()}\n"
        f"ledger rows {sum(rows.values())} for {len(figures.started)} responses"
    )
    assert figures.cut == [], figures.cut
    assert figures.errors == [], figures.errors[:3]
    assert set(figures.ended) == {"response.completed"}
    assert sum(figures.ended.values()) == len(figures.started)
    # The restarts closed sockets, with 1001 only, and each of those clients went on.
    assert figures.closes and set(figures.closes) == {1001}, figures.closes
    assert len(recon) >= sum(figures.closes.values()) - CLIENTS  # the last close of each may
    assert recon and max(recon) < 10, recon  # end the run before its next turn
    assert statistics.median(recon) < 5
    assert figures.tool_calls > 0
    # One ledger row per response, none missing, none twice.
    assert rows == dict.fromkeys(figures.started, 1)


async def test_a_node_killed_mid_stream_loses_its_sockets_and_their_slots_lapse(
    sim: Sim, redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path
) -> None:
    """SIGKILL, no drain: the node's clients see their sockets close (responses in flight cut:
    nothing can finish them), reconnect through HAProxy onto the other nodes and go on; the dead
    node's socket slots lapse within a minute (their 45 s leases are no longer renewed)."""
    clients = 12
    tenant, fleet = await tenant_and_fleet(sim, redis_url, redis_prefix, database_url, tmp_path)
    figures = Figures()
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        try:
            for i in range(NODES):
                await fleet.start(i, http)
            async with run_haproxy(tmp_path, fleet.ports, "inter 200ms fall 1 rise 2") as haproxy:
                await haproxy.wait_up(http)
                # Responses of about 2 s with short pauses: most sockets are mid-stream.
                agents = asyncio.create_task(
                    run_agents(
                        haproxy.ws_url,
                        tenant.key,
                        clients,
                        stop,
                        figures,
                        think=(0.05, 0.2),
                        deltas=40,
                        delay_ms=50,
                    )
                )

                async def on_victim() -> int:
                    async with http.get(fleet.base(1) + "/admin/v1/sessions", headers=headers) as r:
                        nodes = [s["node"] for s in (await r.json())["data"]]
                    assert nodes.count("n0") >= 2, nodes
                    return nodes.count("n0")

                victims = await eventually(on_victim, timeout=20, interval=0.1)
                await asyncio.sleep(1)  # their responses are streaming
                before = set(figures.started)
                await fleet.stop(0, signal.SIGKILL)
                killed_at = time.monotonic()
                await asyncio.sleep(5)  # the cut clients reconnect and run turns elsewhere
                stop.set()
                await asyncio.wait_for(agents, 60)
                after = figures.started - before
                # Every client closed its socket; what is left are the dead node's slots.
                held = await live_slots(redis_url, redis_prefix, tenant.key_id, tenant.team.id)
                assert 0 < held["key"] <= victims + 2, held

                async def lapsed() -> None:
                    held = await live_slots(redis_url, redis_prefix, tenant.key_id, tenant.team.id)
                    assert held == {"key": 0, "team": 0}, held

                await eventually(lapsed, timeout=75, interval=0.5)
                lapse = time.monotonic() - killed_at
            for i in (1, 2):
                assert await fleet.stop(i) == 0
        finally:
            await fleet.close()

    rows = await ledger_counts(database_url, tenant.key_id)
    recon = figures.reconnects
    print(
        f"\nkill: {clients} clients, {victims} on the killed node; {figures.summary()}\n"
        f"slots lapsed {lapse:.0f}s after the kill; ledger rows {sum(rows.values())}"
    )
    assert figures.cut, "the kill cut no response (none was in flight)"
    assert len(figures.cut) <= victims + 2
    assert figures.errors == [], figures.errors[:3]
    assert recon and max(recon) < 10, recon
    assert lapse < 60
    # Nothing twice; every response started after the kill (on the other nodes) has its row.
    assert all(n == 1 for n in rows.values())
    assert after and all(rows.get(r) == 1 for r in after)
