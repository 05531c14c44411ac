"""The failed-authentication limit per client address (`GATEWAY_AUTH_FAILURES_PER_MINUTE`).

`AuthGuard` counts failed authentications (401 `invalid_api_key`, `api_key_revoked`,
`api_key_expired` on the customer endpoints; 401 `invalid_admin_token` on the admin API) per client
address, in this process's memory: no Redis round trip, so it works while Redis is away and costs
a dict lookup per authentication. Each address has a token bucket of `per_minute` tokens refilled
at `per_minute` per minute; a failure takes one. Successful authentications cost nothing and
change nothing.

What the limit protects is the key store, not the keys (they are 256-bit random: nobody guesses
one), and an address may be a whole company behind one NAT. So it never refuses a valid
credential (CONTRACT.md §4): an address with no token left still has the admin token accepted
(compared in memory, no store involved) and any key the store has issued looked up as usual;
only a key the store never issued is refused, with 429 `rate_limit_exceeded` and a `Retry-After`,
without a lookup. Which keys were issued, a node knows from its copy of the store's digest log
(app/auth/digests.py `KnownDigests`), read once per 50 ms at most however many wrong keys
arrive.

The table is bounded: an address whose bucket is full again is forgotten (it is the same as an
address never seen), and past `max_addresses` the address that failed least recently is dropped,
so a flood of distinct addresses cannot grow it. An attacker with that many addresses could push a
blocked address out early; per-address limits cannot stop such an attacker anyway.

Each process keeps its own table: with `gateway serve --workers N` an address may fail up to N
times the limit on one node, and each node counts alone.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import hdrs, web

from app.config import Settings
from app.errors import Code, GatewayError

log = logging.getLogger("gateway.guard")

# Failures that count: the caller did not hold a valid credential. 403 `team_disabled` does not
# count (the key is real), nor do 503s (the gateway could not tell).
AUTH_FAILURES = frozenset(
    {Code.INVALID_API_KEY, Code.API_KEY_REVOKED, Code.API_KEY_EXPIRED, Code.INVALID_ADMIN_TOKEN}
)
# About 240 bytes an entry (measured): 16 384 addresses that all failed within a minute, ~4 MB.
MAX_ADDRESSES = 16_384
# An IPv6 client usually holds a whole /64: counting per address would give it 2**64 budgets.
IPV6_PREFIX = 64
# A header value that is not an address is still a short key (an IPv6 address with a zone
# fits).
_MAX_ADDRESS_CHARS = 64


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """The table key of an address: IPv4 as is, IPv6 by its /64, anything else cut short."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return address.strip()[:_MAX_ADDRESS_CHARS]  # counted as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def right_most(value: str) -> str:
    """The last comma-separated entry of a header value, stripped."""
    return value.rpartition(",")[2].strip()


class _Bucket:
    __slots__ = ("logged", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens  # failures left, as of `stamp`
        self.stamp = stamp  # the last failure
        self.logged = False  # this run of failures was logged when it ran out


class AuthGuard:
    __slots__ = ("_clock", "_table", "max_addresses", "per_minute", "trust")

    def __init__(
        self,
        per_minute: int,
        *,
        trust_forwarded_for: bool = False,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.trust = trust_forwarded_for
        self.max_addresses = max_addresses
        self._clock = clock
        self._table: OrderedDict[str, _Bucket] = OrderedDict()  # least recent failure first

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthGuard:
        return cls(
            settings.auth_failures_per_minute, trust_forwarded_for=settings.trust_forwarded_for
        )

    def __len__(self) -> int:
        return len(self._table)

    def address(self, request: web.BaseRequest) -> str:
        """Whose failures these are: the peer, or the address our proxy saw.

        With `GATEWAY_TRUST_FORWARDED_FOR`, the right-most `X-Forwarded-For` entry: each proxy
        appends the address it received the connection from, so the right-most one was written by
        the proxy in front of this node (the one we trust) and everything to its left came from
        further away, the client's own header included, which a client can fill with anything.
        Taking the left-most would let a client pick a fresh address for every attempt. Behind
        two proxies the right-most entry is the outer proxy's address: have the inner proxy
        replace the header rather than append to it. A request without the header (one that did
        not come through the proxy) is counted by its peer address. A proxy that adds a header
        line of its own instead of extending the client's (HAProxy's `option forwardfor`) wrote
        the last line, so the last line's right-most entry is the one.
        """
        if self.trust:
            lines = request.headers.getall(hdrs.X_FORWARDED_FOR, ())
            forwarded = right_most(lines[-1]) if lines else ""
            if forwarded:
                return client_key(forwarded[:_MAX_ADDRESS_CHARS])  # cut before the cache
        return client_key(request.remote or "")

    def _tokens(self, bucket: _Bucket, now: float) -> float:
        refilled = (now - bucket.stamp) * self.per_minute / 60.0  # exact for whole seconds
        return min(float(self.per_minute), bucket.tokens + refilled)

    def refusal(self, address: str | None) -> GatewayError | None:
        """429 `rate_limit_exceeded` when `address` has no failure left, else None."""
        bucket = self._table.get(address) if address is not None else None
        if bucket is None:
            return None
        tokens = self._tokens(bucket, self._clock())
        if tokens >= 1.0:
            return None
        retry_after = max(1, math.ceil((1.0 - tokens) * 60.0 / self.per_minute))
        return GatewayError(
            Code.RATE_LIMIT_EXCEEDED,
            "Too many failed authentications from this address; "
            f"retry in {retry_after} s with a valid key.",
            headers={"Retry-After": str(retry_after)},
        )

    def failed(self, address: str) -> None:
        """Count one failed authentication from `address`."""
        now = self._clock()
        bucket = self._table.get(address)
        if bucket is None:
            self._forget_refilled(now)
            bucket = self._table[address] = _Bucket(float(self.per_minute), now)
            while len(self._table) > self.max_addresses:
                self._table.popitem(last=False)
        else:
            self._table.move_to_end(address)
        # Concurrent attempts can all pass `check` and then fail: the floor of 0 keeps the block
        # within one refill period of the last failure.
        bucket.tokens = max(0.0, self._tokens(bucket, now) - 1.0)
        bucket.stamp = now
        if bucket.tokens < 1.0 and not bucket.logged:
            bucket.logged = True  # once per run: a hostile client must not flood the log
            log.warning(
                "auth failures over the limit: address refused until it slows down",
                extra={"client_address": address, "auth_failures_per_minute": self.per_minute},
            )

    def _forget_refilled(self, now: float) -> None:
        """Drop the least recent entries whose bucket is full again (a minute since a failure)."""
        table = self._table
        while table:
            oldest = next(iter(table.values()))
            if now - oldest.stamp < 60.0:
                return
            table.popitem(last=False)

    def address_of(self, request: web.BaseRequest) -> str | None:
        """The address to judge and charge `request` by; None when the limit is off."""
        if self.per_minute <= 0:
            return None
        return self.address(request)

    def charge(self, address: str | None, err: GatewayError) -> None:
        """Count `err` against `address` when it is a failed authentication."""
        if address is not None and err.code in AUTH_FAILURES:
            self.failed(address)


AUTH_GUARD = web.AppKey("auth_guard", AuthGuard)
