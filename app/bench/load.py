"""The load generator: client sockets, turns, and the figures measured on the client's side.

Latency comes from the simulator's `sim_sent_at` stamp (unix time of sending, the last field of
every event it sends), so "receive time minus `sim_sent_at`" is exact when the bench and the
simulator share a host. The client reads each event's type and stamp by position, without
parsing the JSON, so that at saturation the client spends as little CPU as it can.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import os
import re
import ssl
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import WSMsgType

from app.bench.proc import CpuMeter, rss_bytes

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
_FAILED = frozenset({"response.failed", "error"})
_TYPE_PREFIX = '{"type":"'
_SENT_AT = '"sim_sent_at":'
_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]*")
# A masked close frame (1000) with an all-zero mask: the raw handshake sockets leave politely.
_CLOSE_FRAME = b"\x88\x82\x00\x00\x00\x00\x03\xe8"


class BenchError(Exception):
    """A target refused or broke the load; the message says which and how."""


@dataclass(frozen=True)
class Target:
    """Where the load goes, and the process whose CPU and memory are read (when known)."""

    name: str
    url: str
    key: str
    pid: int | None = None


@functools.cache
def agent_fields(request_kb: int) -> dict[str, Any]:
    """`instructions` and `tools` of about `request_kb` KiB in all, half each, as an agent's
    request carries them (Codex sends kilobytes of both on every turn); OpenAI, and the
    simulator, echo both in `response.created` and in the terminal event."""
    half = request_kb * 512
    sentence = "You are a coding agent working in the user's repository. "
    instructions = (sentence * (half // len(sentence) + 1))[:half]
    tools: list[dict[str, Any]] = []
    while len(orjson.dumps(tools)) < half:
        number = len(tools)
        tools.append(
            {
                "type": "function",
                "name": f"tool_{number}",
                "description": f"Tool {number}: runs a step of the task and returns its output.",
                "strict": False,
                "parameters": {
                    "type": "object",
                    "properties": {
                        f"arg_{i}": {"type": "string", "description": f"argument {i} of the step"}
                        for i in range(4)
                    },
                    "required": ["arg_0"],
                },
            }
        )
    return {"instructions": instructions, "tools": tools}


@dataclass(frozen=True)
class Shape:
    """One turn: `deltas` text deltas, paced `gap_ms` apart by the simulator; or, with
    `terminal_only`, the terminal event alone (a one-event turn: the fixed cost of a turn).
    `request_kb`: the request carries an agent's instructions and tools (`agent_fields`)."""

    model: str
    deltas: int
    gap_ms: float
    terminal_only: bool = False
    request_kb: int = 0

    @classmethod
    def of_events(cls, model: str, events: int, request_kb: int = 0) -> Shape:
        """The unpaced turn of `events` events: 1, or 9 and more (8 + the deltas)."""
        if events == 1:
            return cls(model, 1, 0, terminal_only=True, request_kb=request_kb)
        if events < 9:
            raise ValueError(f"a turn has 1 event or 9 and more, not {events}")
        return cls(model, events - 8, 0, request_kb=request_kb)

    def metadata(self) -> dict[str, str]:
        metadata = {"sim_deltas": str(self.deltas), "sim_delay_ms": f"{self.gap_ms:g}"}
        if self.terminal_only:
            metadata["sim_terminal_only"] = "true"
        return metadata

    def request(self) -> dict[str, Any]:
        """The turn's request fields, as either transport sends them."""
        body: dict[str, Any] = {"model": self.model, "input": "bench", "metadata": self.metadata()}
        if self.request_kb:
            body.update(agent_fields(self.request_kb))
        return body

    def frame(self) -> str:
        return orjson.dumps({"type": "response.create", **self.request()}).decode()

    def http_body(self) -> bytes:
        """The same turn as a `POST /v1/responses` with `stream: true` (SSE)."""
        return orjson.dumps({**self.request(), "stream": True})

    @property
    def seconds(self) -> float:
        """How long the simulator takes to send one turn (its pauses)."""
        return self.deltas * self.gap_ms / 1000

    @property
    def events(self) -> int:
        """Events of one text turn: created, in_progress, 2 added, the deltas, 3 done, completed."""
        return 1 if self.terminal_only else self.deltas + 8


class Recorder:
    """Samples of one load: seconds from sending to the first event, and per event."""

    __slots__ = ("errors", "events", "first_error", "latency", "ttfe", "turns")

    def __init__(self) -> None:
        self.ttfe = array("d")
        self.latency = array("d")
        self.events = 0
        self.turns = 0
        self.errors = 0
        self.first_error: str | None = None

    def error(self, text: str) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = text[:300]


def event_type(text: str) -> str | None:
    """The event's type, read by position when the frame starts with it (the norm)."""
    if text.startswith(_TYPE_PREFIX):
        end = text.find('"', 9)
        if end > 0:
            return text[9:end]
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    return kind if isinstance(kind, str) else None


def sent_at_of(text: str) -> float | None:
    """The simulator's `sim_sent_at` stamp of an event, or None when it has none."""
    at = text.rfind(_SENT_AT)
    if at < 0:
        return None
    found = _NUMBER.match(text, at + len(_SENT_AT))
    return float(found.group()) if found else None


# -- sockets ------------------------------------------------------------------------------------


@asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    # limit=0: aiohttp caps a session at 100 connections otherwise.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        yield http


async def connect(http: aiohttp.ClientSession, target: Target) -> aiohttp.ClientWebSocketResponse:
    try:
        return await http.ws_connect(
            target.url,
            headers={"Authorization": f"Bearer {target.key}"},
            max_msg_size=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise BenchError(
            f"{target.name}: handshake refused with HTTP {exc.status} ({exc.message})"
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise BenchError(f"{target.name}: cannot connect to {target.url}: {exc}") from None


async def open_sockets(
    http: aiohttp.ClientSession, target: Target, count: int, concurrency: int
) -> list[aiohttp.ClientWebSocketResponse]:
    """`count` open sockets, at most `concurrency` handshakes in flight; all or an error."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await connect(http, target)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sockets = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        await close_all(sockets)
        raise BenchError(f"{len(failures)} of {count} handshakes failed; first: {failures[0]}")
    return sockets


async def close_all(sockets: Iterable[aiohttp.ClientWebSocketResponse]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def _all(jobs: Iterable[Awaitable[None]]) -> None:
    """Run every job; the first failure is raised once all have ended."""
    results = await asyncio.gather(*jobs, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        if len(failures) > 1 and isinstance(failures[0], BenchError):
            raise BenchError(f"{failures[0]} (and {len(failures) - 1} more sockets failed)")
        raise failures[0]


# -- turns --------------------------------------------------------------------------------------


async def run_turn(
    ws: aiohttp.ClientWebSocketResponse,
    frame: str,
    rec: Recorder | None,
    *,
    timeout: float,
    started: float | None = None,
) -> None:
    """Send one `response.create` and read its events up to the terminal one.

    Time to first event counts from `started` (default: the send). One deadline for the whole
    turn: a timer per received frame would cost the client more than it measures.
    """
    sent = time.time()
    try:
        async with asyncio.timeout(timeout):
            await ws.send_str(frame)
            await _read_turn(ws, rec, sent if started is None else started)
    except TimeoutError:
        raise BenchError(f"a turn took longer than {timeout:g} s") from None


async def _read_turn(
    ws: aiohttp.ClientWebSocketResponse, rec: Recorder | None, since: float
) -> None:
    first = True
    while True:
        msg = await ws.receive()
        now = time.time()
        if msg.type is not WSMsgType.TEXT:
            raise BenchError(f"the socket ended in a turn: {msg.type.name} {ws.close_code}")
        text: str = msg.data
        kind = event_type(text)
        if rec is not None:
            if first:
                rec.ttfe.append(now - since)
                first = False
            stamp = sent_at_of(text)
            if stamp is not None:
                rec.latency.append(now - stamp)
            rec.events += 1
        if kind in TERMINAL:
            if rec is not None:
                rec.turns += 1
                if kind in _FAILED:
                    rec.error(text)
            return


async def _turns(
    ws: aiohttp.ClientWebSocketResponse,
    frame: str,
    turns: int,
    rec: Recorder,
    timeout: float,
    delay: float,
) -> None:
    if delay:
        await asyncio.sleep(delay)
    for _ in range(turns):
        await run_turn(ws, frame, rec, timeout=timeout)


def warmup_shape(shape: Shape) -> Shape:
    return Shape(shape.model, deltas=1, gap_ms=0, terminal_only=shape.terminal_only)


@dataclass(frozen=True)
class LoadResult:
    rec: Recorder
    seconds: float
    cpu: dict[str, float]  # CPU seconds per process name during the timed part ("client": this)

    @property
    def events_per_second(self) -> float:
        return self.rec.events / self.seconds if self.seconds > 0 else 0.0

    def cpu_per_1k(self, name: str) -> float | None:
        used = self.cpu.get(name)
        if used is None or not self.rec.events:
            return None
        return used * 1000 / self.rec.events


async def run_load(
    target: Target,
    shape: Shape,
    *,
    sockets: int,
    turns: int,
    concurrency: int,
    timeout: float,
    meter: CpuMeter,
) -> LoadResult:
    """`sockets` sockets, each running `turns` turns back to back, all at once.

    Every socket first runs one untimed one-delta turn, so that upstream sockets opened on a
    first turn (the gateway opens them then) and lazy first-use costs stay out of the figures;
    the first turn is measured by `first_turns`. With paced deltas, socket i starts its turns
    i/sockets of a turn's duration late: streams in lockstep (every stream's delta in one burst
    each gap) would measure the burst, which no real population of clients makes.
    """
    async with client_session() as http:
        opened = await open_sockets(http, target, sockets, concurrency)
        try:
            warm = warmup_shape(shape).frame()
            await _all(run_turn(ws, warm, None, timeout=timeout) for ws in opened)
            rec = Recorder()
            frame = shape.frame()
            step = shape.seconds / len(opened)
            with collector_held_off():
                meter.start()
                began = time.perf_counter()
                await _all(
                    _turns(ws, frame, turns, rec, timeout, i * step) for i, ws in enumerate(opened)
                )
                seconds = time.perf_counter() - began
                cpu = meter.stop()
        finally:
            await close_all(opened)
    return LoadResult(rec, seconds, cpu)


# -- handshakes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeResult:
    count: int
    seconds: float
    failed: int
    first_failure: str | None

    @property
    def per_second(self) -> float:
        return (self.count - self.failed) / self.seconds if self.seconds > 0 else 0.0


def _upgrade_request(host: str, path: str, key: str) -> bytes:
    nonce = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {key}\r\n\r\n"
    ).encode()


@contextmanager
def collector_held_off() -> Iterator[None]:
    """The bench's own cyclic garbage collector waits until the timed part is over (as `timeit`
    does): a full collection paused this client 45-50 ms, on whichever target it was timing."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def handshake_rate(
    target: Target, count: int, concurrency: int, *, timeout: float
) -> HandshakeResult:
    """Open `count` sockets (`concurrency` in flight) as fast as the target answers them.

    The client speaks the opening handshake itself over plain streams (no WebSocket library),
    so the client's own cost barely limits the rate. Sockets stay open until all are done.
    """
    parts = urlsplit(target.url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    context = ssl.create_default_context() if secure else None
    opened: list[asyncio.StreamWriter] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    writer = await _raw_handshake(host, port, path, target.key, context)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, BenchError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc))
                return
            opened.append(writer)

    with collector_held_off():
        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        seconds = time.perf_counter() - began
    await _close_raw(opened)
    if count and not opened:
        raise BenchError(f"{target.name}: all {count} handshakes failed; first: {failures[0]}")
    return HandshakeResult(count, seconds, len(failures), failures[0] if failures else None)


async def _raw_handshake(
    host: str, port: int, path: str, key: str, context: ssl.SSLContext | None
) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(_upgrade_request(f"{host}:{port}", path, key))
        head = await reader.readuntil(b"\r\n\r\n")
    except BaseException:
        writer.close()
        raise
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
    if status != b"101":
        writer.close()
        raise BenchError(f"handshake answered HTTP {status.decode(errors='replace')}")
    return writer


async def _close_raw(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.write(_CLOSE_FRAME)
        writer.close()

    async def closed(writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass

    await asyncio.gather(*(closed(w) for w in writers))


# -- memory and first turns ---------------------------------------------------------------------


@dataclass(frozen=True)
class RssResult:
    sockets: int
    before: int
    after: int

    @property
    def per_socket(self) -> float:
        return (self.after - self.before) / self.sockets if self.sockets else 0.0


async def idle_rss(
    target: Target, shape: Shape, *, sockets: int, concurrency: int, timeout: float
) -> RssResult:
    """RSS of the target before and after `sockets` sockets that each ran one turn, idle now.

    A few sockets run a turn and close first, so one-time costs (imports, caches, the first
    buffers) are not charged to the measured sockets.
    """
    if target.pid is None:
        raise BenchError(f"{target.name}: no process id to read RSS from")
    frame = shape.frame()
    async with client_session() as http:
        warm = await open_sockets(http, target, min(sockets, 32), concurrency)
        await _all(run_turn(ws, frame, None, timeout=timeout) for ws in warm)
        await close_all(warm)
        await asyncio.sleep(0.5)
        before = rss_bytes(target.pid)
        opened = await open_sockets(http, target, sockets, concurrency)
        try:
            await _all(run_turn(ws, frame, None, timeout=timeout) for ws in opened)
            await asyncio.sleep(0.5)
            after = rss_bytes(target.pid)
        finally:
            await close_all(opened)
    return RssResult(sockets, before, after)


async def first_turns(
    target: Target, shape: Shape, *, count: int, pause_s: float, timeout: float
) -> array[float]:
    """Seconds from the start of a new socket's handshake to the first event of its first turn.

    One socket at a time, `pause_s` apart (time for a warm pool to refill).
    """
    samples = array("d")
    frame = shape.frame()
    async with client_session() as http:
        for _ in range(count):
            rec = Recorder()
            started = time.time()
            ws = await connect(http, target)
            try:
                await run_turn(ws, frame, rec, timeout=timeout, started=started)
            finally:
                await ws.close()
            samples.append(rec.ttfe[0])
            await asyncio.sleep(pause_s)
    return samples


async def burst_first_turns(
    target: Target, shape: Shape, *, count: int, timeout: float
) -> array[float]:
    """`count` new sockets at once, each sending its first turn as soon as it is open: seconds
    from the start of each socket's handshake to the first event of its turn."""
    frame = shape.frame()
    samples = array("d")

    async def one(http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        rec = Recorder()
        started = time.time()
        ws = await connect(http, target)
        try:
            await run_turn(ws, frame, rec, timeout=timeout, started=started)
        except BaseException:
            await ws.close()
            raise
        samples.append(rec.ttfe[0])
        return ws

    async with client_session() as http:
        with collector_held_off():
            results = await asyncio.gather(
                *(one(http) for _ in range(count)), return_exceptions=True
            )
        opened = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
        await close_all(opened)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise BenchError(
            f"{target.name}: {len(failures)} of {count} burst sockets failed; first: {failures[0]}"
        )
    return samples


# -- server-sent events (POST /v1/responses, stream: true) --------------------------------------


async def _sse_request(
    http: aiohttp.ClientSession, url: str, key: str, body: bytes, rec: Recorder | None
) -> None:
    """One streamed POST, its events counted as the blank lines that end them."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            text = (await resp.read())[:300].decode(errors="replace")
            raise BenchError(f"{url}: HTTP {resp.status}: {text}")
        events = 0
        tail = b""
        async for chunk in resp.content.iter_any():
            joined = tail[-1:] + chunk
            events += joined.count(b"\n\n")
            tail = chunk[-1:] if chunk else tail
        if rec is not None:
            rec.events += events
            rec.turns += 1


async def run_sse_load(
    target: Target,
    shape: Shape,
    *,
    clients: int,
    requests: int,
    timeout: float,
    meter: CpuMeter,
) -> LoadResult:
    """`clients` HTTP clients (one keep-alive connection each), each making `requests` streamed
    `POST /v1/responses` back to back; one untimed request each first."""
    body, warm = shape.http_body(), warmup_shape(shape).http_body()
    url, key = target.url, target.key

    async def client(http: aiohttp.ClientSession, rec: Recorder | None, count: int) -> None:
        for _ in range(count):
            await _sse_request(http, url, key, body if rec is not None else warm, rec)

    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout),
        )
        for _ in range(clients)
    ]
    try:
        await _all(client(http, None, 1) for http in sessions)
        rec = Recorder()
        with collector_held_off():
            meter.start()
            began = time.perf_counter()
            await _all(client(http, rec, requests) for http in sessions)
            seconds = time.perf_counter() - began
            cpu = meter.stop()
    except aiohttp.ClientError as exc:
        raise BenchError(f"{target.name}: {type(exc).__name__}: {exc}") from None
    finally:
        await asyncio.gather(*(http.close() for http in sessions))
    return LoadResult(rec, seconds, cpu)
