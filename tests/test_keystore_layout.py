"""The key store's layout for Redis Cluster, on a real Redis: socket slots taken as two
single-slot steps with their compensation, exact caps under concurrent handshakes at two nodes,
admin writes finished by any node when cut short, and the one-time copy from the names used
before hash tags."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import aiohttp
import pytest
from conftest import REDIS_CLUSTER, Gateway, make_tenant

from app.auth.principal import Principal, hash_secret
from app.errors import GatewayError
from app.keystore import LEASE_MS, KeyStore
from app.models import ApiKey, Limits, Price, Team, utcnow
from app.view import NodeView


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[KeyStore]:
    store = KeyStore(redis_url, redis_prefix, cluster=REDIS_CLUSTER)
    try:
        yield store
    finally:
        await store.close()


def principal(key_id: str, team_id: str) -> Principal:
    return Principal(key_id=key_id, key_prefix="sk-gw-x", team_id=team_id, secret_hash="")


async def members(store: KeyStore, name: str) -> set[str]:
    return {m.decode() for m in await store.redis.zrange(name, 0, -1)}


async def test_a_team_refusal_gives_the_key_slot_back(store: KeyStore) -> None:
    first, second = principal("key_a", "t"), principal("key_b", "t")
    assert (await store.acquire_socket(first, "ws_1", 5, 1, {"id": "ws_1"}))[0]
    # key_b's own cap (5) has room, its team's (1) has none: the key slot it took goes back.
    taken, _ = await store.acquire_socket(second, "ws_2", 5, 1, {"id": "ws_2"})
    assert not taken
    assert await members(store, store.key_slots("key_b")) == set()
    assert await members(store, store.team_slots("t")) == {"ws_1"}
    assert await members(store, store.sessions_index()) == {"ws_1"}
    assert not await store.redis.exists(store.session_record("ws_2"))
    # And the other way round: the key refuses, the team slot goes back.
    taken, _ = await store.acquire_socket(first, "ws_3", 1, 5, {"id": "ws_3"})
    assert not taken
    assert await members(store, store.team_slots("t")) == {"ws_1"}
    print("\nrefused twice; slot sets unchanged: key_a={ws_1} key_b={} team={ws_1}")


async def test_a_slot_left_by_a_failed_step_lapses_with_its_lease(store: KeyStore) -> None:
    # A node that took the key's slot and died before its team step or its compensation:
    # the slot carries a lease, here a short one, and the next check drops it once past.
    now = int(time.time() * 1000)
    await store.redis.zadd(store.key_slots("key_a"), {"ws_dead": now + 300})
    taken, _ = await store.acquire_socket(principal("key_a", "t"), "ws_1", 1, 0, {})
    assert not taken
    await asyncio.sleep(0.4)
    taken, _ = await store.acquire_socket(principal("key_a", "t"), "ws_1", 1, 0, {})
    assert taken
    deadline = await store.redis.zscore(store.key_slots("key_a"), "ws_1")
    assert deadline is not None and deadline - time.time() * 1000 <= LEASE_MS
    print(f"\nlease of a real slot: {LEASE_MS} ms; the dead node's slot lapsed after 300 ms")


async def test_concurrent_handshakes_at_two_nodes_take_exactly_the_cap(
    gateway: Gateway, node_b: Gateway
) -> None:
    cap = 3
    tenant = await make_tenant(gateway.store, limits=Limits(sockets_per_team=cap))
    _key2, secret2 = await gateway.store.create_key(tenant.team.id)
    async with aiohttp.ClientSession() as http:
        open_sockets: list[aiohttp.ClientWebSocketResponse] = []

        async def one(node: Gateway, secret: str) -> int:
            try:
                ws = await http.ws_connect(
                    node.url("/v1/responses"), headers={"Authorization": f"Bearer {secret}"}
                )
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
            open_sockets.append(ws)
            return 101

        tries = [
            one(node, secret)
            for _ in range(6)
            for node in (gateway, node_b)
            for secret in (tenant.key, secret2)
        ]
        statuses = await asyncio.gather(*tries)
        try:
            assert statuses.count(101) == cap, statuses
            assert statuses.count(429) == len(tries) - cap
            slots = await gateway.store.redis.zcard(gateway.store.team_slots(tenant.team.id))
            assert slots == cap
        finally:
            for ws in open_sockets:
                await ws.close()
    print(f"\n{len(tries)} concurrent handshakes at 2 nodes, team cap {cap}: "
          f"{statuses.count(101)} accepted, {statuses.count(429)} got 429")  # fmt: skip


async def test_an_admin_write_cut_short_is_finished_by_any_node(
    redis_url: str, redis_prefix: str, store: KeyStore
) -> None:
    await store.put_team(Team(id="t", name="t", allowed_models=["openai/*"]))
    key, secret = await store.create_key("t")
    other = KeyStore(redis_url, redis_prefix, cluster=REDIS_CLUSTER)
    view = NodeView(other)
    try:
        await view.load()
        assert (await view.lookup_secret(secret))[0] is not None  # cached on that node
        # A revocation whose writer died after its record's MULTI (steps 1 and 2 of
        # KeyStore._transaction): no version bump yet.
        revoked = key.model_copy(update={"revoked_at": utcnow()})
        await store.redis.sadd(store.g("pending"), f"key:{key.id}:0123abcd")
        await store.redis.set(store.key_record(key.id), revoked.model_dump_json())
        version = await store.version()
        assert await view.load()  # the poll saw the pending write, finished it, and reloaded
        assert await store.version() == version + 1
        assert not await store.redis.exists(store.g("pending"))
        found, _ = await view.lookup_secret(secret)
        assert found is not None and found[0].revoked_at is not None
    finally:
        await view.stop()
        await other.close()
    print("\npending revocation settled by another node's poll; version bumped by 1")


async def test_a_write_that_settles_leaves_another_cut_short_write_marked(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writes to one record: the first is cut short after its record's MULTI (its
    follow-ups fail), the second completes. The second's settling must not clear the first's
    mark, or the first's version bump (a revocation reaching the nodes) would be lost."""
    await store.put_team(Team(id="t", name="t", allowed_models=["openai/*"]))
    key, _secret = await store.create_key("t")
    settle = store._settle

    async def cut_short(pending: str, digest: str | None) -> None:
        raise ConnectionError("Redis went away between the steps")

    monkeypatch.setattr(store, "_settle", cut_short)
    with pytest.raises(GatewayError):
        await store.revoke_key(key.id)
    monkeypatch.setattr(store, "_settle", settle)

    def unchanged(current: ApiKey | None) -> ApiKey:
        assert current is not None
        return current

    await store.update_key(key.id, unchanged)
    left = await store.redis.smembers(store.g("pending"))
    print(f"\nmarks left after the second write settled: {sorted(left)}")
    assert len(left) == 1, left  # the cut-short revocation's, for the nodes' polls to finish


async def test_the_layout_before_hash_tags_is_copied_once(store: KeyStore) -> None:
    team = Team(id="old", name="Old", allowed_models=["openai/*"])
    key = ApiKey(
        id="key_old",
        team_id="old",
        name="",
        prefix="sk-gw-old",
        created_at=utcnow(),
        secret_hash=hash_secret("sk-old-secret"),
    )
    price = Price(
        input_per_mtok=Decimal(1), cached_input_per_mtok=Decimal(0), output_per_mtok=Decimal(2)
    )
    r = store.redis
    await r.sadd(store.k("teams"), "old")
    await r.set(store.k("team", "old"), team.model_dump_json())
    await r.sadd(store.k("keys"), "key_old")
    await r.set(store.k("key", "key_old"), key.model_dump_json())
    await r.set(store.k("secret", key.secret_hash), "key_old")
    await r.hset(store.k("catalog"), "openai/m", price.model_dump_json())
    await r.set(store.k("version"), 41)

    assert await store.migrate_layout() == 3
    assert [t.id for t in await store.list_teams()] == ["old"]
    assert [k.id for k in await store.list_keys()] == ["key_old"]
    assert list(await store.catalog()) == ["openai/m"]
    found, version = await store.lookup_digest(key.secret_hash)
    assert found is not None and found.id == "key_old" and version > 41
    assert await store.migrate_layout() == 0  # marked: never again
    print(f"\ncopied 3 records (team, key, price); version {version}; second run copied 0")
