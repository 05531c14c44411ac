"""Resources shared by every socket of one gateway node, reached through typed `web.AppKey`s."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web

from app import metrics
from app.auth.authenticator import Authenticator
from app.config import Settings
from app.keystore import KeyStore
from app.ledger.sums import SpendSums
from app.live import LiveSocket
from app.memory import MemoryBudget
from app.models import DEFAULT_CREDENTIAL
from app.places import Places
from app.pool import UpstreamPool
from app.spend import REBUILD_TIMEOUT_SECONDS, SpendBook
from app.view import NodeView

if TYPE_CHECKING:
    from app.ledger import Ledger

log = logging.getLogger("gateway.node")

# Sockets whose slot leases are renewed in one Redis pipeline (4 commands each).
LEASE_CHUNK = 32
# The longest time between two looks at the upstreams with a turn in flight for silence (a
# quarter of GATEWAY_UPSTREAM_IDLE_SECONDS when that is shorter): a turn ends at most this long
# after its upstream has been silent for the setting.
SILENCE_SWEEP_MAX_SECONDS = 5.0


class Watched(Protocol):
    """An upstream link with a turn sent (app/upstreamlink.py)."""

    def check_silence(self, now: float, idle: float) -> bool: ...


class Due(Protocol):
    """A session whose socket limits fall due at a time (app/session.py)."""

    def limits_due(self) -> None: ...


class DueSlots:
    """Sessions' socket-limit checks (idle timeout, lifetime), one loop timer per slot of time
    for every session due in it: a timer handle per socket was half a KiB of each idle socket.

    A check runs at the end of its slot, never before its time: at most a sixteenth of its wait
    late, and at most a second (a 0.5 s idle limit closes within 31 ms of it, the default hour's
    within a second). The slots hold the sessions strongly until they fire or leave (`leave`
    at the session's end)."""

    def __init__(self) -> None:
        self._slots: dict[int, set[Due]] = {}  # the slot's end, in ms of loop time -> sessions

    def add(self, due: Due, delay: float) -> int:
        """`due.limits_due()` at `delay` seconds from now, or a little later; the slot's key."""
        loop = asyncio.get_running_loop()
        width = min(1000, max(50, int(delay * 1000) // 16))
        end = -(-int((loop.time() + delay) * 1000) // width) * width  # rounded up to the slot
        members = self._slots.get(end)
        if members is None:
            members = self._slots[end] = set()
            loop.call_at(end / 1000, self._fire, end)
        members.add(due)
        return end

    def leave(self, due: Due, end: int) -> None:
        members = self._slots.get(end)
        if members is not None:
            members.discard(due)

    def _fire(self, end: int) -> None:
        for due in self._slots.pop(end, ()):
            due.limits_due()

    def __len__(self) -> int:
        return sum(len(members) for members in self._slots.values())


class Node:
    def __init__(
        self, settings: Settings, store: KeyStore, ledger: Ledger, places: Places | None = None
    ) -> None:
        self.settings = settings
        # GATEWAY_MAX_SOCKETS: this process' count, or with --workers its slot of the node's.
        self.places = places or Places(settings.max_sockets)
        self.store = store
        self.ledger = ledger
        self.id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.view = NodeView(store, on_tick=self._on_view_tick)
        self.auth = Authenticator(self.view)
        self.memory_budget = MemoryBudget(settings.context_total_bytes)
        self.sessions: set[LiveSocket] = set()
        self._expelling: dict[str, asyncio.Task[None]] = {}
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.draining = False
        self.http: aiohttp.ClientSession | None = None
        # Built here so it is never None for a session; it opens nothing until `start`.
        self.pool = UpstreamPool(settings, self.credential)
        sums = SpendSums(settings.database_url, timeout=REBUILD_TIMEOUT_SECONDS)
        self.spend = SpendBook(store, sums, ledger)
        self._lease_task: asyncio.Task[None] | None = None
        self._renewals = _RenewalStreak()
        # Links with a turn sent, looked at for silence by one sweep (a timer per socket held
        # half a KiB for each idle socket long after its turn); a link leaves when its turn has.
        self.watched: set[Watched] = set()
        self._silence_task: asyncio.Task[None] | None = None
        self.due = DueSlots()  # the sessions' idle and lifetime checks

    def credential(self, name: str) -> str | None:
        """The upstream key a team's credential NAME points at on this node, if set."""
        if name == DEFAULT_CREDENTIAL:
            return self.settings.openai_api_key or os.environ.get(name) or None
        return os.environ.get(name) or None

    def pooled_credentials(self) -> set[str]:
        """Credential names worth keeping warm: the default and every active team's, if set."""
        names = {DEFAULT_CREDENTIAL}
        names.update(t.upstream_credential for t in self.view.view.teams.values() if t.active)
        return {name for name in names if self.credential(name)}

    def _expelled(self, task: asyncio.Task[None]) -> None:
        for sid, known in list(self._expelling.items()):
            if known is task:
                del self._expelling[sid]

    def add_session(self, session: LiveSocket) -> None:
        self.sessions.add(session)
        self._no_sessions.clear()

    def remove_session(self, session: LiveSocket) -> bool:
        if session not in self.sessions:
            return False
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()
        return True

    async def wait_no_sessions(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._no_sessions.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def upstream_http(self) -> aiohttp.ClientSession:
        assert self.http is not None, "node not started"
        return self.http

    async def _on_view_tick(self, changed: bool) -> None:
        if changed:
            self.pool.want(self.pooled_credentials())
        self.spend.on_view(self.view.view.teams)
        for session, code in await self.auth.sweep(changed, self.sessions):
            if session.id not in self._expelling:
                # One task each: a slow client must not hold up the others' expulsion.
                task = asyncio.create_task(session.expel(code), name=f"expel-{session.id}")
                self._expelling[session.id] = task
                task.add_done_callback(self._expelled)

    async def _refresh_leases(self) -> None:
        from app.keystore import LEASE_REFRESH_SECONDS

        while True:
            await asyncio.sleep(LEASE_REFRESH_SECONDS)
            live = list(self.sessions)
            # A chunk at a time: building and sending 10,000 sockets' records in one go held
            # the event loop for tens of milliseconds, every socket's events waiting behind it.
            for start in range(0, len(live), LEASE_CHUNK):
                chunk = live[start : start + LEASE_CHUNK]
                entries: list[Any] = [(s.principal, s.id, s.info()) for s in chunk]
                try:
                    await self.store.refresh_leases(entries)
                except Exception as exc:
                    self._renewals.failed(exc)
                else:
                    self._renewals.succeeded()

    async def start(self) -> None:
        from app.upstream import new_http_session

        self.http = new_http_session()
        await self.view.start()
        self.pool.start(self.http, self.pooled_credentials())
        self._lease_task = asyncio.create_task(self._refresh_leases(), name="leases")
        self._silence_task = asyncio.create_task(self._watch_silence(), name="silence")

    async def _watch_silence(self) -> None:
        idle = self.settings.upstream_idle_seconds
        while True:
            await asyncio.sleep(min(idle / 4, SILENCE_SWEEP_MAX_SECONDS))
            now = time.perf_counter()
            for link in list(self.watched):
                if not link.check_silence(now, idle):
                    self.watched.discard(link)

    async def stop(self) -> None:
        await self.view.stop()
        if self._lease_task:
            self._lease_task.cancel()
        if self._silence_task:
            self._silence_task.cancel()
        await self.pool.close()
        await self.spend.close()
        if self.http:
            await self.http.close()


class _RenewalStreak:
    """Failed lease renewals: every one counted, one log line when a streak of them starts and
    one when it ends (Redis away for an hour must not log every tick)."""

    __slots__ = ("failures", "since")

    def __init__(self) -> None:
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: Exception) -> None:
        metrics.LEASE_RENEWAL_FAILURES_TOTAL.inc()
        self.failures += 1
        if self.failures == 1:
            self.since = time.monotonic()
            cause = exc.__cause__ or exc
            log.warning(
                "slot lease renewal failing: this node's socket caps lapse while it does",
                extra={"detail": f"{type(cause).__name__}: {cause}"[:200]},
            )

    def succeeded(self) -> None:
        if self.failures:
            log.info(
                "slot lease renewal working again",
                extra={
                    "failures": self.failures,
                    "failing_seconds": round(time.monotonic() - self.since, 1),
                },
            )
            self.failures = 0


NODE = web.AppKey("node", Node)
