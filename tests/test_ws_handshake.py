"""CONTRACT.md §3 handshake rules, in order, and the errors that close a live socket."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Connect, Gateway, Tenant, create, eventually, make_tenant, recv, send
from test_ws_checks import assert_error, assert_usable

from app.models import Limits
from app.node import NODE


async def grab(
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
) -> tuple[int, aiohttp.ClientWebSocketResponse | None]:
    """A socket kept open till `stack` closes (101 and the socket), or the status its
    handshake was refused with."""
    try:
        ws = await stack.enter_async_context(http.ws_connect(url, headers=headers))
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status, None
    return 101, ws


async def handshake(
    gateway: Gateway, headers: dict[str, str] | None = None, path: str = "/v1/responses", **kw: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A refused handshake's status, JSON body and headers."""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(gateway.url(path), headers=headers or {}, **kw)
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        else:
            await ws.close()
            raise AssertionError("handshake was accepted")
        # Fetch the body the same way with a plain upgrade request, to see the JSON error.
        hdrs = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            **(headers or {}),
        }
        async with http.get(gateway.url(path), headers=hdrs, **kw) as resp:
            assert resp.status == status
            return status, orjson.loads(await resp.read()), dict(resp.headers)


def assert_http_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert {"type", "code", "message", "param"} <= set(body["error"])
    assert body["error"]["code"] == code


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/responses/ws"])
async def test_plain_get_is_426_before_auth(gateway: Gateway, path: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url(path)) as resp:
            assert resp.status == 426
            assert resp.headers["Upgrade"] == "websocket"
            assert_http_error(await resp.json(), "websocket_upgrade_required")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer sk-gw-nope_nope"},
        {"Authorization": "Basic abc"},
    ],
)
async def test_missing_or_unknown_key_is_401(gateway: Gateway, headers: dict[str, str]) -> None:
    status, body, _ = await handshake(gateway, headers)
    assert status == 401
    assert_http_error(body, "invalid_api_key")
    assert body["error"]["type"] == "authentication_error"


async def test_revoked_expired_and_disabled_handshakes(gateway: Gateway, tenant: Tenant) -> None:
    store = gateway.store
    key = await store.get_key(tenant.key_id)
    assert key is not None
    auth = {"Authorization": f"Bearer {tenant.key}"}
    await store.revoke_key(key.id)
    status, body, _ = await handshake(gateway, auth)
    assert (status, body["error"]["code"]) == (401, "api_key_revoked")

    other = await make_tenant(store, team_id="beta")
    okey = await store.get_key(other.key_id)
    assert okey is not None
    await store.put_key(
        okey.model_copy(update={"expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    )
    status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {other.key}"})
    assert (status, body["error"]["code"]) == (401, "api_key_expired")

    third = await make_tenant(store, team_id="gamma")
    await store.put_team(third.team.model_copy(update={"active": False}))
    status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {third.key}"})
    assert (status, body["error"]["code"]) == (403, "team_disabled")
    assert body["error"]["type"] == "permission_error"


async def test_rotated_secret_works_in_grace_then_expires(gateway: Gateway, tenant: Tenant) -> None:
    store = gateway.store
    key = await store.get_key(tenant.key_id)
    assert key is not None
    _, _, new_secret = await store.rotate_key(key.id, grace_seconds=0)
    status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {tenant.key}"})
    assert (status, body["error"]["code"]) == (401, "api_key_expired")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {new_secret}"}
        )
        await assert_usable(ws)
        await ws.close()


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_MAX_SOCKETS": 1}])
async def test_node_full_is_503(gateway: Gateway, tenant: Tenant, connect: Connect) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {tenant.key}"})
        assert (status, body["error"]["code"]) == (503, "server_overloaded")
    places = gateway.app[NODE].places
    await eventually(lambda: places.held == 0)  # the closed socket's handler has ended
    async with connect() as ws:  # a refused handshake took no slot; a closed socket freed its own
        await assert_usable(ws)


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_MAX_SOCKETS": 5}])
async def test_node_cap_holds_against_a_burst_of_handshakes(
    gateway: Gateway, tenant: Tenant, connect: Connect
) -> None:
    """20 handshakes at once against a cap of 5 (a balancer's reconnect storm): each one is
    counted from its check, not from when its socket opens, so 5 are served and 15 refused."""
    headers = {"Authorization": f"Bearer {tenant.key}"}
    url = gateway.url("/v1/responses")
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        got = await asyncio.gather(*(grab(stack, http, url, headers) for _ in range(20)))
        assert sorted(status for status, _ in got) == [101] * 5 + [503] * 15, got
        for _, ws in got:
            if ws is not None:
                await assert_usable(ws)
    places = gateway.app[NODE].places
    await eventually(lambda: places.held == 0)  # each handler gives its place back as it ends
    async with connect() as ws:
        await assert_usable(ws)


async def test_socket_caps_per_key_and_team(gateway: Gateway) -> None:
    capped = await make_tenant(
        gateway.store, team_id="capped", limits=Limits(sockets_per_key=1, sockets_per_team=2)
    )
    _, second_secret = await gateway.store.create_key("capped")
    async with aiohttp.ClientSession() as http:
        a = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {capped.key}"}
        )
        status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {capped.key}"})
        assert (status, body["error"]["code"]) == (429, "too_many_connections")
        b = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {second_secret}"}
        )
        _, third_secret = await gateway.store.create_key("capped")
        status, body, _ = await handshake(gateway, {"Authorization": f"Bearer {third_secret}"})
        assert (status, body["error"]["code"]) == (429, "too_many_connections")
        await a.close()
        await asyncio.sleep(0.2)
        c = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {capped.key}"}
        )
        await assert_usable(c)
        for ws in (b, c):
            await ws.close()


async def test_redis_unreachable_is_503(
    aiohttp_server: Any, database_url: str, sim: Any, tmp_path: Any
) -> None:
    from conftest import gateway_settings

    from app.server import create_app

    settings = gateway_settings(
        "redis://127.0.0.1:1/0", "gwtest:none", database_url, sim.base_url, tmp_path
    )
    server = await aiohttp_server(create_app(settings))
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(
                server.make_url("/v1/responses"), headers={"Authorization": "Bearer sk-gw-x_y"}
            )
        assert info.value.status == 503
        async with http.get(server.make_url("/readyz")) as resp:
            assert resp.status == 503
            assert (await resp.json())["redis"] is False


# -- errors that end a live socket ----------------------------------------------


async def test_revocation_reaches_a_live_socket(
    gateway: Gateway, tenant: Tenant, connect: Connect
) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        key = await gateway.store.get_key(tenant.key_id)
        assert key is not None
        await gateway.store.revoke_key(key.id)
        event = await recv(ws, timeout=1.5)
        assert_error(event, "api_key_revoked", 401)
        msg = await ws.receive(timeout=1)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008


async def test_team_disable_reaches_a_live_socket_mid_response(
    gateway: Gateway, tenant: Tenant, connect: Connect
) -> None:
    async with connect() as ws:
        await send(ws, create(stream_id="L", metadata={"sim_deltas": "40", "sim_delay_ms": "50"}))
        assert (await recv(ws))["type"] == "response.created"
        await gateway.store.put_team(tenant.team.model_copy(update={"active": False}))
        while True:
            event = await recv(ws, timeout=1.5)
            if event["type"] == "error":
                break
        assert_error(event, "team_disabled", 403)
        msg = await ws.receive(timeout=1)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008


async def test_rotation_grace_end_closes_old_sockets(
    gateway: Gateway, tenant: Tenant, connect: Connect
) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        key = await gateway.store.get_key(tenant.key_id)
        assert key is not None
        await gateway.store.rotate_key(key.id, grace_seconds=1)
        await assert_usable(ws)  # still inside the grace period
        event = await recv(ws, timeout=2.5)
        assert_error(event, "api_key_expired", 401)
        await ws.receive(timeout=1)
        assert ws.close_code == 1008


async def test_drain_deadline_ends_a_running_response(gateway: Gateway, connect: Connect) -> None:
    from app.server import drain

    async with connect() as ws:
        await send(ws, create(stream_id="L", metadata={"sim_deltas": "100", "sim_delay_ms": "50"}))
        assert (await recv(ws))["type"] == "response.created"
        task = asyncio.create_task(drain(gateway.node, deadline=0.3))
        while True:
            event = await recv(ws, timeout=3)
            if event["type"] == "error":
                break
        assert_error(event, "server_shutting_down", 503)
        assert event["stream_id"] == "L"
        await ws.receive(timeout=1)
        assert ws.close_code == 1001
        await task
    status, body, headers = await handshake(gateway, {"Authorization": "Bearer whatever"})
    assert (status, body["error"]["code"]) == (503, "server_shutting_down")
    assert headers["Retry-After"] == "1"


async def test_drain_lets_a_response_finish_then_closes_1001(
    gateway: Gateway, connect: Connect
) -> None:
    from app.server import drain

    async with connect() as idle, connect() as busy:
        await send(busy, create(metadata={"sim_deltas": "10", "sim_delay_ms": "30"}))
        assert (await recv(busy))["type"] == "response.created"
        task = asyncio.create_task(drain(gateway.node, deadline=5))
        msg = await idle.receive(timeout=1)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert idle.close_code == 1001
        events = []
        while True:
            msg = await busy.receive(timeout=3)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            events.append(orjson.loads(msg.data))
        assert events[-1]["type"] == "response.completed"
        assert busy.close_code == 1001
        await task
