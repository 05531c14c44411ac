"""A node's copy of the store: teams and prices for every turn, secrets its handshakes have seen.

`NodeView` polls the store's version 4 times a second and reloads what changed; every Redis call
is the key store's. Secrets are cached here because their freshness is the view's: one is reused
only while the version it was read under still stands (`NodeView.lookup_secret`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.auth.digests import KnownDigests
from app.auth.principal import hash_secret
from app.errors import GatewayError
from app.keystore import KeyStore
from app.models import ApiKey, Price, Team

log = logging.getLogger("gateway.view")

VIEW_POLL_SECONDS = 0.25
# Secrets this node has looked up, reused while the store's version has not moved (NodeView).
SECRET_CACHE_SIZE = 10_000
SECRET_CACHE_FRESH_SECONDS = 1.0


@dataclass(frozen=True)
class View:
    """A node's copy of what every turn checks: teams and prices (refreshed within 1 s)."""

    version: int
    teams: dict[str, Team]
    catalog: dict[str, Price]


class NodeView:
    """Keeps `View` fresh by polling `P:{g}:version` and calls `on_change` after each reload.

    Polling (4 times a second, one GET and one SCARD on the `{g}` slot) rather than pub/sub: a
    node that missed a message can never keep serving a revoked key, and a Redis restart needs
    no resubscription.
    """

    def __init__(
        self, store: KeyStore, on_tick: Callable[[bool], Awaitable[None]] | None = None
    ) -> None:
        self.store = store
        self.view = View(version=-1, teams={}, catalog={})
        self.on_tick = on_tick
        self._task: asyncio.Task[None] | None = None
        self._untold = False  # a version change no tick has passed on yet
        self.read_at = float("-inf")  # time.monotonic() of the last version Redis answered
        # secret hash -> (its key, the store's version then, the store's local writes then)
        self._secrets: dict[str, tuple[ApiKey, int, int]] = {}
        self.digests = KnownDigests(store)

    async def lookup_secret(
        self, secret: str, *, fresh: bool = False
    ) -> tuple[tuple[ApiKey, str] | None, int]:
        """The key of a secret (and the secret's hash) and the store's version
        (`KeyStore.lookup_digest`), without a round trip for a secret seen since
        the store's version last moved.

        Every admin write bumps the version, which this view reads 4 times a second; a secret
        is reused only while its version is the view's, no write went through this node's own
        store since, and the view's reading is under SECRET_CACHE_FRESH_SECONDS old. So a
        revocation or rotation made on this node refuses the next handshake here, and one made
        elsewhere within the view's poll (0.25 s); and the handshake learns the version again
        from its slot's round trip (`KeyStore.acquire_socket`) and asks again with `fresh` if
        it moved, so no handshake is older than the store it finished against. Unknown
        secrets are not kept (a flood of wrong keys cannot fill the table).
        """
        digest = hash_secret(secret)
        writes = self.store.writes
        hit = self._secrets.get(digest)
        if (
            hit is not None
            and not fresh
            and hit[1] == self.view.version
            and hit[2] == writes
            and time.monotonic() - self.read_at < SECRET_CACHE_FRESH_SECONDS
        ):
            return (hit[0], digest), hit[1]
        key, version = await self.store.lookup_digest(digest)
        if key is None:
            return None, version
        if len(self._secrets) >= SECRET_CACHE_SIZE:
            self._secrets.clear()
        self._secrets[digest] = (key, version, writes)
        return (key, digest), version

    async def may_be_issued(self, secret: str | None) -> bool:
        """False only for a secret the store never issued (`KnownDigests`); 503 when Redis
        cannot tell."""
        return secret is not None and await self.digests.may_be_issued(hash_secret(secret))

    async def load(self) -> bool:
        try:
            version, pending = await self.store.version_and_pending()
            self.read_at = time.monotonic()
            if pending:
                # An admin write stopped between its record and its version bump (a node died,
                # Redis failed): finish it here, which bumps the version (KeyStore._transaction).
                await self.store.settle_pending()
                version = await self.store.version()
            if version == self.view.version:
                return False
            teams = {t.id: t for t in await self.store.list_teams()}
            catalog = await self.store.catalog()
        except GatewayError:
            return False
        self.view = View(version=version, teams=teams, catalog=catalog)
        self.digests.refresh()  # a write may have issued a secret
        self._untold = True
        return True

    async def start(self) -> None:
        with contextlib.suppress(GatewayError):  # Redis away: the next node start does it
            await self.store.migrate_layout()
        await self.load()
        self._task = asyncio.create_task(self._run(), name="node-view")

    async def _run(self) -> None:
        me = asyncio.current_task()
        # Python 3.11's asyncio.wait_for, which redis-py uses around socket writes, returns the
        # result and drops a cancellation that lands as the write completes; without this check
        # `stop()` would then wait forever for a task that no longer knows it was cancelled.
        while me is None or not me.cancelling():
            await asyncio.sleep(VIEW_POLL_SECONDS)
            try:
                await self.load()
                # A handshake's own load() may have seen the change first: the tick must still
                # pass it on, or live sockets would never be checked against it.
                changed, self._untold = self._untold, False
                if self.on_tick is not None:
                    # Every tick, not only on change: rotation graces end with the clock.
                    await self.on_tick(changed)
            except Exception:  # a watcher must never die
                log.exception("node view refresh failed")

    async def stop(self) -> None:
        await self.digests.close()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
