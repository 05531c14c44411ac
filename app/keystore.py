"""The key store: the only module that talks to Redis.

Redis layout (every key under the configured prefix `P`; the same names on one server and on a
Redis Cluster). A Cluster runs a script or a MULTI only when all its keys share a hash slot, so
each owner's keys share a `{hash tag}`: a key's in `{k:<key id>}`, a team's in `{t:<team id>}`,
the store-wide singletons in `{g}`; what one command touches alone needs none.

- `P:{t:<id>}:team` (JSON Team), `P:{t:<id>}:slots` (its sockets' slots); `P:{g}:teams`, the set
  of team ids.
- `P:{k:<id>}:key` (JSON ApiKey, holding only the secret's SHA-256), `P:{k:<id>}:slots`,
  `P:{k:<id>}:rl`; `P:{g}:keys`, the set of key ids. Kept after revocation, to answer
  `api_key_revoked`.
- `P:secret:<sha256>` → key id, for current and rotated secrets (old ones answer
  `api_key_expired`). The digest does not tell its key before the lookup, so this entry stays
  untagged and a lookup takes two round trips (the secret's entry with the version, then the
  key's record); a node's cached secrets skip both (NodeView.lookup_secret).
- `P:{g}:digests` (stream, field `d`): the SHA-256 of every secret ever issued, appended by the
  write that issues it; `P:{g}:digests:complete` once keys from before the stream are in it
  (app/auth/digests.py `KnownDigests`).
- `P:{g}:catalog`: hash `openai/<model>` → JSON Price.
- `P:{g}:version`: bumped by every admin write; nodes poll it to refresh their view (≤ 0.25 s).
- `P:{g}:pending`: set of admin writes (`key:<id>:<nonce>`, `team:<id>:<nonce>`) that changed the
  record but may not have finished its follow-ups (`_settle`); any node completes them.
- `P:{g}:layout`: `2` once the names before hash tags were copied over (`migrate_layout`).
- `P:{k:<id>}:rl`: sorted set of accepted turns in the last 60 s; expires 61 s after the last.
- `P:{k:<id>}:tpm`: hash second → tokens of the responses that ended in it, the last 60 s.
- `P:{k:<id>}:spend:d<YYYYMMDD>`, `P:{t:<id>}:spend:d<YYYYMMDD>`, `P:{t:<id>}:spend:m<YYYYMM>`:
  spend in nano-USD of the key's day and the team's day and month (UTC), expiring at the
  period's end; created only from the ledger (`seed_counters`, app/spend.py), then added to.
- `P:{k:<id>}:slots`, `P:{t:<id>}:slots`, `P:sessions`: sorted sets socket id → lease deadline
  (ms); leases are 45 s, refreshed every 15 s, so a dead node's slots lapse within a minute.
- `P:session:<socket id>` (JSON): what `GET /admin/v1/sessions` shows; 45 s, refreshed, and
  rewritten within SESSION_INFO_BATCH_SECONDS of a turn's end (its model and turn count).

Races: a socket's key slot and team slot are each checked and taken by a script on its own slot,
sent together, and a refusal of either gives both back (`acquire_socket`); rate-limit windows
are one script on the key's slot (with token or spend limits `_JUDGE_ALL`, on one server with
the team's counters too; on a Cluster with a read of them on the team's slot beside it); admin
writes that read a
record first run under WATCH and MULTI/EXEC on that record's slot, then finish on `{g}`
(`_transaction`). Redis errors become `GatewayError(service_unavailable)` here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import hiredis
import orjson
import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    WatchError,
)

from app import ids, metrics
from app.auth.principal import Principal, hash_secret, new_secret
from app.config import RedisSettings
from app.errors import Code, GatewayError, not_found
from app.models import ApiKey, OldSecret, Price, Team, utcnow
from app.redisconn import make_redis

_T = TypeVar("_T")
# What a Redis call may raise; RedisClusterException (a Cluster none of whose nodes answers) is
# not a RedisError.
_REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)

LEASE_MS = 45_000
LEASE_REFRESH_SECONDS = 15.0
RATE_LIMIT_DEADLINE_SECONDS = 0.25
# A handshake, `/readyz` or a view refresh waits this long for Redis, then answers 503: without
# it a hung Redis held them for the pool's timeouts and retries (about 6 s).
HANDSHAKE_DEADLINE_SECONDS = 1.0
# Spares: a turn that asks Redis also takes up to RATE_SPARES slots of its key's window (a 20th
# of the limit at most, only while the window stays under RATE_SPARE_FILL of the limit, and
# only when this node asked for the same key within RATE_SPARE_SECONDS);
# the node's next turns of that key use them without a round trip. Unused after
# RATE_SPARE_SECONDS they are given back. Spares are counted in Redis when taken, so every
# node together never accepts more than the limit.
RATE_SPARES = 32
# Closed sockets' slots are given back together, this long after the first of them closed (a
# handshake refused for a cap first gives back this node's waiting ones and asks again).
RELEASE_BATCH_SECONDS = 0.05
# Session records changed by a turn's end are rewritten together, this long after the first of
# them changed: a listing shows a turn within a second (CONTRACT.md §5) for one pipeline per
# node per interval, whatever the number of turns.
SESSION_INFO_BATCH_SECONDS = 0.25
SESSION_INFO_CHUNK = 256
RATE_SPARE_FILL = 0.5
RATE_SPARE_SECONDS = 0.5
# Keys' packed judgments kept (`pack_judgment`, and `pack_add`'s), all dropped when full.
JUDGMENTS_KEPT = 10_000
ASKED_MAX = 50_000  # keys remembered for the spares' test before the old ones are dropped
# An admin write whose records another write changed between its read and its commit reads and
# decides again, this many times at most (two writers settle in two tries).
ADMIN_WRITE_TRIES = 50
# Entries of the digest log read per round trip (KnownDigests).
DIGEST_PAGE = 10_000

# One socket slot of one owner (a key or a team): check its cap and take a slot, atomically on
# the owner's hash slot, so two nodes cannot both take the last one. KEYS: the owner's slots.
# ARGV: now_ms, lease_deadline_ms, socket_id, cap (0 = unlimited: the slot is taken unchecked, so
# a cap set later counts the sockets already open). Returns 1 (taken) or 0 (refused).
#
# A socket takes its key's slot and its team's slot with two of these, sent in one round trip
# with its session record (`acquire_socket`); a Cluster cannot run one script over both owners.
# Compensation: when either refuses, the socket is released at once (`_release_commands`: ZREM
# from both slot sets, its record deleted), so the set that took it is back to what it was. A
# node that dies between the take and the release leaves a slot whose 45 s lease lapses
# (LEASE_MS), so within a minute as CONTRACT.md §4 asks.
_TAKE_SLOT = """
local cap = tonumber(ARGV[4])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], 60000)
return 1
"""
# Sliding 60 s window. KEYS: window. ARGV: now_ms, limit, member, spares wanted, the window size
# spares may fill it up to, then members to remove first (this node's unused spares). Returns
# {1 or 0 (accepted), spares taken}: turns this node may accept later without asking, already
# counted in the window as `member:1`, `member:2`, … (RateLimiter).
_RATE = """
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local want = tonumber(ARGV[4])
local fill = tonumber(ARGV[5])
for i = 6, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
local size = redis.call('ZCARD', KEYS[1])
if size >= limit then return {0, 0} end
redis.call('ZADD', KEYS[1], now, ARGV[3])
size = size + 1
local got = 0
while got < want and size < fill do
  got = got + 1
  size = size + 1
  redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. got)
end
redis.call('PEXPIRE', KEYS[1], 61000)
return {1, got}
"""
# Check 8 with token or spend limits (app/spend.py): the response window, the token window,
# the key's spend today and the team's today and this month, in the contract's order; the turn
# counted in the response window only when all pass. KEYS: response window, token window,
# key-day spend, then team-day and team-month spend where every key is on one server (on a
# Cluster, whose hash slots keep a key's and a team's names apart, the script gets the key's
# three only, the team caps are 0, and the team's counters are read beside it). ARGV: now_ms,
# responses limit, member, tokens limit, key-day cap, team-day cap, team-month cap (nano-USD;
# 0 = none). Returns {code, figure, team day, team month}: code 0 accepted, 1 responses, 2
# tokens, 3 key's spend, 4 key's spend counter missing, 5 a team counter missing, 6 the team's
# spend at or over a cap; figure: the tokens of the last minute (2) or the key's spend; a team
# figure is -1 when not asked for, -2 when its counter is missing. Tokens are counted per second
# (`HINCRBY window <second> <tokens>`): a 60 s window of at most 60 fields.
_JUDGE_ALL = """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[4])
local cap = tonumber(ARGV[5])
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[1]) >= rpm then return {1, 0, -1, -1} end
end
if tpm > 0 then
  local used = 0
  local oldest = math.floor(now / 1000) - 59
  local fields = redis.call('HGETALL', KEYS[2])
  for i = 1, #fields, 2 do
    if tonumber(fields[i]) < oldest then
      redis.call('HDEL', KEYS[2], fields[i])
    else
      used = used + tonumber(fields[i + 1])
    end
  end
  if used >= tpm then return {2, used, -1, -1} end
end
local team = {-1, -1}
local over = false
local missing = false
for i = 1, 2 do
  local limit = tonumber(ARGV[5 + i])
  if limit > 0 then
    local value = redis.call('GET', KEYS[3 + i])
    if value then
      team[i] = tonumber(value)
      if team[i] >= limit then over = true end
    else
      team[i] = -2
      missing = true
    end
  end
end
local spent = 0
if cap > 0 then
  local value = redis.call('GET', KEYS[3])
  if not value then return {4, 0, team[1], team[2]} end
  spent = tonumber(value)
  if spent >= cap then return {3, spent, team[1], team[2]} end
end
if missing then return {5, spent, team[1], team[2]} end
if over then return {6, spent, team[1], team[2]} end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], 61000)
end
return {0, spent, team[1], team[2]}
"""
# Finished responses' cost and tokens. KEYS: spend counters (the key's day, and where every key
# is on one server the team's day and month; on a Cluster, whose hash slots keep a key's and a
# team's names apart, one call for the key's and one for the team's), then, when tokens are
# counted, the key's token window last. ARGV: nano-USD, tokens, second. A spend counter is only
# added to, never created: one that is missing (a new day, a Redis that lost it) is rebuilt from
# the ledger, which has this response's row, before it is next read (app/spend.py).
_ADD = """
local nano = tonumber(ARGV[1])
local counters = #KEYS
if tonumber(ARGV[2]) > 0 then
  counters = counters - 1
  redis.call('HINCRBY', KEYS[#KEYS], ARGV[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[#KEYS], 61000)
end
if nano > 0 then
  for i = 1, counters do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], nano) end
  end
end
return 1
"""


class _Spares:
    """Slots of one key's rate-limit window this node took ahead of its turns."""

    __slots__ = ("members", "taken_at")

    def __init__(self, members: list[str], taken_at: float) -> None:
        self.members = members  # their names in the window's sorted set
        self.taken_at = taken_at  # time.monotonic()


# A batched call: its script (None: a plain command), its arguments, its caller's future.
_Call = tuple[AsyncScript | None, tuple[Any, ...], "asyncio.Future[Any]"]


class Packed(NamedTuple):
    """A call's arguments already packed as the RESP command a single server is sent (a script's
    `EVALSHA` with its sha, keys and arguments): what a turn's judgment sends is mostly the same
    bytes turn after turn, so its caller keeps them (`KeyStore.judge_spend`). Never on a
    Cluster, where redis-py's pipeline packs (and routes) each command itself."""

    resp: bytes


class _Batcher:
    """Script calls made in one turn of the event loop, sent to Redis as one pipeline.

    redis-py's asyncio client spends about 150-300 µs of CPU per command (a pool checkout with
    its lock and timer, a liveness read on the socket, retry wrappers); in a pipeline most of
    that is paid once per batch. Handshakes arrive in bursts, so their slot calls and the
    sockets' releases share round trips: about a quarter of the CPU per call at 64 in flight.
    Scripts are called by their SHA (EVALSHA) without redis-py's per-pipeline SCRIPT EXISTS; a
    Redis that lost them (a restart) answers NOSCRIPT, and they are loaded and the batch's
    refused calls sent again, once. One batch is in flight at a time: calls made meanwhile wait
    for it (one round trip at most) and go together in the next, so the busier the node, the
    larger the batches. Plain commands (`command`) share the batches too.

    On a Cluster the pipeline is redis-py's ClusterPipeline: it sends each command (EVALSHA
    included, routed by its first key) to the node owning its slot, one pipeline per node in
    parallel, and follows MOVED/ASK; every script here keeps its keys on one slot.
    """

    def __init__(self, redis: Any, *, cluster: bool = False, timeout: float = 1.0) -> None:
        self._redis = redis
        self._cluster = cluster
        self._timeout = timeout  # a whole batch's, on one server (`_execute`)
        self._queue: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending = False
        # Scripts this batcher has loaded: a script's first batch loads it first, so no call of
        # a batch fails with NOSCRIPT while later ones run (a count sent again after the
        # judgement behind it would be a count that judgement missed).
        self._loaded: set[str] = set()
        # Calls with a deadline, oldest first (every deadline is RATE_LIMIT_DEADLINE_SECONDS), and
        # the one timer that fails those past it: an `asyncio.timeout` around each call cost a
        # turn about 4 us.
        self._deadlines: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None  # on one server: the connection the batches go out on (`_take`)
        self._socket_timeout: float | None = None

    def call(
        self,
        script: AsyncScript,
        keys: list[str],
        args: list[Any],
        deadline: float | None = None,
    ) -> asyncio.Future[Any]:
        """`deadline`: seconds after which the call fails with TimeoutError, answered or not."""
        return self._with_deadline(self._queued(script, (len(keys), *keys, *args)), deadline)

    def call_packed(
        self, script: AsyncScript, packed: Packed, deadline: float | None = None
    ) -> asyncio.Future[Any]:
        """`call` with its command packed by the caller (one server only)."""
        assert not self._cluster, "a Cluster's pipeline packs its commands itself"
        return self._with_deadline(self._queued(script, packed), deadline)

    def _with_deadline(
        self, future: asyncio.Future[Any], deadline: float | None
    ) -> asyncio.Future[Any]:
        if deadline is not None:
            loop = future.get_loop()
            self._deadlines.append((loop.time() + deadline, future))
            if self._timer is None:
                self._timer = loop.call_at(self._deadlines[0][0], self._expire)
        return future

    def _expire(self) -> None:
        self._timer = None
        deadlines = self._deadlines
        if not deadlines:
            return
        loop = deadlines[0][1].get_loop()
        now = loop.time()
        while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
            _when, future = deadlines.popleft()
            if not future.done():
                future.set_exception(TimeoutError("Redis did not answer in time"))
        if deadlines:
            self._timer = loop.call_at(deadlines[0][0], self._expire)

    def command(self, *args: Any) -> asyncio.Future[Any]:
        return self._queued(None, args)

    def _queued(self, script: AsyncScript | None, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        # The loop, remembered: `asyncio.get_running_loop()` makes a getpid(2) call on Python
        # 3.11, once per turn here. A batcher serves one loop at a time (its connections do);
        # one that is no longer running (a test's) is replaced by the one running now.
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
            self._conn = None  # a connection of another loop is of no use on this one
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, args, future))
        if len(self._queue) == 1 and not self._sending:
            loop.call_soon(self._flush)  # after the callbacks already due in this turn
        return future

    def _flush(self) -> None:
        if self._sending or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._sending = True
        task = asyncio.create_task(self._send(batch), name="redis-batch")
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._sending = False
        self._flush()  # what queued up meanwhile

    async def _send(self, batch: list[_Call]) -> None:
        try:
            for script, _args, _future in batch:
                if script is not None and script.sha not in self._loaded:
                    script.sha = await self._load(script.script)
                    self._loaded.add(script.sha)
            results = await self._execute(batch)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis lost its scripts (a restart, a failover): loaded again, the calls that
                # failed are sent again, after the rest of their batch (for this batch only).
                for script in {id(batch[i][0]): batch[i][0] for i in missing}.values():
                    if script is not None:
                        script.sha = await self._load(script.script)
                again = await self._execute([batch[i] for i in missing])
                for i, result in zip(missing, again, strict=True):
                    results[i] = result
        except Exception as exc:  # the connection failed: every call of the batch did
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up waiting (a deadline, a cancelled handshake)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _load(self, script: Any) -> str:
        """Load a script (on a Cluster: on every primary, where SCRIPT LOAD goes by default)."""
        return str(await self._redis.script_load(script))

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        """The batch's commands, written at once and their replies read in order: redis-py's
        pipeline on a Cluster; on one server (or the primary Sentinels name) directly on a
        pooled connection, which costs a command about a third of what the pipeline's
        bookkeeping did (its response callbacks, a read timeout per reply). Replies are raw:
        no command here needs a callback. The batch has one timeout; a connection that failed
        is dropped and the batch sent once more on a new one (a restarted Redis, a primary
        demoted by a failover, as redis-py's pipeline retries)."""
        if self._cluster:
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, args, _future in batch:
                    if script is None:
                        pipe.execute_command(*args)
                    else:
                        pipe.evalsha(script.sha, *args)
                return list(await pipe.execute(raise_on_error=False))
        for attempt in (1, 2):
            conn = self._conn
            if conn is None:
                conn = await self._take()
            try:
                async with asyncio.timeout(self._timeout):
                    await conn.send_packed_command(_packed(conn, batch), check_health=False)
                    return await _replies(conn, len(batch))
            except TimeoutError:  # an OSError too, but a hung Redis is not retried
                await self._give_back(conn)
                raise
            except (RedisConnectionError, OSError):
                await self._give_back(conn)
                if attempt == 2:
                    raise
            except BaseException:
                await self._give_back(conn)  # replies may be left unread: the connection is spent
                raise
        raise AssertionError("unreachable")

    async def _take(self) -> Any:
        """The connection the batches go out on, held from the pool until it fails (one batch
        is in flight at a time): a checkout per batch (its lock, its timer, its liveness read)
        cost more than a small batch's commands. Its socket timeout is lifted while held, as
        the batch has its own (`_execute`): redis-py wraps each write in `asyncio.wait_for`
        when a connection has one, a task per batch."""
        conn = await self._redis.connection_pool.get_connection()
        self._conn, self._socket_timeout = conn, conn.socket_timeout
        conn.socket_timeout = None
        return conn

    async def _give_back(self, conn: Any) -> None:
        """Disconnected (a failed batch may have left replies unread) and back to the pool."""
        if self._conn is conn:
            self._conn = None
        conn.socket_timeout = self._socket_timeout
        try:
            await conn.disconnect()
        finally:
            await self._redis.connection_pool.release(conn)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if self._conn is not None:
            await self._give_back(self._conn)


def _items(args: tuple[str | int, ...]) -> bytes:
    """`args` packed by hiredis as RESP bulk strings, without the array's header."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub's tuple is too narrow
    return packed[packed.index(b"\r\n") + 2 :]


def _packed(conn: Any, batch: list[_Call]) -> bytes:
    """A batch's commands as one write: a call's own packing (`Packed`, made by its caller) as
    it is, the others packed by the connection (hiredis, `_HiredisPacking`)."""
    parts: list[bytes] = []
    for script, args, _future in batch:
        if type(args) is Packed:
            parts.append(args.resp)
        elif script is None:
            parts += conn.pack_command(*args)
        else:
            parts += conn.pack_command("EVALSHA", script.sha, *args)
    return b"".join(parts)


async def _replies(conn: Any, count: int) -> list[Any]:
    """`count` replies, read off the connection's hiredis reader as they come: what
    `read_response` does for each, without its per-reply checks and timeout (the batch has its
    own). An error reply is kept as the exception redis-py's parser makes of it (NoScriptError,
    ResponseError), but READONLY fails the connection, as redis-py's Sentinel connection does
    in `read_response` (`_execute` then sends the batch again on a new one, which asks the
    Sentinels for the primary). The connections speak RESP2 (no push frames). Private parts
    of redis-py's hiredis parser (`_reader`, `_connected`, `read_from_socket`,
    NOT_ENOUGH_DATA), hence the pin in pyproject.toml (tests/test_canaries.py checks them)."""
    parser = conn._parser
    reader = parser._reader
    if reader is None or not parser._connected:
        raise RedisConnectionError("Connection closed by server.")
    replies: list[Any] = []
    while len(replies) < count:
        reply = reader.gets()
        if reply is NOT_ENOUGH_DATA:
            await parser.read_from_socket()
            continue
        if isinstance(reply, RedisConnectionError):
            raise reply
        if isinstance(reply, ReadOnlyError):  # a demoted primary: redis-py's Sentinel rule
            raise RedisConnectionError("The previous master is now a slave")
        replies.append(reply)
    return replies


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# What `gateway_redis_up` was last set to by this process's stores: set again only when it
# changes (a prometheus-client gauge's `set` takes a lock, and every Redis call succeeds alike).
_redis_up_shown: int | None = None


def _redis_up(value: int) -> None:
    global _redis_up_shown
    if value != _redis_up_shown:
        _redis_up_shown = value
        metrics.REDIS_UP.set(value)


class _HiredisPacking:
    """Commands packed by hiredis, in C, into the bytes redis-py's asyncio connection builds in
    Python (the slot script's call: 28 us -> 3.6 us, on every handshake and rate-limited turn).
    Anything but str, bytes and int (a float, a bool, None, a memoryview) takes redis-py's own
    packing, and so do its refusals (`DataError`)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _PACKABLE.issuperset(map(type, args)):  # in C: no generator step per argument
            first = args[0]
            if (type(first) is str and " " in first) or (type(first) is bytes and b" " in first):
                args = (*first.split(), *args[1:])  # 'CONFIG GET' and the like
            with contextlib.suppress(TypeError, UnicodeError):
                return [hiredis.pack_command(args)]
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


_PACKABLE = frozenset({str, bytes, int})


def _hiredis_packing(pool: aioredis.ConnectionPool) -> None:
    """The pool's connections (plain, TLS or Unix socket, as the URL chose) pack with hiredis."""
    base = pool.connection_class
    pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})


class KeyStore:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        pool_size: int = 64,
        cluster: bool = False,
        sentinels: Sequence[tuple[str, int]] = (),
        sentinel_master: str = "mymaster",
    ) -> None:
        self.prefix = prefix
        # A hung Redis answers nothing: each call gives up after HANDSHAKE_DEADLINE_SECONDS (the
        # client's own read timeout, not retried; an `asyncio.timeout` around every call cost
        # the handshake path 6%), so /readyz gets its 503 in about 1 s and a handshake in about
        # 2 (tests/test_faults_live.py). Refused or reset connections are retried with backoff
        # (a Redis restart).
        self.redis: Any = make_redis(
            redis_url,
            pool_size=pool_size,
            timeout=HANDSHAKE_DEADLINE_SECONDS,
            cluster=cluster,
            sentinels=sentinels,
            sentinel_master=sentinel_master,
        )
        self.cluster = cluster
        if not cluster:
            _hiredis_packing(self.redis.connection_pool)
        self._take_slot = self.redis.register_script(_TAKE_SLOT)
        self._rate = self.redis.register_script(_RATE)
        self._add = self.redis.register_script(_ADD)
        self._judge_all = self.redis.register_script(_JUDGE_ALL)
        self._batch = _Batcher(self.redis, cluster=cluster, timeout=HANDSHAKE_DEADLINE_SECONDS)
        # The session records' rewrites, batched apart: a chunk of them never waits in front of
        # a turn's judgment (one batch is in flight at a time per batcher).
        self._records = _Batcher(self.redis, cluster=cluster, timeout=HANDSHAKE_DEADLINE_SECONDS)
        self._releases: list[tuple[str, str, str]] = []  # key id, team id, socket id
        self._releaser: asyncio.Task[None] | None = None
        # socket id -> its changed session record, made when written
        self._infos: dict[str, Callable[[], dict[str, Any]]] = {}
        self._info_writer: asyncio.Task[None] | None = None
        # Admin writes made through this store: a node's cached secrets are stale after one.
        self.writes = 0
        self.lookups = 0  # secrets looked up (lookup_digest), for the guard's measurements
        self._spares: dict[str, _Spares] = {}
        # (key, team, day, month) -> the judgment's limits, script SHA and packed pieces
        self._judgments: dict[tuple[str, str, str, str], Any] = {}
        self._adds: dict[tuple[str, str, str, str, bool], tuple[str, bytes]] = {}
        self._asked: dict[str, float] = {}  # key id -> when this node last asked its window
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: RedisSettings, *, pool_size: int = 64) -> KeyStore:
        """The store of a node or a shell command, on the topology the settings name."""
        return cls(
            settings.redis_url,
            settings.redis_prefix,
            pool_size=pool_size,
            cluster=settings.redis_cluster,
            sentinels=settings.sentinel_addresses,
            sentinel_master=settings.redis_sentinel_master,
        )

    # -- names (the layout in the module's docstring) ----------------------------------------

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def g(self, name: str) -> str:
        """A store-wide singleton: all of them on the `{g}` slot, so a price write and the
        version bump, or an admin write's follow-ups, are one MULTI."""
        return f"{self.prefix}:{{g}}:{name}"

    def key_record(self, key_id: str) -> str:
        return f"{self.prefix}:{{k:{key_id}}}:key"

    def key_slots(self, key_id: str) -> str:
        return f"{self.prefix}:{{k:{key_id}}}:slots"

    def rate_window(self, key_id: str) -> str:
        return f"{self.prefix}:{{k:{key_id}}}:rl"

    def token_window(self, key_id: str) -> str:
        return f"{self.prefix}:{{k:{key_id}}}:tpm"

    def key_spend(self, key_id: str, period: str) -> str:
        return f"{self.prefix}:{{k:{key_id}}}:spend:{period}"

    def team_spend(self, team_id: str, period: str) -> str:
        return f"{self.prefix}:{{t:{team_id}}}:spend:{period}"

    def team_record(self, team_id: str) -> str:
        return f"{self.prefix}:{{t:{team_id}}}:team"

    def team_slots(self, team_id: str) -> str:
        return f"{self.prefix}:{{t:{team_id}}}:slots"

    def secret_entry(self, digest: str) -> str:
        return self.k("secret", digest)

    def sessions_index(self) -> str:
        return self.k("sessions")

    def session_record(self, socket_id: str) -> str:
        return self.k("session", socket_id)

    async def close(self) -> None:
        await _cancelled(self._sweeper)
        with contextlib.suppress(GatewayError):
            await self._give_back(list(self._spares))
        await _cancelled(self._releaser)
        with contextlib.suppress(GatewayError):
            await self.flush_releases()
        await _cancelled(self._info_writer)  # the records go with their sockets' releases
        await self._batch.close()
        await self._records.close()
        await self.redis.aclose()

    async def _call(self, op: Awaitable[_T], deadline: float | None = None) -> _T:
        """`op`'s result; Redis' errors become 503 `service_unavailable`. `deadline`: a shorter
        wait than the client's own timeouts (the rate limit's)."""
        try:
            if deadline is None:
                result = await op
            else:
                async with asyncio.timeout(deadline):
                    result = await op
        except _REDIS_ERRORS as exc:
            _redis_up(0)
            raise GatewayError(Code.SERVICE_UNAVAILABLE) from exc
        _redis_up(1)
        return result

    @contextlib.asynccontextmanager
    async def _pipeline(self, transaction: bool = False) -> AsyncIterator[Any]:
        """A pipeline whose Redis errors become 503 `service_unavailable`, its start included
        (a Cluster client learns the slots there and fails there when no node answers)."""
        try:
            async with self.redis.pipeline(transaction=transaction) as pipe:
                yield pipe
        except _REDIS_ERRORS as exc:
            _redis_up(0)
            raise GatewayError(Code.SERVICE_UNAVAILABLE) from exc

    async def ping(self) -> bool:
        try:
            await self._call(self.redis.ping())
        except GatewayError:
            return False
        return True

    async def _mget(self, names: list[str]) -> list[bytes | None]:
        """GET of many keys: one MGET on one server; on a Cluster, where an MGET over several
        slots is refused (CROSSSLOT), one per node, in parallel."""
        if not names:
            return []
        if self.cluster:
            return list(await self.redis.mget_nonatomic(names))
        return list(await self.redis.mget(names))

    # -- reads -------------------------------------------------------------------------------

    async def version(self) -> int:
        version, _pending = await self.version_and_pending()
        return version

    async def version_and_pending(self) -> tuple[int, int]:
        """The version and how many admin writes wait for their follow-ups (`_settle`): one
        round trip to the `{g}` slot, what every node polls 4 times a second."""
        async with self._pipeline(transaction=False) as pipe:
            pipe.get(self.g("version"))
            pipe.scard(self.g("pending"))
            raw, pending = await self._call(pipe.execute())
        return int(raw or 0), int(pending)

    async def get_team(self, team_id: str) -> Team | None:
        raw = await self._call(self.redis.get(self.team_record(team_id)))
        return Team.model_validate_json(raw) if raw else None

    async def list_teams(self) -> list[Team]:
        ids = sorted(_s(i) for i in await self._call(self.redis.smembers(self.g("teams"))))
        raws = await self._call(self._mget([self.team_record(i) for i in ids]))
        return [Team.model_validate_json(r) for r in raws if r]

    async def get_key(self, key_id: str) -> ApiKey | None:
        raw = await self._call(self.redis.get(self.key_record(key_id)))
        return ApiKey.model_validate_json(raw) if raw else None

    async def get_keys(self, key_ids: Iterable[str]) -> dict[str, ApiKey]:
        ids = list(key_ids)
        raws = await self._call(self._mget([self.key_record(i) for i in ids]))
        return {i: ApiKey.model_validate_json(r) for i, r in zip(ids, raws, strict=True) if r}

    async def list_keys(self, team_id: str | None = None) -> list[ApiKey]:
        ids = sorted(_s(i) for i in await self._call(self.redis.smembers(self.g("keys"))))
        keys = (await self.get_keys(ids)).values()
        return [k for k in keys if team_id is None or k.team_id == team_id]

    async def catalog(self) -> dict[str, Price]:
        raw = await self._call(self.redis.hgetall(self.g("catalog")))
        return {_s(m): Price.model_validate_json(p) for m, p in raw.items()}

    async def lookup_digest(self, digest: str) -> tuple[ApiKey | None, int]:
        """The key whose secret hashes to `digest`, and the store's version read before it.

        Two round trips (batched with other handshakes'): the secret's entry and the version,
        then the key's record. The version is read first, so a write that lands after it bumps
        it past what this returns and the handshake's cached secret goes stale."""
        self.lookups += 1
        version_f = self._batch.command("GET", self.g("version"))
        id_f = self._batch.command("GET", self.secret_entry(digest))
        version, key_id = await self._call(asyncio.gather(version_f, id_f))
        if not key_id:
            return None, int(version or 0)
        raw = await self._call(self._batch.command("GET", self.key_record(_s(key_id))))
        return (ApiKey.model_validate_json(raw) if raw else None), int(version or 0)

    # -- writes (admin) ----------------------------------------------------------------------
    #
    # The race: two admins (or two nodes) read a record, change it and write it back; the
    # later write wins and the earlier one is lost (a revocation undone by a rotation that
    # read the key before it). Each write below runs under WATCH on the record it reads, and
    # MULTI/EXEC fails when it changed in between; then it reads again and decides again (a
    # rotation that now sees the revocation refuses). So concurrent writes end as some serial
    # order of those that answered (CONTRACT.md §4).
    #
    # A Cluster refuses a MULTI over several slots, and a record, its secret's entry, the sets
    # of ids and the version live on different ones. So a write is four steps, in this order:
    #   1. SADD `P:{g}:pending` `key:<id>:<nonce>` (or `team:…`, one mark per write): the record
    #      may now change;
    #   2. WATCH/MULTI/EXEC on the record's slot: the record alone (the decision);
    #   3. SET `P:secret:<sha>` → id for the record's secrets (idempotent);
    #   4. MULTI on `{g}`: SADD to `keys`/`teams`, XADD the new digest, SREM the pending entry,
    #      INCR the version (nodes reload, drop cached secrets and sweep live sockets).
    # Failure between steps: the call answers 503 and the pending entry stays. Every node's
    # view polls SCARD `pending` with the version (same slot, same round trip) and while it is
    # non-zero runs `settle_pending`, which redoes 3 and 4 from the record as stored: so a
    # revocation whose version bump was lost still reaches every node within a poll or two of
    # Redis answering again, whichever node (or none) made it. A record in the id set whose
    # record is missing (a create that failed at 2) is skipped by the listings.

    def _bump(self, pipe: Any) -> None:
        self.writes += 1
        pipe.incr(self.g("version"))

    async def _transaction(
        self,
        watched: str,
        pending: str,
        write: Callable[[bytes | None, Any], _T],
        issued: Callable[[_T], str | None] = lambda _result: None,
    ) -> _T:
        """Read `watched` (one record) under WATCH, let `write` queue its commands (or raise
        to refuse) and commit them; read and decide again when the record changed meanwhile.
        Then its follow-ups (`_settle`), logging the digest `issued(result)` names, if any.
        Redis' errors become 503 `service_unavailable`."""

        # One mark per write, not per record: a write to the same record that settles first
        # must not clear the mark of this one (whose follow-ups may yet be cut short).
        pending = f"{pending}:{ids.hex_token(8)}"

        async def attempts() -> _T:
            await self.redis.sadd(self.g("pending"), pending)
            for attempt in range(ADMIN_WRITE_TRIES):
                async with self._pipeline(transaction=True) as pipe:
                    await pipe.watch(watched)
                    current = _b(await pipe.get(watched))
                    pipe.multi()
                    result = write(current, pipe)
                    self.writes += 1  # this node's cached secrets are stale from here on
                    try:
                        await pipe.execute()
                    except WatchError:
                        await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
                        continue
                    await self._settle(pending, issued(result))
                    return result
            raise GatewayError(
                Code.SERVICE_UNAVAILABLE, "Too many concurrent admin writes to one record; retry."
            )

        return await self._call(attempts())

    async def _settle(self, pending: str, digest: str | None) -> None:
        """Steps 3 and 4 of an admin write (above) for one pending record, from the record as
        stored now: idempotent, so any node may run it any number of times. `digest`: a secret
        the write issued, for the digest log."""
        kind, owner, _nonce = pending.split(":", 2)
        key: ApiKey | None = None
        if kind == "key":
            raw = await self.redis.get(self.key_record(owner))
            key = ApiKey.model_validate_json(raw) if raw else None
            if key is not None:
                async with self._pipeline(transaction=False) as pipe:
                    for digest in (key.secret_hash, *(o.hash for o in key.old_secrets)):
                        pipe.set(self.secret_entry(digest), key.id)
                    await pipe.execute()
        async with self._pipeline(transaction=True) as pipe:
            if kind == "key":
                pipe.sadd(self.g("keys"), owner)
                if digest is not None:
                    pipe.xadd(self.g("digests"), {"d": digest})
            elif kind == "team":
                pipe.sadd(self.g("teams"), owner)
            pipe.srem(self.g("pending"), pending)
            self._bump(pipe)
            await pipe.execute()

    async def settle_pending(self) -> None:
        """Finish the admin writes whose follow-ups were cut short (a node died, Redis failed
        between steps); NodeView calls this while `P:{g}:pending` is not empty."""
        for pending in await self._call(self.redis.smembers(self.g("pending"))):
            kind, owner, _nonce = _s(pending).split(":", 2)
            # The write may have issued a secret: log the record's (a digest twice is harmless).
            key = await self.get_key(owner) if kind == "key" else None
            await self._call(self._settle(_s(pending), key.secret_hash if key else None))

    async def update_team(
        self, team_id: str, change: Callable[[Team | None], Team]
    ) -> tuple[Team, Team | None]:
        """Write `change(the team as stored, or None)`, atomically against every other admin
        write; the team written and the one it replaced."""

        def write(current: bytes | None, pipe: Any) -> tuple[Team, Team | None]:
            before = Team.model_validate_json(current) if current else None
            team = change(before)
            pipe.set(self.team_record(team.id), team.model_dump_json())
            return team, before

        return await self._transaction(self.team_record(team_id), f"team:{team_id}", write)

    async def put_team(self, team: Team) -> bool:
        """Create or replace a whole team; True when it was created."""
        _team, before = await self.update_team(team.id, lambda _current: team)
        return before is None

    async def update_key(
        self, key_id: str, change: Callable[[ApiKey | None], ApiKey]
    ) -> tuple[ApiKey, ApiKey | None]:
        """Write `change(the key as stored, or None)`, atomically against every other admin
        write; the key written and the one it replaced. A new secret is indexed."""

        def write(current: bytes | None, pipe: Any) -> tuple[ApiKey, ApiKey | None]:
            before = ApiKey.model_validate_json(current) if current else None
            key = change(before)
            pipe.set(self.key_record(key.id), key.model_dump_json())
            return key, before

        def issued(result: tuple[ApiKey, ApiKey | None]) -> str | None:
            key, before = result
            return None if before and before.secret_hash == key.secret_hash else key.secret_hash

        return await self._transaction(self.key_record(key_id), f"key:{key_id}", write, issued)

    async def put_key(self, key: ApiKey) -> None:
        """Write a whole key record (its secret indexed)."""
        await self.update_key(key.id, lambda _current: key)

    async def create_key(
        self, team_id: str, name: str = "", expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        """A new key of an existing team (404 `not_found`, `param: team_id`, otherwise).

        The team is read, not watched (it is on another slot): teams are never deleted, so a
        team seen to exist still does when the key is written."""
        if await self.get_team(team_id) is None:
            raise not_found("team", team_id, "team_id")
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
        await self.put_key(key)
        return key, secret

    async def rotate_key(self, key_id: str, grace_seconds: int) -> tuple[ApiKey, ApiKey, str]:
        """A new secret for the key; the current one keeps working for `grace_seconds`. The
        rotated key, the key before, and the new secret. A revoked key is refused (400)."""
        secret, prefix = new_secret()

        def change(key: ApiKey | None) -> ApiKey:
            if key is None:
                raise not_found("key", key_id)
            if key.revoked_at is not None:
                raise GatewayError(
                    Code.INVALID_REQUEST, f"Key {key_id!r} is revoked; create a new one."
                )
            now = utcnow()
            old = [o for o in key.old_secrets if o.until > now]
            old.append(
                OldSecret(hash=key.secret_hash, until=now + timedelta(seconds=grace_seconds))
            )
            update = {"secret_hash": hash_secret(secret), "prefix": prefix, "old_secrets": old}
            return key.model_copy(update=update)

        rotated, before = await self.update_key(key_id, change)
        assert before is not None
        return rotated, before, secret

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Refuse every secret of the key from now on (a revoked key stays revoked)."""

        def change(key: ApiKey | None) -> ApiKey:
            if key is None:
                raise not_found("key", key_id)
            return key.model_copy(update={"revoked_at": key.revoked_at or utcnow()})

        revoked, _before = await self.update_key(key_id, change)
        return revoked

    # Prices: one command each (HSET, HDEL) in MULTI with the version bump, so each is atomic
    # as it stands: no read decides what they write.
    async def set_price(self, model: str, price: Price) -> None:
        async with self._pipeline(transaction=True) as pipe:
            pipe.hset(self.g("catalog"), model, price.model_dump_json())
            self._bump(pipe)
            await self._call(pipe.execute())

    async def delete_price(self, model: str) -> bool:
        async with self._pipeline(transaction=True) as pipe:
            pipe.hdel(self.g("catalog"), model)
            self._bump(pipe)
            removed, _ = await self._call(pipe.execute())
        return bool(removed)

    # -- the secrets' digests (the failed-authentication limit's filter) ----------------------

    async def backfill_digests(self) -> None:
        """Once per store: log the digests of the keys written before the log existed, then
        mark the log complete. Idempotent and safe from two nodes at once (a digest logged
        twice is the same digest)."""
        if await self._call(self.redis.exists(self.g("digests:complete"))):
            return
        for key in await self.list_keys():
            async with self._pipeline(transaction=False) as pipe:
                for digest in (key.secret_hash, *(o.hash for o in key.old_secrets)):
                    pipe.xadd(self.g("digests"), {"d": digest})
                await self._call(pipe.execute())
        await self._call(self.redis.set(self.g("digests:complete"), 1))

    async def digests_after(self, last_id: str) -> tuple[bool, list[str], str]:
        """Whether the digest log is complete, and the digests logged after `last_id` with the
        id of the last one (up to DIGEST_PAGE; ask again while a full page comes back)."""
        async with self._pipeline(transaction=False) as pipe:
            pipe.exists(self.g("digests:complete"))
            pipe.xrange(self.g("digests"), min=f"({last_id}", count=DIGEST_PAGE)
            complete, entries = await self._call(pipe.execute(), HANDSHAKE_DEADLINE_SECONDS)
        digests = [_s(fields[b"d"]) for _id, fields in entries if b"d" in fields]
        if entries:
            last_id = _s(entries[-1][0])
        return bool(complete), digests, last_id

    # -- the layout before hash tags ---------------------------------------------------------

    async def migrate_layout(self) -> int:
        """Once per store: copy teams, keys and prices from the names used before hash tags
        (`P:team:<id>`, `P:teams`, `P:key:<id>`, `P:keys`, `P:catalog`, `P:version`) to the
        current ones, then mark `P:{g}:layout`. Returns the records copied.

        Nothing is overwritten (SETNX, HSETNX: a write made since under the new names wins) and
        the old names stay (a rollback still finds them), so it is idempotent and safe from two
        nodes at once. Secrets' entries keep their names. The digest log starts again from the
        keys (`backfill_digests`, as `P:{g}:digests:complete` is not set). Slots, rate windows
        and session records are not copied: they lapse within a minute, and until then the
        sockets open before the upgrade do not count against the caps. Every node runs it at
        start (NodeView.start); a single server and a Cluster alike (old names are single-key
        reads)."""
        if await self._call(self.redis.exists(self.g("layout"))):
            return 0
        copied = 0
        for old_set, new_set, record in (
            ("teams", "teams", self.team_record),
            ("keys", "keys", self.key_record),
        ):
            kind = old_set[:-1]
            for raw_id in await self._call(self.redis.smembers(self.k(old_set))):
                owner = _s(raw_id)
                raw = await self._call(self.redis.get(self.k(kind, owner)))
                if raw is None:
                    continue
                copied += int(bool(await self._call(self.redis.setnx(record(owner), raw))))
                await self._call(self.redis.sadd(self.g(new_set), owner))
        for model, price in (await self._call(self.redis.hgetall(self.k("catalog")))).items():
            copied += int(await self._call(self.redis.hsetnx(self.g("catalog"), model, price)))
        old_version = int(await self._call(self.redis.get(self.k("version"))) or 0)
        async with self._pipeline(transaction=True) as pipe:
            pipe.incrby(self.g("version"), old_version + 1)  # past anything a node has seen
            pipe.set(self.g("layout"), 2)
            await self._call(pipe.execute())
        return copied

    # -- limits ------------------------------------------------------------------------------

    async def acquire_socket(
        self,
        principal: Principal,
        socket_id: str,
        key_cap: int,
        team_cap: int,
        info: dict[str, Any],
    ) -> tuple[bool, int]:
        """Take the socket's slots (when capped) and register its session record: one round
        trip, the handshake's only one when its secret is cached (NodeView.lookup_secret).
        Also the store's version, for the handshake to check that nothing moved since.

        The key's slot and the team's slot are two scripts on their own hash slots (`_TAKE_SLOT`)
        sent in one batch with the record; when either refuses, the socket is released at once
        (the compensation, awaited, so a retry or a next handshake sees the sets as they were).
        A refused socket's record exists for that round trip only."""
        taken, version = await self._acquire(principal, socket_id, key_cap, team_cap, info)
        if not taken and self._releases:
            # Slots this node has not given back yet may be what is in the way.
            await self.flush_releases()
            taken, version = await self._acquire(principal, socket_id, key_cap, team_cap, info)
        return taken, version

    async def _acquire(
        self,
        principal: Principal,
        socket_id: str,
        key_cap: int,
        team_cap: int,
        info: dict[str, Any],
    ) -> tuple[bool, int]:
        now = int(time.time() * 1000)
        deadline = now + LEASE_MS
        calls = [
            self._batch.command("GET", self.g("version")),
            self._batch.command("ZADD", self.sessions_index(), deadline, socket_id),
            self._batch.command(
                "SET", self.session_record(socket_id), orjson.dumps(info), "PX", LEASE_MS
            ),
        ]
        if key_cap > 0 or team_cap > 0:
            for slots, cap in (
                (self.key_slots(principal.key_id), key_cap),
                (self.team_slots(principal.team_id), team_cap),
            ):
                calls.append(
                    self._batch.call(self._take_slot, [slots], [now, deadline, socket_id, cap])
                )
        version, _added, _set, *takes = await self._call(asyncio.gather(*calls))
        if all(takes):
            return True, int(version or 0)
        # Compensation: give back the slot that was taken (and the record), as one release.
        releases = self._release_commands([(principal.key_id, principal.team_id, socket_id)])
        await self._call(asyncio.gather(*releases))
        return False, int(version or 0)

    async def allow_response(self, key_id: str, limit: int) -> bool:
        """Sliding-window rate limit; fails open while Redis is away (CONTRACT.md §4).

        A turn asks Redis unless this node holds a spare slot of the key's window (`_RATE`):
        a busy key's turns then cost one round trip per few dozen, not one each, and wait for
        none. Spares are taken only while the window is under half the limit, so near the limit
        every turn is decided by Redis, as every node sees the window.
        """
        if limit <= 0:
            return True
        now = time.monotonic()
        spares = self._spares.get(key_id)
        if spares is not None:
            if spares.members and now - spares.taken_at < RATE_SPARE_SECONDS:
                spares.members.pop()
                return True
            del self._spares[key_id]
        member = ids.hex_token(8)
        # Spares only for a key that asked within RATE_SPARE_SECONDS: a key with fewer turns than
        # that on this node would give every spare back unused (32 ZADDs and a ZREM a turn).
        asked = self._asked.get(key_id)
        self._asked[key_id] = now
        if len(self._asked) > ASKED_MAX:
            self._asked = {k: t for k, t in self._asked.items() if now - t < RATE_SPARE_SECONDS}
        busy = asked is not None and now - asked < RATE_SPARE_SECONDS
        args: list[str | int] = [
            int(time.time() * 1000),
            limit,
            member,
            min(limit // 20, RATE_SPARES) if busy else 0,
            int(limit * RATE_SPARE_FILL),
            *(spares.members if spares is not None else ()),
        ]
        try:
            # A hung Redis must not stall a customer's turn for the pool's retries (~6 s).
            ok, taken = await self._call(
                self._batch.call(
                    self._rate, [self.rate_window(key_id)], args, RATE_LIMIT_DEADLINE_SECONDS
                )
            )
        except GatewayError:
            return True
        if taken:
            members = [f"{member}:{i}" for i in range(1, int(taken) + 1)]
            self._spares[key_id] = _Spares(members, now)
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep(), name="rate-spares")
        return bool(ok)

    async def judge_spend(
        self,
        key_id: str,
        team_id: str,
        *,
        responses: int,
        tokens: int,
        key_day_cap: int,
        team_day_cap: int,
        team_month_cap: int,
        day: str,
        month: str,
    ) -> Judged:
        """Check 8 with token or spend limits, in one round trip: on one server `_JUDGE_ALL`; on a
        Cluster the key's script and a read of the team's spend, each to its slot's node, in
        parallel (and the caller takes the turn back out of the window when the team's spend
        refuses it: `Judged.member`). Raises `GatewayError(service_unavailable)` when Redis does
        not answer within RATE_LIMIT_DEADLINE_SECONDS: the caller fails open."""
        now_ms = int(time.time() * 1000)
        if not self.cluster:
            script = self._judge_all
            packed = self.pack_judgment(
                key_id,
                team_id,
                (responses, tokens, key_day_cap, team_day_cap, team_month_cap),
                day,
                month,
                now_ms,
                ids.hex_token_bytes(8),  # the turn's member in the window (ZADD)
            )
            # `_call`, inlined: a coroutine less on every limited turn (the batch's future
            # has the deadline already).
            try:
                result = await self._batch.call_packed(
                    script, Packed(packed), RATE_LIMIT_DEADLINE_SECONDS
                )
            except _REDIS_ERRORS as exc:
                _redis_up(0)
                raise GatewayError(Code.SERVICE_UNAVAILABLE) from exc
            _redis_up(1)
            raw_day, raw_month = int(result[2]), int(result[3])
            return Judged(
                int(result[0]),
                int(result[1]),
                None if raw_day < 0 else raw_day,
                None if raw_month < 0 else raw_month,
            )
        member = ids.hex_token(8)
        team = bool(team_day_cap or team_month_cap)
        key_names = [self.rate_window(key_id), self.token_window(key_id)]
        key_names.append(self.key_spend(key_id, day))
        team_names = [self.team_spend(team_id, day), self.team_spend(team_id, month)]
        args = [now_ms, responses, member, tokens, key_day_cap]
        calls: list[asyncio.Future[Any]] = [
            self._batch.call(self._judge_all, key_names, [*args, 0, 0])
        ]
        if team:
            calls.append(self._batch.command("MGET", *team_names))
        results = await self._call(asyncio.gather(*calls), RATE_LIMIT_DEADLINE_SECONDS)
        code, figure = (int(v) for v in results[0][:2])
        team_day = team_month = None
        if team:
            team_day, team_month = (None if v is None else int(v) for v in results[1])
        return Judged(code, figure, team_day, team_month, member if responses else None)

    def pack_judgment(
        self,
        key_id: str,
        team_id: str,
        limits: tuple[int, int, int, int, int],
        day: str,
        month: str,
        now_ms: int,
        member: bytes,
    ) -> bytes:
        """`_JUDGE_ALL`'s `EVALSHA` on one server, as RESP: `limits` are responses, tokens and the
        key's day, team's day and team's month caps (nano-USD); `member` 16 hex digits. Only the
        time and the member change from turn to turn (ARGV[1] and ARGV[3]): the rest is packed
        by hiredis once per key, team, periods and limits, kept, and joined around them."""
        sha = self._judge_all.sha
        shape = (key_id, team_id, day, month)
        parts = self._judgments.get(shape)
        if parts is None or parts[0] != limits or parts[1] != sha:
            names = (
                self.rate_window(key_id),
                self.token_window(key_id),
                self.key_spend(key_id, day),
                self.team_spend(team_id, day),
                self.team_spend(team_id, month),
            )
            head = ("EVALSHA", sha, len(names), *names)
            start = b"*%d\r\n%b" % (len(head) + 7, _items(head))  # and ARGV's 7
            responses, tokens, *caps = limits
            parts = (limits, sha, start, _items((responses,)), _items((tokens, *caps)))
            if len(self._judgments) >= JUDGMENTS_KEPT:
                self._judgments.clear()
            self._judgments[shape] = parts
        now = b"%d" % now_ms
        return b"%b$%d\r\n%b\r\n%b$%d\r\n%b\r\n%b" % (
            parts[2],
            len(now),
            now,
            parts[3],
            len(member),
            member,
            parts[4],
        )

    def pack_add(
        self,
        key_id: str,
        team_id: str,
        day: str,
        month: str,
        nano: int,
        tokens: int,
        second: int,
    ) -> bytes:
        """`_ADD`'s `EVALSHA` for one entry on one server, as RESP: the key's day, the team's day
        and month counters (and the key's token window when `tokens`), then ARGV. The part
        before ARGV is packed once per key, team, periods and token flag, and kept, as
        `pack_judgment` keeps its own."""
        sha = self._add.sha
        shape = (key_id, team_id, day, month, tokens > 0)
        parts = self._adds.get(shape)
        if parts is None or parts[0] != sha:
            names = [
                self.key_spend(key_id, day),
                self.team_spend(team_id, day),
                self.team_spend(team_id, month),
            ]
            if tokens:
                names.append(self.token_window(key_id))
            head = ("EVALSHA", sha, len(names), *names)
            parts = (sha, b"*%d\r\n%b" % (len(head) + 3, _items(head)))  # and ARGV's 3
            if len(self._adds) >= JUDGMENTS_KEPT:
                self._adds.clear()
            self._adds[shape] = parts
        return parts[1] + _items((nano, tokens, second))

    def unjudge(self, key_id: str, member: str) -> None:
        """Take back a turn counted in the key's window that the team's spend then refused."""
        future = self._batch.command("ZREM", self.rate_window(key_id), member)
        future.add_done_callback(_ignore)

    async def add_spend(self, counts: list[tuple[str, str, str, str, int, int]]) -> None:
        """`queue_spend`, awaited (Redis away: `GatewayError`)."""
        await self._call(self.queue_spend(counts))

    def queue_spend(self, counts: list[tuple[str, str, str, str, int, int]]) -> asyncio.Future[Any]:
        """Finished responses' costs and tokens (key id, team id, day, month, nano-USD, tokens:
        one entry per key and period) into the counters that exist, batched: one `_ADD` an
        entry on one server; on a Cluster one per key and one per team and period. Queued now,
        so in front of any call made after it (a judgment that should see them); the future
        fails with what the batch raised."""
        second = int(time.time())
        calls = []
        if not self.cluster:
            for key_id, team_id, day, month, nano, tokens in counts:
                packed = self.pack_add(key_id, team_id, day, month, nano, tokens, second)
                calls.append(self._batch.call_packed(self._add, Packed(packed)))
            # One entry (the norm: a node's next judgment takes its last count along): its
            # future as it is, not a gathering of one.
            return calls[0] if len(calls) == 1 else asyncio.gather(*calls)
        teams: dict[tuple[str, str, str], int] = {}
        for key_id, team_id, day, month, nano, tokens in counts:
            names = [self.key_spend(key_id, day)]  # the team's counters: another slot
            if nano:
                teams[(team_id, day, month)] = teams.get((team_id, day, month), 0) + nano
            if tokens:
                names.append(self.token_window(key_id))
            calls.append(self._batch.call(self._add, names, [nano, tokens, second]))
        calls += [
            self._batch.call(
                self._add,
                [self.team_spend(team_id, day), self.team_spend(team_id, month)],
                [nano, 0, second],
            )
            for (team_id, day, month), nano in teams.items()
        ]
        return asyncio.gather(*calls)

    async def read_counters(self, names: list[str]) -> list[int | None]:
        raws = await self._call(self._mget(names))
        return [None if raw is None else int(raw) for raw in raws]

    async def drop_counters(self, names: list[str]) -> None:
        """Spend counters deleted, one command each (a Cluster's slots differ), batched."""
        await self._call(asyncio.gather(*(self._batch.command("DEL", n) for n in names)))

    async def seed_counters(self, seeds: list[tuple[str, int, int]]) -> None:
        """Counters rebuilt from the ledger: (name, value, expiry in epoch ms), each set only if
        it is still missing (another node's rebuild, or an increment, may have come first)."""
        async with self._pipeline(transaction=False) as pipe:
            for name, value, expire_at_ms in seeds:
                pipe.set(name, value, nx=True, pxat=expire_at_ms)
            await self._call(pipe.execute())

    async def _sweep(self) -> None:
        """Give back spares unused for RATE_SPARE_SECONDS (they would count against their key
        for a minute), while any are held."""
        try:
            while self._spares:
                await asyncio.sleep(RATE_SPARE_SECONDS)
                now = time.monotonic()
                old = [k for k, s in self._spares.items() if now - s.taken_at >= RATE_SPARE_SECONDS]
                with contextlib.suppress(GatewayError):
                    await self._give_back(old)
        finally:
            self._sweeper = None

    async def _give_back(self, key_ids: list[str]) -> None:
        returned = [(k, self._spares.pop(k)) for k in key_ids if k in self._spares]
        returned = [(k, s) for k, s in returned if s.members]
        if not returned:
            return
        async with self._pipeline(transaction=False) as pipe:
            for key_id, spares in returned:
                pipe.zrem(self.rate_window(key_id), *spares.members)
            await self._call(pipe.execute(), RATE_LIMIT_DEADLINE_SECONDS * 4)

    async def refresh_leases(self, sessions: list[tuple[Principal, str, dict[str, Any]]]) -> None:
        """Renew this node's slots and session records (every LEASE_REFRESH_SECONDS).

        Every write is XX (only what still exists): a socket that closed while the renewal
        was on its way has been released (`flush_releases`, maybe first), and a plain write would
        bring its slots or its listing back for a whole lease."""
        if not sessions:
            return
        deadline = int(time.time() * 1000) + LEASE_MS
        async with self._pipeline(transaction=False) as pipe:
            for principal, socket_id, info in sessions:
                pipe.zadd(self.key_slots(principal.key_id), {socket_id: deadline}, xx=True)
                pipe.zadd(self.team_slots(principal.team_id), {socket_id: deadline}, xx=True)
                pipe.zadd(self.sessions_index(), {socket_id: deadline}, xx=True)
                pipe.set(self.session_record(socket_id), orjson.dumps(info), px=LEASE_MS, xx=True)
            await self._call(pipe.execute())

    async def release_socket(self, principal: Principal, socket_id: str) -> None:
        """Give back a closed socket's slots and session record, within RELEASE_BATCH_SECONDS
        and with the other sockets closed meanwhile: one call for a burst of closes."""
        self._releases.append((principal.key_id, principal.team_id, socket_id))
        self._infos.pop(socket_id, None)
        if self._releaser is None:
            self._releaser = asyncio.create_task(self._release_later(), name="slot-release")

    async def _release_later(self) -> None:
        try:
            await asyncio.sleep(RELEASE_BATCH_SECONDS)
        finally:
            self._releaser = None
        with contextlib.suppress(GatewayError):
            await self.flush_releases()  # Redis away: the slots' leases lapse within a minute

    async def flush_releases(self) -> None:
        batch, self._releases = self._releases, []
        if not batch:
            return
        await self._call(asyncio.gather(*self._release_commands(batch)))

    def _release_commands(self, batch: list[tuple[str, str, str]]) -> list[asyncio.Future[Any]]:
        """Sockets' slots, index entries and records removed, one command per key (ZREM and DEL
        of a member or key that is gone are no-ops, so a release may run twice), batched."""
        by_key: dict[str, list[str]] = {}
        by_team: dict[str, list[str]] = {}
        for key_id, team_id, socket_id in batch:
            by_key.setdefault(key_id, []).append(socket_id)
            by_team.setdefault(team_id, []).append(socket_id)
        calls = [self._batch.command("ZREM", self.sessions_index(), *(s for *_, s in batch))]
        calls += [self._batch.command("ZREM", self.key_slots(k), *s) for k, s in by_key.items()]
        calls += [self._batch.command("ZREM", self.team_slots(t), *s) for t, s in by_team.items()]
        calls += [self._batch.command("DEL", self.session_record(s)) for *_, s in batch]
        return calls

    def update_session(self, socket_id: str, info: Callable[[], dict[str, Any]]) -> None:
        """Rewrite a live socket's session record (a turn ended), within
        SESSION_INFO_BATCH_SECONDS and together with the others changed meanwhile. `info` is
        called then, once, however many turns ended meanwhile."""
        self._infos[socket_id] = info
        if self._info_writer is None:
            self._info_writer = asyncio.create_task(self._write_infos_later(), name="session-infos")

    async def _write_infos_later(self) -> None:
        try:
            await asyncio.sleep(SESSION_INFO_BATCH_SECONDS)
        finally:
            self._info_writer = None
        with contextlib.suppress(GatewayError):
            await self.flush_session_infos()  # Redis away: the next lease renewal carries them

    async def flush_session_infos(self) -> None:
        batch, self._infos = self._infos, {}
        if not batch:
            return
        # XX, the race with a socket's end: its release (flush_releases, on another connection) may
        # reach Redis before this write. A plain SET would then bring the deleted record back
        # for a whole lease; with XX the write lands only on a record that still exists, and a
        # release that comes after it deletes it as usual. (A socket that closed before this
        # flush was already dropped from the batch by release_socket.)
        records = list(batch.items())
        for start in range(0, len(records), SESSION_INFO_CHUNK):  # never one huge pipeline
            writes = [
                self._records.command(
                    "SET",
                    self.session_record(socket_id),
                    orjson.dumps(info()),
                    "PX",
                    LEASE_MS,
                    "XX",
                )
                for socket_id, info in records[start : start + SESSION_INFO_CHUNK]
            ]
            await self._call(asyncio.gather(*writes))

    async def list_sessions(self) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        await self._call(self.redis.zremrangebyscore(self.sessions_index(), "-inf", now))
        ids = await self._call(self.redis.zrange(self.sessions_index(), 0, -1))
        names = [self.session_record(_s(i)) for i in ids if isinstance(i, bytes | str)]
        raws = await self._call(self._mget(names))
        return [orjson.loads(r) for r in raws if r]


class Judged(NamedTuple):
    """What `judge_spend` read. `code`: 0 accepted, 1 responses per minute, 2 tokens per minute,
    3 key's spend today, 4 key's spend counter missing, and from one server's single script 5 a
    team's counter missing, 6 the team's spend over a cap; `figure`: tokens of the last minute
    (2) or the key's spend today in nano-USD (0, 3); the team's spend (nano-USD) today and this
    month, None when the counter is missing (or not asked for); the member the turn took in the
    response window (to give back if the team refuses it)."""

    code: int
    figure: int
    team_day: int | None
    team_month: int | None
    member: str | None = None


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # read, so a failed fire-and-forget call logs nothing


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _b(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
