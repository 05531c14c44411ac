"""`gateway serve --workers 2` as a real process: one /metrics across the workers, and SIGTERM
while responses stream (CONTRACT.md §6).

The gateway runs as a subprocess against the suite's Redis and Postgres (fresh prefix, migrated
test database) and the in-process upstream simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from conftest import UPSTREAM_KEY, Sim, Tenant, create, eventually, make_tenant, recv, send, turn
from prometheus_client.parser import text_string_to_metric_families
from test_ws_handshake import grab as ws_grab

from app.keystore import KeyStore

ADMIN_TOKEN = "admin-ops-token"
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}
START_SECONDS = 30.0


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    base: str
    stderr: Path
    tenant: Tenant

    def url(self, path: str) -> str:
        return self.base + path

    def ws_url(self, path: str = "/v1/responses") -> str:
        return self.base.replace("http://", "ws://") + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tenant.key}"}


@contextlib.asynccontextmanager
async def serve_workers(
    tmp_path: Path,
    sim: Sim,
    redis_url: str,
    redis_prefix: str,
    database_url: str,
    workers: int = 2,
    **extra_env: str,
) -> AsyncIterator[Served]:
    store = KeyStore(redis_url, redis_prefix)
    tenant = await make_tenant(store)
    await store.close()
    inherited = ("GATEWAY_", "PROMETHEUS_MULTIPROC_DIR")  # a developer's settings stay out
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(
        REDIS_URL=redis_url,
        GATEWAY_REDIS_PREFIX=redis_prefix,
        DATABASE_URL=database_url,
        OPENAI_BASE_URL=sim.base_url,
        OPENAI_API_KEY=UPSTREAM_KEY,
        GATEWAY_ENV="dev",
        ADMIN_TOKEN=ADMIN_TOKEN,
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT="0",
        GATEWAY_SPILL_DIR=str(tmp_path / "spill"),
        GATEWAY_LOG_LEVEL="INFO",
        **extra_env,
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            "--workers",
            str(workers),
            cwd=tmp_path,  # no .env of a developer's checkout
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        base = await _listening(proc, out, err)
        yield Served(proc, base, err, tenant)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _listening(proc: asyncio.subprocess.Process, out: Path, err: Path) -> str:
    """The base URL from the line `gateway listening on http://HOST:PORT (N workers)`."""
    deadline = asyncio.get_running_loop().time() + START_SECONDS
    while asyncio.get_running_loop().time() < deadline:
        found = re.search(
            r"gateway listening on (http://\S+)", await asyncio.to_thread(out.read_text)
        )
        if found:
            return found.group(1)
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    output = await asyncio.to_thread(err.read_text)
    raise AssertionError(f"gateway did not start: {output[-3000:]}")


async def scrape(http: aiohttp.ClientSession, served: Served) -> dict[str, float]:
    """Every sample of one /metrics answer, keyed `name{label="value",…}` (labels sorted). A
    connection of its own: a kept-alive one may lead to a worker a test has just killed."""
    async with http.get(served.url("/metrics"), headers={"Connection": "close"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def session_nodes(http: aiohttp.ClientSession, served: Served) -> list[str]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"}  # see scrape
    async with http.get(served.url("/admin/v1/sessions"), headers=headers) as resp:
        assert resp.status == 200
        return [s["node"] for s in (await resp.json())["data"]]


async def open_on_each_worker(
    http: aiohttp.ClientSession, served: Served, stack: contextlib.AsyncExitStack, per_worker: int
) -> list[list[aiohttp.ClientWebSocketResponse]]:
    """Sockets of each of the two workers, at least `per_worker` each.

    The kernel picks the worker of each connection; the admin API's session list tells which.
    """
    by_node: dict[str, list[aiohttp.ClientWebSocketResponse]] = {}
    known: Counter[str] = Counter()
    for _ in range(8 * per_worker):
        ws = await stack.enter_async_context(
            http.ws_connect(served.ws_url(), headers=served.headers)
        )
        for _ in range(100):  # the session is registered just after the handshake
            nodes = Counter(await session_nodes(http, served))
            if nodes.total() == known.total() + 1:
                break
            await asyncio.sleep(0.02)
        (node,) = nodes - known
        known = nodes
        by_node.setdefault(node, []).append(ws)
        if len(by_node) == 2 and all(len(v) >= per_worker for v in by_node.values()):
            return list(by_node.values())
    raise AssertionError(f"connections did not reach both workers: {known}")


async def test_metrics_add_up_the_sockets_of_every_worker(
    sim: Sim, redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path
) -> None:
    async with (
        serve_workers(tmp_path, sim, redis_url, redis_prefix, database_url) as served,
        aiohttp.ClientSession() as http,
        contextlib.AsyncExitStack() as stack,
    ):
        first, second = await open_on_each_worker(http, served, stack, per_worker=4)
        opened = [*first, *second]
        sockets = len(opened)
        for ws in opened[:4]:
            assert (await turn(ws))[-1]["type"] == "response.completed"

        async def all_counted(expected: int) -> None:
            samples = await scrape(http, served)
            assert samples["gateway_ws_connections_active"] == expected, samples

        completed = 'gateway_responses_total{model="openai/gpt-test",status="completed"}'

        async def turns_counted() -> None:
            # A worker folds a turn's counts into its file just after the turn's last event
            # went out (app/metrics.py `_Pending`): a scrape on the other worker may come first.
            assert (await scrape(http, served))[completed] == 4

        await eventually(lambda: all_counted(sockets), interval=0.1)
        await eventually(turns_counted, interval=0.1)
        for _ in range(8):  # whichever worker answers, it counts every worker's sockets
            samples = await scrape(http, served)
            assert samples["gateway_ws_connections_active"] == sockets
            assert samples['gateway_ws_connections_total{outcome="accepted"}'] == sockets
            assert samples[completed] == 4
            assert samples["gateway_redis_up"] == 1
            assert samples["process_resident_memory_bytes"] > 0
            assert samples["process_open_fds"] > 0

        # A worker killed outright: the parent marks it dead, so its sockets leave the gauge
        # (counters keep what it counted), and starts another in its place.
        nodes = await session_nodes(http, served)
        victim = nodes[0]
        os.kill(int(victim.rsplit("-", 2)[1]), signal.SIGKILL)
        await eventually(lambda: all_counted(sockets - nodes.count(victim)), interval=0.1)
        samples = await scrape(http, served)
        assert samples['gateway_ws_connections_total{outcome="accepted"}'] == sockets

        async def replaced() -> None:
            await stack.enter_async_context(
                http.ws_connect(served.ws_url(), headers=served.headers)
            )
            assert set(await session_nodes(http, served)) - set(nodes)

        await eventually(replaced, timeout=15, interval=0.1)
        await stack.aclose()
        await eventually(lambda: all_counted(0), interval=0.1)
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 20) == 0


async def test_the_socket_cap_is_the_nodes_across_its_workers(
    sim: Sim, redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path
) -> None:
    """GATEWAY_MAX_SOCKETS=6 on two workers: 16 handshakes at once get 6 sockets in all, not 6
    a worker, and 503 `server_overloaded` for the rest. A worker killed outright gives its
    places back. A stop while its replacement starts exits 0."""
    async with (
        serve_workers(
            tmp_path, sim, redis_url, redis_prefix, database_url, GATEWAY_MAX_SOCKETS="6"
        ) as served,
        aiohttp.ClientSession() as http,
        contextlib.AsyncExitStack() as stack,
    ):

        async def grab() -> int:
            status, _ = await ws_grab(stack, http, served.ws_url(), served.headers)
            return status

        got = await asyncio.gather(*(grab() for _ in range(16)))
        assert sorted(got) == [101] * 6 + [503] * 10, got
        nodes = await session_nodes(http, served)
        assert len(nodes) == 6
        victim = Counter(nodes).most_common(1)[0][0]
        freed = nodes.count(victim)
        os.kill(int(victim.rsplit("-", 2)[1]), signal.SIGKILL)

        async def served_again() -> None:
            assert await grab() == 101  # 503 until the parent has seen the worker die

        for _ in range(freed):
            await eventually(served_again, timeout=15, interval=0.1)
        assert await grab() == 503  # full again: 6 sockets

        async def restarting() -> None:
            log = await asyncio.to_thread(served.stderr.read_text)
            assert log.count('"message":"worker started"') == 3

        # The stop comes while the dead worker's replacement is still starting, before it set up
        # its drain: it had nothing to drain, so the stop is still a clean one.
        await eventually(restarting, timeout=15, interval=0.02)
        served.proc.send_signal(signal.SIGTERM)
        await stack.aclose()
        assert await asyncio.wait_for(served.proc.wait(), 20) == 0


async def refused_handshake(http: aiohttp.ClientSession, served: Served) -> int | None:
    """The status a new handshake gets (None: accepted, closed again at once)."""
    try:
        ws = await http.ws_connect(served.ws_url(), headers=served.headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return None


async def read_until_closed(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=15)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return events
        events.append(orjson.loads(msg.data))


async def test_sigterm_lets_streams_finish_refuses_new_work_and_exits_0(
    sim: Sim, redis_url: str, redis_prefix: str, database_url: str, tmp_path: Path
) -> None:
    deltas = 40
    async with (
        serve_workers(
            tmp_path, sim, redis_url, redis_prefix, database_url, GATEWAY_DRAIN_SECONDS="8"
        ) as served,
        aiohttp.ClientSession() as http,
        contextlib.AsyncExitStack() as stack,
    ):
        # On each worker: two sockets streaming a response, one idle (and any extra: idle too).
        first, second = await open_on_each_worker(http, served, stack, per_worker=3)
        busy = [*first[:2], *second[:2]]
        too_long = first[2]
        idle = [second[2], *first[3:], *second[3:]]
        for ws in busy:  # about 3 s each, well inside the 8 s deadline
            await send(ws, create(metadata={"sim_deltas": str(deltas), "sim_delay_ms": "75"}))
        # About 20 s: still running at the drain deadline.
        await send(
            too_long, create(stream_id="L", metadata={"sim_deltas": "400", "sim_delay_ms": "50"})
        )
        for ws in [*busy, too_long]:
            assert (await recv(ws))["type"] == "response.created"

        served.proc.send_signal(signal.SIGTERM)
        # Clients keep reading, as real ones do (aiohttp's client reports 1006 for a close frame
        # it reads only after the server has dropped the connection).
        busy_events = [asyncio.create_task(read_until_closed(ws)) for ws in busy]
        idle_events = [asyncio.create_task(read_until_closed(ws)) for ws in idle]
        long_events = asyncio.create_task(read_until_closed(too_long))

        # Refused at once, before auth, with Retry-After: 1 (or, once a worker stopped
        # listening, a refused connection); /readyz says draining; a POST is refused too.
        async def refusing() -> None:
            assert await refused_handshake(http, served) == 503

        await eventually(refusing, timeout=3, interval=0.1)
        for _ in range(4):
            assert await refused_handshake(http, served) == 503
        async with http.get(served.url("/v1/responses"), headers=UPGRADE) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "server_shutting_down"
        async with http.get(served.url("/readyz")) as resp:
            assert resp.status == 503 and (await resp.json())["draining"] is True
        async with http.post(served.url("/v1/responses"), json={}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"

        # Idle sockets close with 1001 at once (while the busy ones still stream).
        for ws, task in zip(idle, idle_events, strict=True):
            assert await asyncio.wait_for(task, 2) == []
            assert ws.close_code == 1001
        assert not any(task.done() for task in busy_events)

        # Every response in flight completes, then its socket closes with 1001.
        response_ids = []
        for ws, task in zip(busy, busy_events, strict=True):
            events = await task
            assert events[-1]["type"] == "response.completed", events[-3:]
            deltas_seen = [e for e in events if e["type"] == "response.output_text.delta"]
            assert len(deltas_seen) == deltas
            assert ws.close_code == 1001
            response_ids.append(events[-1]["response"]["id"])

        # The one still running at GATEWAY_DRAIN_SECONDS gets server_shutting_down, then 1001.
        events = await long_events
        assert events[-1]["type"] == "error" and events[-1]["status"] == 503
        assert events[-1]["error"]["code"] == "server_shutting_down"
        assert events[-1]["stream_id"] == "L"
        assert too_long.close_code == 1001

        assert await asyncio.wait_for(served.proc.wait(), 20) == 0

    # The ledger was flushed before the exit: every completed response has its row.
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT response_id, status FROM turns WHERE response_id = ANY($1::text[])",
            response_ids,
        )
    finally:
        await conn.close()
    assert {r["response_id"]: r["status"] for r in rows} == dict.fromkeys(response_ids, "completed")

    # One JSON line per socket open and close and per response; the key's prefix, never the key.
    lines = [orjson.loads(line) for line in served.stderr.read_text().splitlines() if line]
    assert served.tenant.key not in served.stderr.read_text()
    by_message: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_message.setdefault(line["message"], []).append(line)
    assert len(by_message["socket open"]) >= len(busy) + len(idle) + 1
    assert len(by_message["socket closed"]) == len(by_message["socket open"])
    finished = {r["response_id"]: r for r in by_message["response"]}
    for response_id in response_ids:
        logged = finished[response_id]
        assert logged["status"] == "completed" and logged["duration_ms"] > 0
        assert logged["socket_id"].startswith("ws_") and logged["key_prefix"]
        assert logged["model"] == "openai/gpt-test"
    assert {line["pid"] for line in by_message["socket open"]} != {lines[0]["pid"]}
