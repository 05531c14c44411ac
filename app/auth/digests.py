"""Which secrets the store has issued, as this node last read them (`KnownDigests`).

The failed-authentication limit's filter: from an address out of failed authentications, a key
whose digest is not here is refused without a lookup. The reads of the digest log are the key
store's (`KeyStore.digests_after`, `KeyStore.backfill_digests`); this module decides when to read
and what the answers mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from app.keystore import DIGEST_PAGE, KeyStore


class KnownDigests:
    """Every secret digest the store has issued, as this node last read them: what lets the
    failed-authentication limit (app/auth/guard.py) refuse a flood of wrong keys without a Redis
    lookup each, and still serve a valid key it has never seen.

    Each admin write that issues a secret appends its digest to a Redis stream (`P:digests`,
    in the write's transaction); keys written before the stream existed are appended once by
    `KeyStore.backfill_digests`, which then marks the stream complete. This node reads the
    stream from where it last stopped, at start, after each change of the store's version, and
    when asked about a digest it does not hold: such a question waits for a read that began
    after it was asked (reads are shared and at least SYNC_SPACING_SECONDS apart), so a key
    issued anywhere before the request is known by then. A flood of wrong keys therefore costs
    at most one small read of the stream per SYNC_SPACING_SECONDS, not a lookup per key.

    Only 64 bits of each digest are kept (8 bytes and a set slot per secret ever issued); a
    wrong key matches one of a million digests with a chance of 1 in 2**44, and then is
    looked up as any key is. Digests stay after revocation or expiry: those keys are looked
    up and answered as before.
    """

    SYNC_SPACING_SECONDS = 0.05

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self._known: set[int] = set()
        self._last_id = "0-0"
        self._complete = False  # the stream holds every issued digest (backfilled)
        self._began = float("-inf")  # time.monotonic() when the last read began
        self._reading: asyncio.Task[None] | None = None
        self.reads = 0  # reads of the log begun

    def __len__(self) -> int:
        return len(self._known)

    @staticmethod
    def _short(digest: str) -> int:
        return int(digest[:16], 16)

    async def may_be_issued(self, digest: str) -> bool:
        """False only when no secret with this digest was issued before this call; 503
        `service_unavailable` when the log could not be read."""
        if self._short(digest) in self._known:
            return True
        asked = time.monotonic()
        while self._began < asked:
            if self._reading is None:
                self.refresh()
            assert self._reading is not None
            # Redis did not answer: 503, as the lookup would answer (a lookup per wrong key on
            # a hung Redis would hold each request for its timeout).
            await asyncio.shield(self._reading)
        return not self._complete or self._short(digest) in self._known

    def refresh(self) -> None:
        """Read what was issued since the last read, in the background."""
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(), name="known-digests")
            self._reading.add_done_callback(_retrieve)

    async def close(self) -> None:
        reading = self._reading
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    async def _read(self) -> None:
        try:
            wait = self._began + self.SYNC_SPACING_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._began = time.monotonic()
            self.reads += 1
            if not self._complete:
                await self.store.backfill_digests()
            while True:
                complete, digests, self._last_id = await self.store.digests_after(self._last_id)
                self._complete = self._complete or complete
                self._known.update(self._short(d) for d in digests)
                if len(digests) < DIGEST_PAGE:
                    return
        finally:
            self._reading = None


def _retrieve(task: asyncio.Task[None]) -> None:
    """A background read's failure is the next one's to retry; never 'exception never
    retrieved'."""
    if not task.cancelled():
        task.exception()
