"""The warm upstream pool: upstream sockets opened ahead of demand, per upstream credential.

A customer socket's first turn would otherwise wait for the upstream handshake (TLS and the
distance to OpenAI, 100-200 ms). The pool keeps `GATEWAY_UPSTREAM_POOL_SIZE` idle upstream sockets
open per credential NAME in use on this node (the default `OPENAI_API_KEY` and every name a team
points at, when it resolves to a value here) and hands one to a session on its first turn
(`UpstreamLink._replace`), then opens a replacement in the background.

A pooled socket is an ordinary `UpstreamConn` from `open_upstream`: `served == 0` (OpenAI's cache
on it is empty, so a chained first turn continues from the conversation memory) and its age counts
from its handshake, so the session's 55-minute replacement still holds. The pool refreshes a socket
once it is `refresh_age` old and never hands out one older than `max_take_age`, so a customer
always gets at least half of `GATEWAY_UPSTREAM_MAX_AGE_SECONDS` from it.

Each pooled socket has a watcher task blocked in `ws.receive()`: aiohttp only notices a close, and
only answers pings, while someone receives. An idle socket the upstream closes is dropped and
replaced. Handing out cancels the watcher and waits for it to end before the session's reader
starts, so there is never a concurrent `receive()`; a frame that arrived meanwhile stays in
aiohttp's queue (its `read()` pops a message only after its wait completes), and every way the
watcher can have consumed a close leaves `ws.closed` set, which `take` checks.

Failures (handshakes refused or timing out, new sockets closed at once) back off exponentially
with jitter, capped at `BACKOFF_CAP_SECONDS`: an upstream that is down never sees a tight loop.
One log line per failure streak and one when it ends; never the credential's value.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import aiohttp

from app import metrics
from app.config import Settings
from app.upstream import UpstreamConn, UpstreamHandshakeError, open_upstream

log = logging.getLogger("gateway.pool")

BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
# A pooled socket the upstream closes younger than this counts as a failure (backoff): an upstream
# that accepts handshakes and then closes at once must not be hammered either.
MIN_HEALTHY_SECONDS = 5.0


def backoff_seconds(failures: int, rand: Callable[[], float] = random.random) -> float:
    """The wait after the `failures`-th failure in a row: doubling from 0.5 s up to 30 s, with
    "equal jitter" (half fixed, half random) so the workers of a node do not retry in step."""
    if failures <= 0:
        return 0.0
    base: float = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** min(failures - 1, 16))
    return base / 2 + base / 2 * rand()


class _Entry:
    """One pooled socket, the credential value it was opened with, and its watcher."""

    __slots__ = ("conn", "dead", "value", "watcher")

    def __init__(self, conn: UpstreamConn, value: str) -> None:
        self.conn = conn
        self.value = value
        self.dead = False  # the watcher saw the socket end (or an unexpected frame)
        self.watcher: asyncio.Task[None] | None = None


class _Slot:
    """The pool of one credential name, and the task that keeps it filled."""

    __slots__ = ("failures", "filler", "name", "ready", "retry_at", "wake")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[_Entry] = deque()  # oldest first: handed out first
        self.wake = asyncio.Event()
        self.failures = 0  # in a row
        self.retry_at = 0.0  # monotonic: no handshake before this after a failure
        self.filler: asyncio.Task[None] | None = None


class UpstreamPool:
    def __init__(self, settings: Settings, credential: Callable[[str], str | None]) -> None:
        self.settings = settings
        self.size = settings.upstream_pool_size
        max_age = settings.upstream_max_age_seconds
        # Never hand out a socket older than half the session's replacement age; refresh sooner.
        self.max_take_age = max_age / 2
        self.refresh_age = min(settings.upstream_pool_refresh_seconds, self.max_take_age)
        self._credential = credential
        self._http: aiohttp.ClientSession | None = None
        self._slots: dict[str, _Slot] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- what to keep warm ----------------------------------------------------------------------

    def start(self, http: aiohttp.ClientSession, names: Iterable[str]) -> None:
        self._http = http
        self.want(names)

    def want(self, names: Iterable[str]) -> None:
        """Keep these credential names warm (and only these); names must resolve on this node."""
        if not self.size or self._closed or self._http is None:
            return
        wanted = set(names)
        for name in wanted - self._slots.keys():
            slot = _Slot(name)
            self._slots[name] = slot
            slot.filler = asyncio.create_task(self._fill(slot), name=f"pool-fill-{name}")
        for name in self._slots.keys() - wanted:
            self._spawn(self._retire(self._slots.pop(name)))

    def ready(self, name: str) -> int:
        """Pooled sockets of a credential name, ready to hand out (tests, the gauge)."""
        slot = self._slots.get(name)
        return len(slot.ready) if slot else 0

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._slots)

    # -- handing out ----------------------------------------------------------------------------

    async def take(self, name: str) -> UpstreamConn | None:
        """A fresh pooled socket for this credential name, or None (the caller opens one)."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        value = self._credential(name)
        while slot.ready:
            entry = slot.ready.popleft()
            metrics.UPSTREAM_POOL_READY.dec()
            try:
                await self._stop_watching(entry)
            except BaseException:
                self._spawn(entry.conn.close())  # our caller was cancelled: the socket is ours
                raise
            conn = entry.conn
            if not entry.dead and conn.usable and conn.age < self.max_take_age:
                if entry.value == value:
                    slot.wake.set()
                    if conn.age >= MIN_HEALTHY_SECONDS:
                        self._healthy(slot)
                    return conn
            self._spawn(conn.close())
        slot.wake.set()
        return None

    @staticmethod
    async def _stop_watching(entry: _Entry) -> None:
        watcher = entry.watcher
        if watcher is not None and not watcher.done():
            watcher.cancel()
            # Until the watcher has ended, aiohttp refuses another receive() on the socket.
            await asyncio.wait((watcher,))
        # A cancelled watcher's traceback holds the entry: a cycle for the collector otherwise.
        entry.watcher = None

    # -- filling --------------------------------------------------------------------------------

    async def _fill(self, slot: _Slot) -> None:
        """Keep `size` fresh sockets in the slot; replace those past `refresh_age`."""
        while True:
            try:
                await self._fill_once(slot)
            except Exception:  # a filler must never die: back off and go on
                log.exception("upstream pool: filler failed", extra={"credential_name": slot.name})
                self._failed(slot, "internal error")
                await asyncio.sleep(slot.retry_at - time.monotonic())

    async def _fill_once(self, slot: _Slot) -> None:
        slot.wake.clear()
        self._prune(slot)
        due = [e for e in slot.ready if e.conn.age >= self.refresh_age]
        need = self.size - (len(slot.ready) - len(due))
        if need <= 0:
            for entry in due:  # surplus: the fresh ones are enough
                self._remove(slot, entry)
            await self._idle(slot)
            return
        wait = slot.retry_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)  # not woken by takes: backoff holds under load
            return
        value = self._credential(slot.name)
        if value is None:  # unset since: hold nothing until the node's next view
            await self._idle(slot)
            return
        results = await asyncio.gather(*(self._open(slot, value) for _ in range(need)))
        opened = sum(1 for r in results if r is None)
        for entry in due[:opened]:  # replacements are in: retire the old ones
            self._remove(slot, entry)
        failures = [r for r in results if r is not None]
        if failures:
            self._failed(slot, failures[0])

    async def _idle(self, slot: _Slot) -> None:
        """Until a take or a drop wakes the slot, or its oldest socket is due for refresh."""
        timeout = self.refresh_age
        if slot.ready:
            timeout = max(0.0, self.refresh_age - slot.ready[0].conn.age)
        if slot.failures:
            timeout = min(timeout, MIN_HEALTHY_SECONDS)  # then see whether the new ones lived
            if any(e.conn.age >= MIN_HEALTHY_SECONDS for e in slot.ready):
                self._healthy(slot)
        try:
            await asyncio.wait_for(slot.wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _open(self, slot: _Slot, value: str) -> str | None:
        """Open one socket into the slot; None on success, else why it failed."""
        assert self._http is not None
        settings = self.settings
        try:
            conn = await open_upstream(
                self._http,
                settings.upstream_ws_url,
                value,
                timeout=settings.upstream_handshake_seconds,
                max_msg_size=settings.upstream_max_frame_bytes,
            )
        except UpstreamHandshakeError as exc:
            return exc.detail
        # No await between the handshake and here: a cancelled filler cannot lose the socket.
        if self._closed or self._slots.get(slot.name) is not slot:
            self._spawn(conn.close())
            return None
        entry = _Entry(conn, value)
        entry.watcher = asyncio.create_task(self._watch(slot, entry), name=f"pool-watch-{id(conn)}")
        slot.ready.append(entry)
        metrics.UPSTREAM_POOL_READY.inc()
        return None

    async def _watch(self, slot: _Slot, entry: _Entry) -> None:
        """Idle: any message (a close, a drop, an unexpected event) ends the pooled socket."""
        try:
            await entry.conn.ws.receive()
        except Exception:  # whatever it was, the socket is not to be handed out
            pass
        entry.dead = True
        if entry in slot.ready:
            if entry.conn.age < MIN_HEALTHY_SECONDS:
                self._failed(slot, "upstream closed a new idle socket")
            self._remove(slot, entry)
            slot.wake.set()

    def _prune(self, slot: _Slot) -> None:
        for entry in list(slot.ready):
            if entry.dead or entry.conn.ws.closed or entry.conn.age >= self.max_take_age:
                self._remove(slot, entry)

    def _remove(self, slot: _Slot, entry: _Entry) -> None:
        """Take an entry out of the slot and close it in the background."""
        if entry not in slot.ready:
            return  # handed out meanwhile
        slot.ready.remove(entry)
        metrics.UPSTREAM_POOL_READY.dec()
        self._spawn(self._discard(entry))

    async def _discard(self, entry: _Entry) -> None:
        await self._stop_watching(entry)  # a no-op when the watcher itself dropped the socket
        await entry.conn.close()

    def _failed(self, slot: _Slot, detail: str) -> None:
        slot.failures += 1
        slot.retry_at = time.monotonic() + backoff_seconds(slot.failures)
        if slot.failures == 1:
            log.warning(
                "upstream pool: could not keep a socket warm; backing off",
                extra={"credential_name": slot.name, "detail": detail},
            )

    @staticmethod
    def _healthy(slot: _Slot) -> None:
        if slot.failures:
            log.info(
                "upstream pool: warm again",
                extra={"credential_name": slot.name, "failures": slot.failures},
            )
            slot.failures = 0
            slot.retry_at = 0.0

    # -- shutdown -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retire(self, slot: _Slot) -> None:
        if slot.filler is not None:
            slot.filler.cancel()
            await asyncio.wait((slot.filler,))
        for entry in list(slot.ready):
            self._remove(slot, entry)

    async def close(self) -> None:
        """Close every pooled socket and stop every task (Node.stop)."""
        self._closed = True
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            await self._retire(slot)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
