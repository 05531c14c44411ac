"""Admin writes reach live sockets on every node (CONTRACT.md §4, §5): two gateway nodes (two apps
on two ports, one Redis prefix, one upstream simulator), revocation, team disable and rotation
acted on through node A's admin API; socket caps and the rate limit held across both nodes; a turn
on node A in node B's session listing within a second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, Gateway, Tenant, create, eventually, recv, send, turn
from test_ws_checks import assert_error, assert_usable
from test_ws_handshake import assert_http_error, handshake

TOKEN = "admin-test-token"
# A response that streams for about five seconds: long enough to be cut off mid-way.
SLOW = {"sim_deltas": "100", "sim_delay_ms": "50"}
WITHIN = 1.0  # CONTRACT.md §4: every node, live sockets included, within one second
# No helper may hang a test run: a stuck call fails in seconds instead.
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"GATEWAY_NODE_ID": "node-a"}


async def admin(gw: Gateway, method: str, path: str, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Admin-Actor": "test"}
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        url = gw.url("/admin/v1" + path)
        async with http.request(method, url, json=body, headers=headers) as resp:
            value = orjson.loads(await resp.read())
            assert resp.status in (200, 201), value
            return value


@asynccontextmanager
async def socket(gw: Gateway, key: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        headers = {"Authorization": f"Bearer {key}"}
        async with http.ws_connect(gw.url("/v1/responses"), headers=headers) as ws:
            yield ws


async def streaming(ws: aiohttp.ClientWebSocketResponse, stream_id: str) -> None:
    """Start a long response and return once its text is flowing."""
    await send(ws, create(stream_id=stream_id, metadata=SLOW))
    while (await recv(ws))["type"] != "response.output_text.delta":
        pass


async def expelled(
    ws: aiohttp.ClientWebSocketResponse, code: str, status: int, since: float
) -> tuple[float, dict[str, Any]]:
    """Read up to the error frame (skipping the deltas of a response in flight) and the 1008
    close that follows it; the seconds from `since` to the close, and the error frame."""
    while True:
        event = await recv(ws, timeout=WITHIN + 2)
        if event["type"] == "error":
            break
        assert event["type"] == "response.output_text.delta", event
    assert_error(event, code, status)
    msg = await ws.receive(timeout=WITHIN)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    assert ws.close_code == 1008
    return asyncio.get_running_loop().time() - since, event


async def refused(gw: Gateway, key: str, status: int, code: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    got, body, _ = await asyncio.wait_for(handshake(gw, headers), HTTP_TIMEOUT.total)
    assert got == status
    assert_http_error(body, code)


def report(what: str, *latencies: float) -> None:
    print(f"\n{what}: " + ", ".join(f"{s * 1000:.0f} ms" for s in latencies))


# -- revocation, team disable, rotation -----------------------------------------------------------


async def test_revocation_closes_sockets_on_both_nodes_within_a_second(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    loop = asyncio.get_running_loop()
    async with socket(gateway, tenant.key) as ws_a, socket(node_b, tenant.key) as ws_b:
        await assert_usable(ws_b)  # node B served a turn; now it idles
        await streaming(ws_a, "long")  # node A is mid-response
        since = loop.time()
        await admin(gateway, "POST", f"/keys/{tenant.key_id}/revoke")
        (late_a, frame_a), (late_b, _) = await asyncio.gather(
            expelled(ws_a, "api_key_revoked", 401, since),
            expelled(ws_b, "api_key_revoked", 401, since),
        )
    report("revocation → 1008 (streaming on A, idle on B)", late_a, late_b)
    assert late_a < WITHIN and late_b < WITHIN
    assert frame_a["stream_id"] == "long"
    for gw in (gateway, node_b):
        await refused(gw, tenant.key, 401, "api_key_revoked")


async def test_team_disable_closes_sockets_on_both_nodes_within_a_second(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    loop = asyncio.get_running_loop()
    async with socket(gateway, tenant.key) as ws_a, socket(node_b, tenant.key) as ws_b:
        await assert_usable(ws_b)
        await streaming(ws_a, "long")
        since = loop.time()
        await admin(gateway, "POST", f"/teams/{tenant.team.id}/disable")
        (late_a, _), (late_b, _) = await asyncio.gather(
            expelled(ws_a, "team_disabled", 403, since),
            expelled(ws_b, "team_disabled", 403, since),
        )
    report("team disable → 1008 (streaming on A, idle on B)", late_a, late_b)
    assert late_a < WITHIN and late_b < WITHIN
    for gw in (gateway, node_b):
        await refused(gw, tenant.key, 403, "team_disabled")
    await admin(node_b, "POST", f"/teams/{tenant.team.id}/enable")
    for gw in (gateway, node_b):
        async with socket(gw, tenant.key) as ws:
            await assert_usable(ws)


async def test_rotation_grace_ends_on_both_nodes(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    loop = asyncio.get_running_loop()
    old = tenant.key
    async with AsyncExitStack() as stack:
        old_a = await stack.enter_async_context(socket(gateway, old))
        body = {"grace_seconds": 2}
        rotated = await admin(gateway, "POST", f"/keys/{tenant.key_id}/rotate", body)
        since = loop.time()
        new = rotated["key"]
        assert rotated["id"] == tenant.key_id and new != old
        # Before the deadline the old secret opens a new socket, on the other node too.
        old_b = await stack.enter_async_context(socket(node_b, old))
        await assert_usable(old_b)
        new_a = await stack.enter_async_context(socket(gateway, new))
        new_b = await stack.enter_async_context(socket(node_b, new))
        await assert_usable(new_a)
        await assert_usable(new_b)
        await streaming(old_a, "old")
        (late_a, _), (late_b, _) = await asyncio.gather(
            expelled(old_a, "api_key_expired", 401, since),
            expelled(old_b, "api_key_expired", 401, since),
        )
        report("rotation grace 2 s → 1008 after rotation", late_a, late_b)
        # Not before the deadline (less the admin call's own time), and within a second of it.
        for late in (late_a, late_b):
            assert 1.8 < late < 2 + WITHIN
        for gw in (gateway, node_b):
            await refused(gw, old, 401, "api_key_expired")
        # The new secret worked throughout and still does.
        await assert_usable(new_a)
        await assert_usable(new_b)


async def test_rotation_without_grace_ends_the_old_secret_at_once(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    loop = asyncio.get_running_loop()
    async with socket(node_b, tenant.key) as ws_b:
        await assert_usable(ws_b)
        since = loop.time()
        body = {"grace_seconds": 0}
        rotated = await admin(gateway, "POST", f"/keys/{tenant.key_id}/rotate", body)
        late, _ = await expelled(ws_b, "api_key_expired", 401, since)
    report("rotation grace 0 → 1008 on B", late)
    assert late < WITHIN
    await refused(gateway, tenant.key, 401, "api_key_expired")
    async with socket(node_b, rotated["key"]) as ws:
        await assert_usable(ws)


# -- limits across nodes --------------------------------------------------------------------------


async def _limit(gw: Gateway, tenant: Tenant, **limits: int) -> None:
    body = {
        "id": tenant.team.id,
        "allowed_models": tenant.team.allowed_models,
        "limits": limits,
    }
    await admin(gw, "POST", "/teams", body)


async def test_socket_cap_per_key_holds_across_nodes(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    await _limit(gateway, tenant, sockets_per_key=1)
    async with socket(gateway, tenant.key) as ws_a:
        await refused(node_b, tenant.key, 429, "too_many_connections")
        await refused(gateway, tenant.key, 429, "too_many_connections")
        await assert_usable(ws_a)

    # The slot is released with the socket: node B now gets it.
    async def usable_on_b() -> None:
        try:
            async with socket(node_b, tenant.key) as ws_b:
                await assert_usable(ws_b)
        except aiohttp.WSServerHandshakeError as exc:
            raise AssertionError("the slot was never released") from exc

    await eventually(usable_on_b, timeout=2.5, interval=0.05)


async def test_socket_cap_per_team_holds_across_nodes(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    await _limit(gateway, tenant, sockets_per_team=2)
    second = await admin(gateway, "POST", "/keys", {"team_id": tenant.team.id})
    async with socket(gateway, tenant.key), socket(node_b, second["key"]):
        await refused(node_b, tenant.key, 429, "too_many_connections")
        await refused(gateway, second["key"], 429, "too_many_connections")
        sessions = (await admin(node_b, "GET", "/sessions"))["data"]
        assert sorted(s["node"] for s in sessions) == ["node-a", "node-b"]
        assert sorted(s["key_prefix"] for s in sessions) == sorted(
            [tenant.key.partition("_")[0], second["prefix"]]
        )


async def test_rate_limit_holds_across_nodes(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    await _limit(gateway, tenant, responses_per_minute_per_key=2)
    second = await admin(gateway, "POST", "/keys", {"team_id": tenant.team.id})
    async with socket(gateway, tenant.key) as ws_a, socket(node_b, tenant.key) as ws_b:
        assert (await turn(ws_a))[-1]["type"] == "response.completed"
        assert (await turn(ws_b))[-1]["type"] == "response.completed"
        for ws in (ws_a, ws_b):
            events = await turn(ws, stream_id="over")
            assert len(events) == 1
            assert_error(events[0], "rate_limit_exceeded", 429)
            assert events[0]["stream_id"] == "over"
        assert not ws_a.closed and not ws_b.closed
    # The limit is per key: another key of the same team still has its own budget.
    async with socket(node_b, second["key"]) as ws:
        await assert_usable(ws)


# -- the session listing ------------------------------------------------------------------------


async def listed(gw: Gateway, socket_id: str) -> dict[str, Any]:
    listed: list[dict[str, Any]] = (await admin(gw, "GET", "/sessions"))["data"]
    [found] = [s for s in listed if s["id"] == socket_id]
    return found


async def test_a_turn_shows_in_another_nodes_session_listing_within_a_second(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    """CONTRACT.md §5: a turn that ended on node A shows (model, turns) in node B's listing
    within one second, not at A's next lease renewal (every 15 s)."""
    loop = asyncio.get_running_loop()
    store = gateway.store
    async with socket(gateway, tenant.key) as ws:
        [opened] = (await admin(node_b, "GET", "/sessions"))["data"]
        assert (opened["node"], opened["model"], opened["turns"]) == ("node-a", None, 0)
        lease = await store.redis.zscore(store.sessions_index(), opened["id"])
        latencies = []
        for turns in (1, 2):
            assert (await turn(ws))[-1]["type"] == "response.completed"
            ended = loop.time()
            while (shown := await listed(node_b, opened["id"]))["turns"] != turns:
                assert loop.time() - ended < WITHIN, f"node B still lists {shown}"
                await asyncio.sleep(0.05)
            latencies.append(loop.time() - ended)
            assert shown["model"] == MODEL and shown["node"] == "node-a"
        # Not the lease renewal's doing: the socket's lease deadline is still the handshake's.
        assert await store.redis.zscore(store.sessions_index(), opened["id"]) == lease
    report("turn to listing", *latencies)


async def test_a_late_record_write_does_not_bring_back_a_closed_socket(
    gateway: Gateway, tenant: Tenant
) -> None:
    """The race of the batched record writes: one that reaches Redis after the socket's release
    must not recreate the record the release deleted."""
    store = gateway.store
    async with socket(gateway, tenant.key) as ws:
        [opened] = (await admin(gateway, "GET", "/sessions"))["data"]
        assert (await turn(ws))[-1]["type"] == "response.completed"
    record = store.session_record(opened["id"])

    async def released() -> bool:
        return bool(await store.redis.exists(record) == 0)

    await eventually(released)
    store.update_session(opened["id"], lambda: {**opened, "model": MODEL, "turns": 1})
    await store.flush_session_infos()
    assert await store.redis.exists(record) == 0
    assert (await admin(gateway, "GET", "/sessions"))["data"] == []


async def test_a_late_lease_renewal_does_not_bring_back_a_closed_socket(
    gateway: Gateway, tenant: Tenant
) -> None:
    """The same race for the lease renewal: a renewal that reaches Redis after the socket's
    release must not recreate its listing entry, its record or its slots."""
    store = gateway.store
    async with socket(gateway, tenant.key):
        [opened] = (await admin(gateway, "GET", "/sessions"))["data"]
        [session] = gateway.node.sessions
        principal = session.principal
    record = store.session_record(opened["id"])

    async def released() -> bool:
        return bool(await store.redis.exists(record) == 0)

    await eventually(released)
    await store.refresh_leases([(principal, opened["id"], opened)])
    assert await store.redis.exists(record) == 0
    assert await store.redis.zscore(store.sessions_index(), opened["id"]) is None
    for slots in (store.key_slots(principal.key_id), store.team_slots(principal.team_id)):
        assert await store.redis.zscore(slots, opened["id"]) is None
    assert (await admin(gateway, "GET", "/sessions"))["data"] == []
