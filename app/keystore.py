"""The key store: the only module that talks to Redis.

Redis layout (every key and channel under the configured prefix `P`):

- `P:team:<id>` (JSON Team) and the set `P:teams`: teams, until replaced.
- `P:key:<id>` (JSON ApiKey, holding only the secret's SHA-256) and the set `P:keys`: kept after
  revocation, to answer `api_key_revoked`.
- `P:secret:<sha256>` → key id, for current and rotated secrets (old ones answer `api_key_expired`).
- `P:catalog`: hash `openai/<model>` → JSON Price.
- `P:version`: bumped by every admin write; nodes poll it to refresh their view (≤ 0.25 s).
- `P:rl:<key id>`: sorted set of accepted turns in the last 60 s; expires 61 s after the last.
- `P:slots:key:<id>`, `P:slots:team:<id>`, `P:sessions`: sorted sets socket id → lease deadline
  (ms); leases are 45 s, refreshed every 15 s, so a dead node's slots lapse within a minute.
- `P:session:<socket id>` (JSON): what `GET /admin/v1/sessions` shows; 45 s, refreshed.

Races: socket caps are checked and taken in one Lua script (two nodes cannot both take the last
slot); rate-limit windows likewise. Redis errors become `GatewayError(service_unavailable)` here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from app import metrics
from app.errors import Code, GatewayError
from app.models import ApiKey, OldSecret, Price, Team, utcnow

log = logging.getLogger("gateway.keystore")
_T = TypeVar("_T")

LEASE_MS = 45_000
LEASE_REFRESH_SECONDS = 15.0
VIEW_POLL_SECONDS = 0.25
RATE_LIMIT_DEADLINE_SECONDS = 0.25
SECRET_PREFIX = "sk-gw-"

# Check both caps, then take both slots, atomically. KEYS: key slots, team slots.
# ARGV: now_ms, lease_deadline_ms, socket_id, key_cap, team_cap (0 = unlimited).
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local kcap = tonumber(ARGV[4])
local tcap = tonumber(ARGV[5])
if kcap > 0 and redis.call('ZCARD', KEYS[1]) >= kcap then return 0 end
if tcap > 0 and redis.call('ZCARD', KEYS[2]) >= tcap then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], 60000)
redis.call('PEXPIRE', KEYS[2], 60000)
return 1
"""
# Sliding 60 s window. KEYS: window. ARGV: now_ms, limit, member.
_RATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - 60000)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], 61000)
return 1
"""
# One round trip from a secret's hash to its key record.
# One round trip from a secret's hash to its key record, with the store's version, so a
# handshake refreshes the node's view only when something changed. KEYS: secret, version.
_LOOKUP = """
local version = redis.call('GET', KEYS[2]) or '0'
local id = redis.call('GET', KEYS[1])
if not id then return {false, version} end
return {redis.call('GET', ARGV[1] .. id), version}
"""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> tuple[str, str]:
    """A new secret and its public prefix (shown in listings and logs)."""
    public = secrets.token_hex(4)
    return f"{SECRET_PREFIX}{public}_{secrets.token_urlsafe(32)}", f"{SECRET_PREFIX}{public}"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is on a socket: the key, which of its secrets, and its team at handshake time."""

    key_id: str
    key_prefix: str
    team_id: str
    secret_hash: str


def secret_status(key: ApiKey, secret_hash: str, now: datetime) -> Code | None:
    """None when the secret is usable now, else the refusal code."""
    if key.revoked_at is not None:
        return Code.API_KEY_REVOKED
    if key.expires_at is not None and key.expires_at <= now:
        return Code.API_KEY_EXPIRED
    if secret_hash == key.secret_hash:
        return None
    for old in key.old_secrets:
        if old.hash == secret_hash:
            return None if old.until > now else Code.API_KEY_EXPIRED
    return Code.INVALID_API_KEY


class KeyStore:
    def __init__(self, redis_url: str, prefix: str, *, pool_size: int = 64) -> None:
        self.prefix = prefix
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=pool_size,
            timeout=2.0,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_timeout=True,
            health_check_interval=30,
        )
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._rate = self.redis.register_script(_RATE)
        self._lookup = self.redis.register_script(_LOOKUP)

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def close(self) -> None:
        await self.redis.aclose()

    async def _call(self, op: Awaitable[_T]) -> _T:
        try:
            result = await op
        except (RedisError, OSError) as exc:
            metrics.REDIS_UP.set(0)
            raise GatewayError(Code.SERVICE_UNAVAILABLE) from exc
        metrics.REDIS_UP.set(1)
        return result

    async def ping(self) -> bool:
        try:
            await self._call(self.redis.ping())
        except GatewayError:
            return False
        return True

    # -- reads -------------------------------------------------------------------------------

    async def version(self) -> int:
        raw = await self._call(self.redis.get(self.k("version")))
        return int(raw or 0)

    async def get_team(self, team_id: str) -> Team | None:
        raw = await self._call(self.redis.get(self.k("team", team_id)))
        return Team.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[Team]:
        ids = sorted(await self._call(self.redis.smembers(self.k("teams"))))
        if not ids:
            return []
        raws = await self._call(self.redis.mget([self.k("team", _s(i)) for i in ids]))
        return [Team.model_validate_json(r) for r in raws if r]

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = await self._call(self.redis.get(self.k("key", key_id)))
        return ApiKey.model_validate_json(raw) if raw else None

    async def get_keys(self, key_ids: Iterable[str]) -> dict[str, ApiKey]:
        ids = list(key_ids)
        if not ids:
            return {}
        raws = await self._call(self.redis.mget([self.k("key", i) for i in ids]))
        return {i: ApiKey.model_validate_json(r) for i, r in zip(ids, raws, strict=True) if r}

    async def list_keys(self, team_id: str | None = None) -> list[ApiKey]:
        ids = sorted(_s(i) for i in await self._call(self.redis.smembers(self.k("keys"))))
        keys = (await self.get_keys(ids)).values()
        return [k for k in keys if team_id is None or k.team_id == team_id]

    async def catalog(self) -> dict[str, Price]:
        raw = await self._call(self.redis.hgetall(self.k("catalog")))
        return {_s(m): Price.model_validate_json(p) for m, p in raw.items()}

    async def lookup_secret(self, secret: str) -> tuple[ApiKey, str] | None:
        found, _version = await self.lookup_secret_versioned(secret)
        return found

    async def lookup_secret_versioned(self, secret: str) -> tuple[tuple[ApiKey, str] | None, int]:
        """The key of a secret (and the secret's hash), and the store's version."""
        digest = hash_secret(secret)
        raw, version = await self._call(
            self._lookup(
                keys=[self.k("secret", digest), self.k("version")], args=[self.k("key", "")]
            )
        )
        found = (ApiKey.model_validate_json(raw), digest) if raw else None
        return found, int(version)

    # -- writes (admin) ----------------------------------------------------------------------

    async def _bump(self, pipe: Any) -> None:
        pipe.incr(self.k("version"))

    async def put_team(self, team: Team) -> bool:
        """Create or replace; True when it was created."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.k("teams"), team.id)
            pipe.set(self.k("team", team.id), team.model_dump_json())
            await self._bump(pipe)
            added, *_ = await self._call(pipe.execute())
        return bool(added)

    async def put_key(self, key: ApiKey, *, new_secret_hash: str | None = None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.k("keys"), key.id)
            pipe.set(self.k("key", key.id), key.model_dump_json())
            if new_secret_hash:
                pipe.set(self.k("secret", new_secret_hash), key.id)
            await self._bump(pipe)
            await self._call(pipe.execute())

    async def create_key(
        self, team_id: str, name: str = "", expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        secret, prefix = new_secret()
        key = ApiKey(
            id="key_" + secrets.token_hex(8),
            team_id=team_id,
            name=name,
            prefix=prefix,
            created_at=utcnow(),
            expires_at=expires_at,
            secret_hash=hash_secret(secret),
        )
        await self.put_key(key, new_secret_hash=key.secret_hash)
        return key, secret

    async def rotate_key(self, key: ApiKey, grace_seconds: int) -> tuple[ApiKey, str]:
        secret, prefix = new_secret()
        now = utcnow()
        old = [o for o in key.old_secrets if o.until > now]
        old.append(OldSecret(hash=key.secret_hash, until=now + timedelta(seconds=grace_seconds)))
        rotated = key.model_copy(
            update={"secret_hash": hash_secret(secret), "prefix": prefix, "old_secrets": old}
        )
        await self.put_key(rotated, new_secret_hash=rotated.secret_hash)
        return rotated, secret

    async def revoke_key(self, key: ApiKey) -> ApiKey:
        revoked = key.model_copy(update={"revoked_at": key.revoked_at or utcnow()})
        await self.put_key(revoked)
        return revoked

    async def set_price(self, model: str, price: Price) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.k("catalog"), model, price.model_dump_json())
            await self._bump(pipe)
            await self._call(pipe.execute())

    async def delete_price(self, model: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.k("catalog"), model)
            await self._bump(pipe)
            removed, _ = await self._call(pipe.execute())
        return bool(removed)

    # -- limits ------------------------------------------------------------------------------

    async def acquire_socket(
        self, principal: Principal, socket_id: str, key_cap: int, team_cap: int
    ) -> bool:
        if not key_cap and not team_cap:
            return True
        now = int(time.time() * 1000)
        keys = [
            self.k("slots", "key", principal.key_id),
            self.k("slots", "team", principal.team_id),
        ]
        args: list[str | int] = [now, now + LEASE_MS, socket_id, key_cap, team_cap]
        return bool(await self._call(self._acquire(keys=keys, args=args)))

    async def allow_response(self, key_id: str, limit: int) -> bool:
        """Sliding-window rate limit; fails open while Redis is away (CONTRACT.md §4)."""
        if limit <= 0:
            return True
        now = int(time.time() * 1000)
        try:
            # A hung Redis must not stall a customer's turn for the pool's retries (~6 s).
            async with asyncio.timeout(RATE_LIMIT_DEADLINE_SECONDS):
                ok = await self._call(
                    self._rate(keys=[self.k("rl", key_id)], args=[now, limit, secrets.token_hex(6)])
                )
        except (GatewayError, TimeoutError):
            metrics.REDIS_UP.set(0)
            return True
        return bool(ok)

    async def register_session(
        self, principal: Principal, socket_id: str, info: dict[str, Any]
    ) -> None:
        deadline = int(time.time() * 1000) + LEASE_MS
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.k("sessions"), {socket_id: deadline})
            pipe.set(self.k("session", socket_id), orjson.dumps(info), px=LEASE_MS)
            await self._call(pipe.execute())

    async def refresh_leases(self, sessions: list[tuple[Principal, str, dict[str, Any]]]) -> None:
        """Renew this node's slots and session records (every LEASE_REFRESH_SECONDS)."""
        if not sessions:
            return
        deadline = int(time.time() * 1000) + LEASE_MS
        async with self.redis.pipeline(transaction=False) as pipe:
            for principal, socket_id, info in sessions:
                pipe.zadd(self.k("slots", "key", principal.key_id), {socket_id: deadline}, xx=True)
                pipe.zadd(
                    self.k("slots", "team", principal.team_id), {socket_id: deadline}, xx=True
                )
                pipe.zadd(self.k("sessions"), {socket_id: deadline})
                pipe.set(self.k("session", socket_id), orjson.dumps(info), px=LEASE_MS)
            await self._call(pipe.execute())

    async def release_socket(self, principal: Principal, socket_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self.k("slots", "key", principal.key_id), socket_id)
            pipe.zrem(self.k("slots", "team", principal.team_id), socket_id)
            pipe.zrem(self.k("sessions"), socket_id)
            pipe.delete(self.k("session", socket_id))
            await self._call(pipe.execute())

    async def list_sessions(self) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        await self._call(self.redis.zremrangebyscore(self.k("sessions"), "-inf", now))
        ids = await self._call(self.redis.zrange(self.k("sessions"), 0, -1))
        if not ids:
            return []
        names = [self.k("session", _s(i)) for i in ids if isinstance(i, bytes | str)]
        raws = await self._call(self.redis.mget(names))
        return [orjson.loads(r) for r in raws if r]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class View:
    """A node's copy of what every turn checks: teams and prices (refreshed within 1 s)."""

    version: int
    teams: dict[str, Team]
    catalog: dict[str, Price]


class NodeView:
    """Keeps `View` fresh by polling `P:version` and calls `on_change` after each reload.

    Polling (4 times a second, one GET) rather than pub/sub: a node that missed a message can
    never keep serving a revoked key, and a Redis restart needs no resubscription.
    """

    def __init__(
        self, store: KeyStore, on_tick: Callable[[bool], Awaitable[None]] | None = None
    ) -> None:
        self.store = store
        self.view = View(version=-1, teams={}, catalog={})
        self.on_tick = on_tick
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> bool:
        try:
            version = await self.store.version()
            if version == self.view.version:
                return False
            teams = {t.id: t for t in await self.store.list_teams()}
            catalog = await self.store.catalog()
        except GatewayError:
            return False
        self.view = View(version=version, teams=teams, catalog=catalog)
        return True

    async def start(self) -> None:
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
                changed = await self.load()
                if self.on_tick is not None:
                    # Every tick, not only on change: rotation graces end with the clock.
                    await self.on_tick(changed)
            except Exception:  # a watcher must never die
                log.exception("node view refresh failed")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
