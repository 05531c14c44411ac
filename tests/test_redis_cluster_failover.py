"""A Redis Cluster primary SIGKILLed under load (CONTRACT.md §4).

The Cluster twin of tests/test_redis_sentinel.py `test_primary_killed_under_load`. The test
starts its own six-node Cluster (tests/services.py `RedisCluster`, cluster-node-timeout 1 s for a
quick failover), so killing one of its primaries leaves the session's cluster alone and the test
runs in the plain `make test`. Two gateway nodes with GATEWAY_REDIS_CLUSTER, REDIS_URL a node
that is a replica at the start (a seed that lives on), 100 sockets streaming and 20 handshakes
a second; then the primary owning the streaming key's hash slot is SIGKILLed. Its replica is
promoted after about two seconds; until then calls to that shard fail and the gateway answers
503.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.exceptions as rex
from conftest import Gateway, eventually, make_tenant
from services import RedisCluster, RedisClusterNode, redis_command, tail
from test_admin_live import expelled, socket
from test_redis_sentinel import (
    GIVE_UP_SECONDS,
    STREAMS,
    Failover,
    Handshakes,
    admin_until_served,
    no_tracebacks,
    report_failover,
    settle,
    status_of,
    stream_one,
)
from test_ws_checks import assert_usable

from app.errors import Code, GatewayError
from app.keystore import KeyStore
from app.models import Limits

NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a silent primary is failed over after ~2 s
HANDSHAKE_CEILING = 3.0  # no handshake hangs longer during the failover


@dataclass
class ClusterNode:
    """One line of CLUSTER NODES."""

    id: str
    port: int
    flags: set[str]
    master_id: str
    slots: list[tuple[int, int]]


def cluster_nodes(port: int) -> list[ClusterNode]:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "nodes"],
        capture_output=True, timeout=5, check=True, text=True,
    ).stdout  # fmt: skip
    nodes = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split("@")[0]
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):
                continue  # a slot being migrated
            low, _, high = spec.partition("-")
            slots.append((int(low), int(high or low)))
        nodes.append(
            ClusterNode(
                fields[0],
                int(address.rsplit(":", 1)[1]),
                set(fields[2].split(",")),
                fields[3],
                slots,
            )
        )
    return nodes


def owner_of(slot: int, nodes: list[ClusterNode]) -> ClusterNode:
    return next(
        n for n in nodes if "master" in n.flags and any(lo <= slot <= hi for lo, hi in n.slots)
    )


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(node_timeout_ms=NODE_TIMEOUT_MS).start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def seed(failover_cluster: RedisCluster) -> RedisClusterNode:
    """REDIS_URL's node: a replica at the start, so never the primary the test kills. A busy
    host can run the test before the first node's `CLUSTER NODES` shows the replicas' roles
    (they spread by gossip): it is asked again until it does."""
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while True:
        nodes = cluster_nodes(failover_cluster.nodes[0].port)
        replicas = {n.port for n in nodes if "slave" in n.flags}
        found = next((n for n in failover_cluster.nodes if n.port in replicas), None)
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no replica in CLUSTER NODES after {GIVE_UP_SECONDS} s: {nodes}")
        time.sleep(0.1)


@pytest.fixture
def redis_url(seed: RedisClusterNode) -> str:
    return seed.url


@pytest.fixture
def redis_prefix() -> str:
    from services import fresh_redis_prefix

    return fresh_redis_prefix()  # the cluster goes with the module: nothing to delete


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"GATEWAY_NODE_ID": "node-a", "GATEWAY_REDIS_CLUSTER": True}


def key_slot(seed: RedisClusterNode, store: KeyStore, key_id: str) -> int:
    return int(
        redis_command("127.0.0.1", seed.port, "CLUSTER", "KEYSLOT", store.key_record(key_id))
    )


async def key_on_shard(
    store: KeyStore, seed: RedisClusterNode, team_id: str, shard: ClusterNode, limits: Limits
) -> tuple[str, str]:
    """The id and secret of a key of a new team whose record lives in `shard`'s slots (ids
    are random: a third of them land there)."""
    tenant = await make_tenant(store, team_id, limits=limits)
    key_id, secret = tenant.key_id, tenant.key
    for _ in range(50):
        slot = await asyncio.to_thread(key_slot, seed, store, key_id)
        if any(lo <= slot <= hi for lo, hi in shard.slots):
            return key_id, secret
        key, secret = await store.create_key(team_id, name="test")
        key_id = key.id
    raise AssertionError("no key id in the shard after 50 tries")


async def wait_promotion(seed: RedisClusterNode, old: ClusterNode, cluster: RedisCluster) -> float:
    """Until a surviving node sees the killed primary's replica as a master. If none does, the
    failure shows the replicas' own logs: they say why no election was won."""
    deadline = time.monotonic() + GIVE_UP_SECONDS
    while time.monotonic() < deadline:
        nodes = await asyncio.to_thread(cluster_nodes, seed.port)
        if any(n.master_id == old.id and "master" in n.flags for n in nodes) or any(
            "master" in n.flags and n.slots == old.slots and n.id != old.id for n in nodes
        ):
            return time.monotonic()
        await asyncio.sleep(0.05)
    replicas = {n.port for n in nodes if n.master_id == old.id}
    logs = "".join(
        f"\n--- :{node.port}\n{tail(node.log_path, 30)}"
        for node in cluster.nodes
        if node.port in replicas
    )
    raise AssertionError(
        f"no replica of :{old.port} promoted after {GIVE_UP_SECONDS:g} s: {nodes}{logs}"
    )


async def test_cluster_primary_killed_under_load(
    gateway: Gateway,
    node_b: Gateway,
    seed: RedisClusterNode,
    failover_cluster: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    store = gateway.store
    # A socket cap makes every handshake of the key take a slot in its hash slot's shard.
    many = Limits(sockets_per_key=1000, sockets_per_team=1000)
    tenant = await make_tenant(store, "acme", limits=many)
    slot = await asyncio.to_thread(key_slot, seed, store, tenant.key_id)
    old = owner_of(slot, await asyncio.to_thread(cluster_nodes, seed.port))
    assert old.port != seed.port
    # Keys on the same shard: one to revoke after the promotion, one with a cap of one socket.
    victim_id, victim = await key_on_shard(store, seed, "victim", old, Limits())
    capped_id, capped = await key_on_shard(store, seed, "capped", old, Limits(sockets_per_key=1))
    async with AsyncExitStack() as stack:
        idle = [await stack.enter_async_context(socket(gw, victim)) for gw in (gateway, node_b)]
        for ws in idle:
            await assert_usable(ws)
        ready, started = asyncio.Event(), list[int]()
        streams = [
            asyncio.create_task(
                stream_one(stack, (gateway, node_b)[i % 2], tenant.key, ready, started)
            )
            for i in range(STREAMS)
        ]
        stack.push_async_callback(settle, streams)
        await asyncio.wait_for(ready.wait(), 15)
        steady = await stack.enter_async_context(Handshakes([gateway, node_b], tenant.key, 20))
        await asyncio.sleep(0.5)
        acked = await asyncio.to_thread(
            redis_command, "127.0.0.1", old.port, "WAIT", "1", "1000", timeout=3.0
        )
        assert acked == 1, "the replica is not in sync: it would never be promoted"
        t0 = time.monotonic()
        await asyncio.to_thread(next(n for n in failover_cluster.nodes if n.port == old.port).kill)
        promoted = await wait_promotion(seed, old, failover_cluster)
        body = await admin_until_served(gateway, "POST", f"/keys/{victim_id}/revoke")
        revoked = time.monotonic()
        assert body["id"] == victim_id
        late = [
            x
            for x, _ in await asyncio.gather(
                *(expelled(ws, "api_key_revoked", 401, revoked) for ws in idle)
            )
        ]
        seen = time.monotonic()
        ends = await asyncio.gather(*streams)
    report_failover(
        f"cluster failover timeline (s after SIGKILL of the primary :{old.port}, slot {slot})",
        "promotion seen in CLUSTER NODES",
        Failover(t0, promoted, revoked, seen, late, ends),
        steady,
        handshake_ceiling=HANDSHAKE_CEILING,
    )
    # The cap holds on the promoted primary: one socket for the key, across both nodes, also
    # when ten handshakes race for it.
    async with socket(gateway, capped) as ws:
        await assert_usable(ws)
        async with aiohttp.ClientSession() as http:
            status, code, _ = await status_of(http, node_b, capped)
        assert (status, code) == (429, "too_many_connections")

    # The first socket's slot is given back once the gateway has seen it close (a release
    # batched for 50 ms): only then does the race start from a free slot.
    async def slot_free() -> bool:
        return int(await store.redis.zcard(store.key_slots(capped_id))) == 0

    await eventually(slot_free, timeout=5)
    async with AsyncExitStack() as stack:
        won = await asyncio.gather(
            *(grab(stack, (gateway, node_b)[i % 2], capped) for i in range(10))
        )
    assert sorted(won) == [False] * 9 + [True], won
    no_tracebacks(caplog)


async def grab(stack: AsyncExitStack, gw: Gateway, key: str) -> bool:
    """A socket kept open till the stack closes: True, or False on a 429."""
    try:
        await stack.enter_async_context(socket(gw, key))
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 429, exc
        return False
    return True


@pytest.mark.parametrize(
    "error",
    [
        rex.ConnectionError("refused"),
        rex.TimeoutError("timed out"),
        rex.ClusterDownError("CLUSTERDOWN The cluster is down"),
        rex.SlotNotCoveredError("Slot 1 is not covered"),
        rex.RedisClusterUnreachableError("no node answers"),
        rex.TryAgainError("TRYAGAIN"),
        rex.MovedError("1 127.0.0.1:1"),
        rex.MaxConnectionsError("too many"),
        rex.RedisClusterException("no targets"),
        ConnectionRefusedError(111, "refused"),
    ],
    ids=type,
)
async def test_every_cluster_error_of_a_failover_is_a_503(error: Exception) -> None:
    """What redis-py's Cluster client may raise while a primary is failed over: each one a
    503 `service_unavailable` from `KeyStore._call`, never a 500."""
    store = KeyStore("redis://127.0.0.1:1/0", "gwtest:nothing", cluster=True)

    async def failing() -> None:
        raise error

    with pytest.raises(GatewayError) as info:
        await store._call(failing())
    assert info.value.code == Code.SERVICE_UNAVAILABLE
    await store.redis.aclose()
