"""A fleet: HAProxy (Debian's package) in front of several `gateway serve` nodes, clients running
agent loops through it, and a rolling restart. Used by tests/test_fleet.py (a few dozen clients)
and scripts/fleet.py (hundreds, for longer).

The HAProxy config is ops/haproxy.cfg with the real ports, a short check interval and a stats
page added. Each node is a subprocess on its own port, with its own node id and spill directory
(kept across its restarts), sharing Redis, Postgres and the simulator.

A client does what Codex does: one socket, turns chained with `previous_response_id` and only the
new items; some turns ask for a tool call (the simulator's `[[call:NAME {...}]]`), answered by a
`function_call_output` on the next turn; when the socket closes it opens a new one (through
HAProxy, so on a node that is up) and resends the whole conversation, no `previous_response_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import random
import shutil
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import redis.asyncio as aioredis
from services import free_port

from app.keystore import KeyStore

ROOT = Path(__file__).resolve().parents[1]
OPS_HAPROXY = ROOT / "ops" / "haproxy.cfg"
MODEL = "openai/gpt-test"
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
ADMIN_TOKEN = "admin-fleet-token"
START_SECONDS = 30.0
CONNECT_SECONDS = 30.0  # a client gives up opening a socket after this long
RECEIVE_SECONDS = 30.0  # a turn's next event
TOOLS = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a thing up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


def haproxy_binary() -> str | None:
    """Debian's haproxy (scripts/install-system-deps.sh): PATH, else /usr/sbin."""
    found = shutil.which("haproxy")
    if found is None and Path("/usr/sbin/haproxy").exists():
        found = "/usr/sbin/haproxy"
    return found


def render_haproxy(listen: int, stats: int, ports: list[int], check: str) -> str:
    """ops/haproxy.cfg on loopback ports, its servers replaced by `ports`, with a stats page."""
    lines = []
    for line in OPS_HAPROXY.read_text().splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["bind"]:
            line = f"    bind 127.0.0.1:{listen}"
        elif words[:1] == ["default-server"]:  # the check's timing replaced, the rest kept
            timing = {"inter", "fastinter", "downinter", "fall", "rise"}
            kept = [
                w for j, w in enumerate(words) if w not in timing and words[j - 1] not in timing
            ]
            line = "    " + " ".join([*kept, check])
        elif words[:1] == ["server"]:
            continue
        elif words[:1] == ["maxconn"]:  # under this machine's file limit
            line = "    maxconn 4000"
        lines.append(line)
    assert lines[-1].strip(), "ops/haproxy.cfg must end with its backend's servers"
    lines += [f"    server n{i} 127.0.0.1:{port}" for i, port in enumerate(ports)]
    lines += ["", "frontend stats", f"    bind 127.0.0.1:{stats}", "    stats uri /stats", ""]
    return "\n".join(lines)


@dataclass
class HAProxy:
    proc: asyncio.subprocess.Process
    port: int
    stats_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/responses"

    async def states(self, http: aiohttp.ClientSession) -> dict[str, str]:
        """Server name -> status (UP, DOWN, `UP 1/2`...), from the stats page's CSV."""
        async with http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv") as resp:
            text = await resp.text()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            r["svname"]: r["status"]
            for r in rows
            if r["pxname"] == "gateway_nodes" and r["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def wait_up(self, http: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                states = await self.states(http)
                if states and all(s == "UP" for s in states.values()):
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"haproxy does not see every node up: {states}")


@contextlib.asynccontextmanager
async def run_haproxy(workdir: Path, ports: list[int], check: str) -> AsyncIterator[HAProxy]:
    binary = haproxy_binary()
    assert binary is not None, "haproxy is not installed (make deps installs it)"
    port, stats = free_port(), free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(render_haproxy(port, stats, ports, check))
    with (workdir / "haproxy.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-db",
            "-f",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield HAProxy(proc, port, stats)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class Fleet:
    """`gateway serve` nodes, each on its own port, started and stopped one at a time."""

    workdir: Path
    env: dict[str, str]
    ports: list[int]
    procs: list[asyncio.subprocess.Process | None] = field(default_factory=list)
    starts: Counter[int] = field(default_factory=Counter)

    @classmethod
    def make(cls, workdir: Path, nodes: int, **env: str) -> Fleet:
        inherited = ("GATEWAY_", "PROMETHEUS_MULTIPROC_DIR")  # a developer's settings stay out
        base = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        base.update(env)
        ports = [free_port() for _ in range(nodes)]
        return cls(workdir, base, ports, [None] * nodes)

    def base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def start(self, i: int, http: aiohttp.ClientSession) -> None:
        """Start node i and wait until its /readyz says 200."""
        self.starts[i] += 1
        home = self.workdir / f"n{i}"
        home.mkdir(exist_ok=True)
        env = {
            **self.env,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.ports[i]),
            "GATEWAY_NODE_ID": f"n{i}",
            "GATEWAY_SPILL_DIR": str(home / "spill"),  # kept across restarts: replayed
        }
        log = home / f"start{self.starts[i]}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app",
                "serve",
                cwd=home,  # no .env of a developer's checkout
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.procs[i] = proc
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(self.base(i) + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise AssertionError(f"node {i} did not become ready: {log.read_text()[-3000:]}")

    async def stop(self, i: int, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal node i and wait for its exit; its exit code."""
        proc = self.procs[i]
        assert proc is not None and proc.returncode is None
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), timeout)
        self.procs[i] = None
        return code

    async def close(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


@dataclass
class Figures:
    started: set[str] = field(default_factory=set)  # response ids seen in response.created
    ended: Counter[str] = field(default_factory=Counter)  # terminal event types
    cut: list[str] = field(default_factory=list)  # started, socket closed before the terminal
    errors: list[dict[str, Any]] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    sockets: int = 0
    closes: Counter[int | None] = field(default_factory=Counter)  # closes the client did not ask
    handshake_retries: Counter[str] = field(default_factory=Counter)
    reconnects: list[float] = field(default_factory=list)  # close -> next turn's terminal, s
    reopens: list[float] = field(default_factory=list)  # close -> the new socket open, s
    resent_turns: int = 0  # turns sent before a close the gateway never answered

    def summary(self) -> str:
        recon = sorted(self.reconnects)
        p50 = statistics.median(recon) if recon else 0.0
        return (
            f"responses seen {len(self.started)}, ended {dict(self.ended)}, cut {len(self.cut)}, "
            f"tool calls {self.tool_calls}, sockets {self.sockets}, closes {dict(self.closes)}, "
            f"handshake retries {dict(self.handshake_retries)}, turns resent {self.resent_turns}, "
            f"reconnects {len(recon)} p50 {p50:.2f}s max {max(recon, default=0.0):.2f}s"
        )


class _Socket:
    """A client socket and a task reading it into a queue (None: it closed)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self.queue.put_nowait(orjson.loads(msg.data))
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


async def _connect(http: aiohttp.ClientSession, url: str, key: str, figures: Figures) -> _Socket:
    deadline = time.monotonic() + CONNECT_SECONDS
    attempt = 0
    while True:
        try:
            ws = await http.ws_connect(
                url, headers={"Authorization": f"Bearer {key}"}, autoping=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            figures.handshake_retries[str(exc.status)] += 1
        except (aiohttp.ClientError, OSError) as exc:
            figures.handshake_retries[type(exc).__name__] += 1
        else:
            figures.sockets += 1
            return _Socket(ws)
        attempt += 1
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no socket after {CONNECT_SECONDS} s: {figures.handshake_retries}"
            )
        await asyncio.sleep(min(1.0, 0.05 * attempt))


async def agent(
    n: int,
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    stop: asyncio.Event,
    figures: Figures,
    rng: random.Random,
    tool_share: float = 0.3,
    think: tuple[float, float] = (0.05, 0.4),
    deltas: int = 12,
    delay_ms: int = 25,
) -> None:
    """One client's agent loop until `stop` is set (then it finishes its turn and closes)."""
    context: list[dict[str, Any]] = []
    sock: _Socket | None = None
    last_id: str | None = None
    closed_at: float | None = None
    tool_output: dict[str, Any] | None = None
    k = 0
    try:
        while not stop.is_set():
            if sock is None:
                sock = await _connect(http, url, key, figures)
                if closed_at is not None:
                    figures.reopens.append(time.monotonic() - closed_at)
                last_id = None  # a new socket: the whole conversation, unchained
            if tool_output is not None:
                new_items = [tool_output]
                tool_output = None
            else:
                k += 1
                text = f"client {n} turn {k}"
                if rng.random() < tool_share:
                    text += f' [[call:lookup {{"q": "{n}-{k}"}}]]'
                new_items = [{"role": "user", "content": text}]
            context += new_items
            frame: dict[str, Any] = {
                "type": "response.create",
                "model": MODEL,
                "input": context if last_id is None else new_items,
                "tools": TOOLS,
                "metadata": {"sim_deltas": str(deltas), "sim_delay_ms": str(delay_ms)},
            }
            if last_id is not None:
                frame["previous_response_id"] = last_id
            figures.turns += 1
            response_id: str | None = None
            terminal: dict[str, Any] | None = None
            with contextlib.suppress(ConnectionError, RuntimeError):  # closed under our feet
                await sock.ws.send_str(orjson.dumps(frame).decode())
            while True:
                event = await sock.next(RECEIVE_SECONDS)
                if event is None:
                    break
                if event.get("type") == "response.created":
                    response_id = event["response"]["id"]
                    figures.started.add(response_id)
                if event.get("type") in TERMINAL:
                    terminal = event
                    break
            if terminal is None:  # the socket closed
                figures.closes[sock.ws.close_code] += 1
                if response_id is not None:
                    figures.cut.append(response_id)
                else:
                    figures.resent_turns += 1  # closed before it was taken: sent again
                closed_at = closed_at or time.monotonic()
                await sock.close()
                sock = None
                continue
            figures.ended[terminal["type"]] += 1
            if terminal["type"] != "response.completed":
                figures.errors.append(terminal)
                last_id = None  # resend everything on the next turn
                continue
            if closed_at is not None:
                figures.reconnects.append(time.monotonic() - closed_at)
                closed_at = None
            output = terminal["response"]["output"]
            context += output
            last_id = terminal["response"]["id"]
            for item in output:
                if item.get("type") == "function_call":
                    figures.tool_calls += 1
                    tool_output = {
                        "type": "function_call_output",
                        "call_id": item["call_id"],
                        "output": f"found {n}",
                    }
            # Think; a close meanwhile (an idle socket of a draining node) is seen at once.
            with contextlib.suppress(TimeoutError):
                event = await sock.next(rng.uniform(*think))
                assert event is None, f"an event between turns: {event}"
                figures.closes[sock.ws.close_code] += 1
                closed_at = time.monotonic()
                await sock.close()
                sock = None
    finally:
        if sock is not None:
            await sock.close()


async def run_agents(
    url: str,
    key: str,
    clients: int,
    stop: asyncio.Event,
    figures: Figures,
    seed: int = 1,
    **options: Any,
) -> None:
    """`clients` agents until `stop`; `options` go to each `agent` (think, deltas...)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(
            *(
                agent(n, http, url, key, stop, figures, random.Random(seed * 10_000 + n), **options)
                for n in range(clients)
            )
        )


async def rolling_restart(
    fleet: Fleet, haproxy: HAProxy, http: aiohttp.ClientSession, pause: float
) -> list[float]:
    """SIGTERM each node in turn, wait for its exit 0, start it again, wait until HAProxy has it
    back in rotation, wait `pause`. Returns each node's drain time (SIGTERM to exit)."""
    drains = []
    for i in range(len(fleet.ports)):
        began = time.monotonic()
        code = await fleet.stop(i)
        drains.append(time.monotonic() - began)
        assert code == 0, f"node {i} exited {code}"
        await fleet.start(i, http)
        await haproxy.wait_up(http)
        await asyncio.sleep(pause)
    return drains


async def ledger_counts(database_url: str, key_id: str) -> dict[str, int]:
    """Response id -> number of `turns` rows, for one key."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT response_id, count(*) AS n FROM turns"
            " WHERE key_id = $1 AND response_id IS NOT NULL GROUP BY response_id",
            key_id,
        )
    finally:
        await conn.close()
    return {r["response_id"]: r["n"] for r in rows}


async def live_slots(redis_url: str, prefix: str, key_id: str, team_id: str) -> dict[str, int]:
    """Members of the key's and team's slot sets whose lease has not lapsed."""
    store = KeyStore(redis_url, prefix)
    client = aioredis.from_url(redis_url)
    now = int(time.time() * 1000)
    try:
        return {
            "key": await client.zcount(store.key_slots(key_id), now, "+inf"),
            "team": await client.zcount(store.team_slots(team_id), now, "+inf"),
        }
    finally:
        await client.aclose()
        await store.close()


async def slots_held(redis_url: str, prefix: str, key_id: str, team_id: str) -> dict[str, int]:
    """Members of the key's and team's slot sets and of the session index."""
    store = KeyStore(redis_url, prefix)
    client = aioredis.from_url(redis_url)
    try:
        return {
            "key": await client.zcard(store.key_slots(key_id)),
            "team": await client.zcard(store.team_slots(team_id)),
            "sessions": await client.zcard(store.sessions_index()),
        }
    finally:
        await client.aclose()
        await store.close()
