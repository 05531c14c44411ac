"""How the key store's Redis client is made: one server from REDIS_URL, or the primary of a
Sentinel-managed group (CONTRACT.md §1, §4).

Both clients behave alike for the key store:

- a blocking pool: a burst of handshakes waits up to `timeout` for a connection instead of
  failing with "Too many connections";
- `timeout` as the socket's read and connect timeout (a hung Redis costs one timeout, not
  several: redis-py's `Retry` would retry its own TimeoutError, so only connection errors are
  retried, twice, with backoff);
- with Sentinels, redis-py's own `Sentinel.master_for` pool (`SentinelConnectionPool`): each new
  connection asks the Sentinels for the primary, so after a failover the next connections go to
  the promoted replica; a connection still on a demoted primary that answers READONLY is
  dropped by redis-py (`SentinelManagedConnection.read_response`) and the call retried on a
  fresh one. Nothing here stands in for Sentinel.

With Sentinels, REDIS_URL gives only the password (and user), the db number, TLS (`rediss://`
and its `ssl_*` options) and other connection options; its host and port are not used. The
Sentinels are asked over TLS too when the URL is `rediss://` (same CA options), without the
password: Sentinel's own AUTH is a separate setting this gateway does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# No PING before a command on a connection idle for a while: the pool already reads a connection
# it hands out for EOF (`ensure_connection`) and reconnects, and both the key store's batches and
# redis-py's retry send again once on a dropped connection. The check cost a `getpid(2)` per
# reply read (redis-py takes the loop's time after each one; `asyncio.get_running_loop()` calls
# getpid on Python 3.11): every turn judged by check 8 read one.
HEALTH_CHECK_SECONDS = 0


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (IPv6 as `[addr]:port`); empty: no Sentinels. ValueError with a
    one-line reason otherwise."""
    found: list[tuple[str, int]] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.startswith("["):  # [IPv6]:port
            host, _, rest = entry[1:].partition("]")
            sep, port = rest[:1], rest[1:]
        else:
            host, sep, port = entry.partition(":")
        if sep != ":" or not host:
            raise ValueError(f"expected host:port, got {entry!r}")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{entry!r}: the port must be 1-65535")
        found.append((host, int(port)))
    if text.strip() and not found:
        raise ValueError("expected comma-separated host:port entries")
    return found


def _retry() -> Retry:
    # Only refused or reset connections: redis-py retries its TimeoutError by default.
    return Retry(
        ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(RedisConnectionError,)
    )


class _SentinelBlockingPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool (the primary's address from the Sentinels, re-asked after a
    failover) with the blocking pool's `get_connection` and `release` (wait for a free
    connection up to `timeout`). The MRO puts `SentinelConnectionPool`'s address logic over
    `BlockingConnectionPool`, which only overrides checkout and release."""


def make_redis(
    url: str,
    *,
    pool_size: int,
    timeout: float,
    cluster: bool = False,
    sentinels: Sequence[tuple[str, int]] = (),
    sentinel_master: str = "mymaster",
) -> Any:
    """The client the key store uses: to `url`'s server, to a Redis Cluster that `url` is one
    seed node of (`cluster`), or (`sentinels` given) to the primary the Sentinels name for
    `sentinel_master`."""
    if cluster:
        return _cluster_client(url, pool_size, timeout)
    common: dict[str, Any] = {
        "max_connections": pool_size,
        "timeout": timeout,  # waiting for a free connection of the pool
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(),
        "retry_on_timeout": False,
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }
    if not sentinels:
        pool = aioredis.BlockingConnectionPool.from_url(url, **common)
        return aioredis.Redis(connection_pool=pool)
    options: dict[str, Any] = dict(parse_url(url))
    tls = options.pop("connection_class", None) is SSLConnection
    for name in ("host", "port", "path"):
        options.pop(name, None)
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs=_sentinel_kwargs(options, tls, timeout),
    )
    client: aioredis.Redis = sentinel.master_for(
        sentinel_master,
        connection_pool_class=_SentinelBlockingPool,
        connection_class=SentinelManagedSSLConnection if tls else SentinelManagedConnection,
        **options,
        **common,
    )
    return client


def _sentinel_kwargs(options: dict[str, Any], tls: bool, timeout: float) -> dict[str, Any]:
    """How the Sentinels themselves are asked: the same timeouts, TLS as the URL says, no
    retry (discovery moves on to the next Sentinel itself)."""
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(ExponentialBackoff(), 0),
    }
    if tls:
        accepted = inspect.signature(aioredis.Redis.__init__).parameters
        kwargs["ssl"] = True
        kwargs.update({k: v for k, v in options.items() if k.startswith("ssl_") and k in accepted})
    return kwargs


def _cluster_client(url: str, pool_size: int, timeout: float) -> Any:
    """redis-py's Cluster client from one seed node's URL: it learns the slots' owners from the
    seed and learns them again on MOVED (a failover, a resharding). The same deadlines as the
    single server's pool."""
    from redis.asyncio.cluster import RedisCluster

    # A primary SIGKILLed: until its replica is promoted (cluster-node-timeout and an election,
    # about two seconds with a 1 s node timeout) the surviving nodes still name it as the
    # slots' owner, so every retry in that window fails the same way. A call retries 3 times
    # (0.1 + 0.2 + 0.25 s of backoff), each retry after a refresh of the slot map when one is
    # due: a handshake gets its 503 in well under a second instead of waiting out the failover
    # (6 retries with a 0.5 s cap held handshakes 3.3 s, tests/test_redis_cluster_failover.py),
    # and the first refresh after the promotion (redis-py runs at most one a second,
    # `topology_refresh_min_interval`) sends the next calls to the promoted replica.
    return RedisCluster.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 3),
        max_connections=pool_size,
    )
