"""Failed authentications per client address (app/auth/guard.py) and the admin API's TLS-proxy rule.

The table itself is tested with a hand-driven clock; the refusals over real sockets against a
real gateway (Redis, Postgres, the simulator), on the WebSocket handshake, `POST /v1/responses`,
`GET /v1/models` and the admin API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, Gateway, Sim, Tenant, gateway_settings
from multidict import CIMultiDict
from test_ws_checks import assert_usable
from test_ws_handshake import assert_http_error

from app.auth.guard import AUTH_GUARD, MAX_ADDRESSES, AuthGuard, client_key, right_most
from app.auth.principal import new_secret
from app.errors import Code, GatewayError
from app.metrics import REGISTRY
from app.server import create_app
from app.view import NodeView

ADMIN = "admin-test-token"  # conftest's gateway_settings
WRONG = {"Authorization": "Bearer sk-gw-nope_nope"}
LIMIT = 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused_for(guard: AuthGuard, address: str) -> int | None:
    """The Retry-After a check of `address` answers, or None when it passes."""
    err = guard.refusal(address)
    if err is None:
        return None
    assert err.code is Code.RATE_LIMIT_EXCEEDED and err.status == 429
    assert err.headers is not None
    return int(err.headers["Retry-After"])


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the table --------------------------------------------------------------------------------


def test_a_budget_of_failures_then_429_until_a_token_is_back() -> None:
    clock = Clock()
    guard = AuthGuard(6, clock=clock)  # 6 a minute: one back every 10 s
    for _ in range(6):
        assert refused_for(guard, "10.0.0.1") is None
        guard.failed("10.0.0.1")
    assert refused_for(guard, "10.0.0.1") == 10
    assert refused_for(guard, "10.0.0.2") is None  # per address
    clock.now += 9.5
    assert refused_for(guard, "10.0.0.1") == 1
    clock.now += 0.5
    assert refused_for(guard, "10.0.0.1") is None  # one more try ...
    guard.failed("10.0.0.1")
    assert refused_for(guard, "10.0.0.1") == 10  # ... and it is spent
    clock.now += 60
    for _ in range(6):  # a quiet minute gives the whole budget back
        assert refused_for(guard, "10.0.0.1") is None
        guard.failed("10.0.0.1")
    assert refused_for(guard, "10.0.0.1") is not None


def test_concurrent_failures_past_the_budget_block_no_longer_than_a_refill() -> None:
    clock = Clock()
    guard = AuthGuard(60, clock=clock)
    for _ in range(500):  # attempts that all passed the check before any of them failed
        guard.failed("10.0.0.1")
    assert refused_for(guard, "10.0.0.1") == 1


def test_successes_are_not_counted_and_off_means_off() -> None:
    guard = AuthGuard(2, clock=Clock())
    for _ in range(100):
        assert refused_for(guard, "10.0.0.1") is None  # checks alone spend nothing
    assert len(guard) == 0
    off = AuthGuard(0)
    ok = GatewayError(Code.INVALID_API_KEY)
    assert off.address_of(_FakeRequest("10.0.0.1")) is None  # type: ignore[arg-type]
    off.charge(None, ok)
    assert len(off) == 0


def test_only_failed_authentications_count() -> None:
    guard = AuthGuard(1, clock=Clock())
    for code in (Code.TEAM_DISABLED, Code.SERVICE_UNAVAILABLE, Code.INVALID_RESPONSE_CREATE):
        guard.charge("10.0.0.1", GatewayError(code))
    assert refused_for(guard, "10.0.0.1") is None
    for code in (Code.API_KEY_REVOKED, Code.API_KEY_EXPIRED, Code.INVALID_ADMIN_TOKEN):
        other = f"10.0.1.{len(code)}"
        guard.charge(other, GatewayError(code))
        assert refused_for(guard, other) is not None, code


def test_the_table_is_bounded_and_forgets_refilled_addresses() -> None:
    clock = Clock()
    guard = AuthGuard(5, max_addresses=100, clock=clock)
    for i in range(10_000):  # a flood of distinct addresses
        guard.failed(f"10.{i // 256 // 256}.{i // 256 % 256}.{i % 256}")
    assert len(guard) == 100
    assert MAX_ADDRESSES <= 20_000  # the production bound stays small
    clock.now += 61  # every bucket is full again: the next failure sweeps them out
    guard.failed("192.0.2.1")
    assert len(guard) == 1


def test_a_blocked_address_is_logged_once_per_run(caplog: pytest.LogCaptureFixture) -> None:
    guard = AuthGuard(2, clock=Clock())
    for _ in range(20):
        guard.failed("10.0.0.1")
    lines = [r for r in caplog.records if r.name == "gateway.guard"]
    assert len(lines) == 1 and lines[0].__dict__["client_address"] == "10.0.0.1"


def test_client_keys() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key(" 192.0.2.7 ") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    # An IPv6 client holds its /64: every address in it shares one budget.
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert client_key("[2001:db8:1:3::1]") == "2001:db8:1:3::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:4::1")
    assert client_key("not an address" * 20) == ("not an address" * 20)[:64]
    assert right_most("203.0.113.9, 10.0.0.1 , 198.51.100.4 ") == "198.51.100.4"
    assert right_most("") == ""


class _FakeRequest:
    def __init__(self, remote: str) -> None:
        self.remote = remote
        self.headers: dict[str, str] = {}


# -- over real sockets ------------------------------------------------------------------------

UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def handshake(
    gateway: Gateway, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One WebSocket handshake (a plain upgrade request): a refusal's status, body, headers."""
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url("/v1/responses"), headers={**UPGRADE, **headers}) as resp:
            assert resp.status != 101
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def post(
    gateway: Gateway, path: str, headers: Mapping[str, str], body: Any = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url(path), headers=headers, json=body) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def get(
    gateway: Gateway, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url(path), headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


def assert_limited(status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    assert status == 429, body
    assert_http_error(body, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error"
    assert "failed authentications" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60


LIMITED = {"GATEWAY_AUTH_FAILURES_PER_MINUTE": LIMIT}


def test_the_default_is_on() -> None:
    settings = gateway_settings("redis://x", "p", "postgresql://x", "http://x/v1", Path("."))
    assert settings.auth_failures_per_minute == 60
    assert settings.trust_forwarded_for is False
    assert settings.admin_require_tls_proxy is False


@pytest.mark.parametrize("settings_overrides", [LIMITED])
async def test_handshake_failures_then_429_for_unissued_keys_only(
    gateway: Gateway, tenant: Tenant, connect: Any
) -> None:
    before = counted("gateway_ws_connections_total", outcome="rate_limit_exceeded")
    errors_before = counted("gateway_errors_total", code="rate_limit_exceeded")
    for _ in range(LIMIT):
        status, body, _ = await handshake(gateway, WRONG)
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, body, headers = await handshake(gateway, WRONG)
    assert_limited(status, body, headers)
    # A valid key from the same address is served: other people's failures never refuse it.
    async with connect() as ws:
        await assert_usable(ws)
    assert counted("gateway_ws_connections_total", outcome="rate_limit_exceeded") - before == 1
    assert counted("gateway_errors_total", code="rate_limit_exceeded") - errors_before == 1
    # The refusals came before auth, but after the contract's earlier checks: 426 stays 426.
    status, body, _ = await get(gateway, "/v1/responses", {"Authorization": "Bearer x"})
    assert (status, body["error"]["code"]) == (426, "websocket_upgrade_required")


@pytest.mark.parametrize("settings_overrides", [LIMITED])
async def test_successful_handshakes_do_not_count(
    gateway: Gateway, tenant: Tenant, connect: Any
) -> None:
    for _ in range(LIMIT * 3):
        async with connect() as ws:
            pass
    async with connect() as ws:
        await assert_usable(ws)
    assert len(gateway.app[AUTH_GUARD]) == 0


@pytest.mark.parametrize("settings_overrides", [LIMITED])
async def test_posts_models_and_admin_share_one_budget(gateway: Gateway, tenant: Tenant) -> None:
    body = {"model": MODEL, "input": "hi"}
    before = counted("gateway_errors_total", code="rate_limit_exceeded")
    status, got, _ = await post(gateway, "/v1/responses", WRONG, body)
    assert (status, got["error"]["code"]) == (401, "invalid_api_key")
    status, got, _ = await get(gateway, "/v1/models", WRONG)
    assert (status, got["error"]["code"]) == (401, "invalid_api_key")
    status, got, _ = await get(gateway, "/admin/v1/teams", {"Authorization": "Bearer wrong"})
    assert (status, got["error"]["code"]) == (401, "invalid_admin_token")
    # Three failures from this address, over three endpoints: every endpoint now refuses wrong
    # credentials with 429 ...
    assert_limited(*await post(gateway, "/v1/responses", WRONG, body))
    assert_limited(*await post(gateway, "/v1/responses/compact", WRONG, body))
    assert_limited(*await get(gateway, "/v1/models", WRONG))
    assert_limited(*await get(gateway, "/admin/v1/teams", {"Authorization": "Bearer wrong"}))
    assert counted("gateway_errors_total", code="rate_limit_exceeded") - before == 4
    # ... and serves the right ones.
    good = {"Authorization": f"Bearer {tenant.key}"}
    assert (await post(gateway, "/v1/responses", good, body))[0] == 200
    assert (await get(gateway, "/v1/models", good))[0] == 200
    assert (await get(gateway, "/admin/v1/teams", {"Authorization": f"Bearer {ADMIN}"}))[0] == 200


@pytest.mark.parametrize("settings_overrides", [LIMITED])
async def test_wrong_admin_tokens_are_limited_and_good_calls_cost_nothing(
    gateway: Gateway,
) -> None:
    good = {"Authorization": f"Bearer {ADMIN}"}
    for _ in range(10):
        assert (await get(gateway, "/admin/v1/teams", good))[0] == 200
    for _ in range(LIMIT):
        status, got, headers = await get(gateway, "/admin/v1/teams", {"Authorization": "Bearer x"})
        assert (status, got["error"]["code"]) == (401, "invalid_admin_token")
        assert "WWW-Authenticate" in headers
    status, got, headers = await get(gateway, "/admin/v1/no/such/route", {"Authorization": "x"})
    assert_limited(status, got, headers)
    assert "WWW-Authenticate" not in headers
    # The right token still reaches the router (its 404).
    status, got, _ = await get(gateway, "/admin/v1/no/such/route", good)
    assert (status, got["error"]["code"]) == (404, "not_found")


async def _own_gateway(
    aiohttp_server: Any,
    redis_url: str,
    prefix: str,
    database_url: str,
    sim: Sim,
    tmp_path: Path,
    guard: AuthGuard,
    **extra: Any,
) -> Gateway:
    settings = gateway_settings(
        redis_url, prefix, database_url, sim.base_url, tmp_path / "spill", **extra
    )
    app = create_app(settings)
    app[AUTH_GUARD] = guard  # a guard with a clock the test moves
    return Gateway(await aiohttp_server(app), app)


async def test_the_block_lifts_when_a_token_is_back(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    database_url: str,
    sim: Sim,
    tmp_path: Path,
) -> None:
    clock = Clock()
    gw = await _own_gateway(
        aiohttp_server,
        redis_url,
        redis_prefix,
        database_url,
        sim,
        tmp_path,
        AuthGuard(2, clock=clock),
    )
    for _ in range(2):
        assert (await get(gw, "/admin/v1/teams", {"Authorization": "Bearer x"}))[0] == 401
    status, got, headers = await get(gw, "/admin/v1/teams", {"Authorization": "Bearer x"})
    assert_limited(status, got, headers)
    assert headers["Retry-After"] == "30"
    clock.now += 30
    assert (await get(gw, "/admin/v1/teams", {"Authorization": "Bearer x"}))[0] == 401


async def test_a_blocked_address_gets_503_while_redis_is_away(
    aiohttp_server: Any, database_url: str, sim: Sim, tmp_path: Path
) -> None:
    guard = AuthGuard(LIMIT)
    gw = await _own_gateway(
        aiohttp_server, "redis://127.0.0.1:1/0", "gwtest:none", database_url, sim, tmp_path, guard
    )
    # With Redis away a key cannot be judged: 503, and that is not a failure of the client's.
    status, body, _ = await handshake(gw, WRONG)
    assert (status, body["error"]["code"]) == (503, "service_unavailable")
    assert len(guard) == 0
    for _ in range(LIMIT):
        guard.failed("127.0.0.1")  # failures counted before Redis went away
    # Whether the key was ever issued cannot be told either: 503, not a 429 that would refuse
    # a valid key for a store outage.
    status, body, _ = await handshake(gw, WRONG)
    assert (status, body["error"]["code"]) == (503, "service_unavailable")


@pytest.mark.parametrize("settings_overrides", [LIMITED])
async def test_x_forwarded_for_is_ignored_unless_trusted(gateway: Gateway) -> None:
    for i in range(LIMIT):
        forged = {**WRONG, "X-Forwarded-For": f"198.51.100.{i}"}
        assert (await post(gateway, "/v1/responses", forged))[0] == 401
    fresh = {**WRONG, "X-Forwarded-For": "198.51.100.200"}
    assert_limited(*await post(gateway, "/v1/responses", fresh))  # still 127.0.0.1


@pytest.mark.parametrize("settings_overrides", [{**LIMITED, "GATEWAY_TRUST_FORWARDED_FOR": True}])
async def test_a_trusted_proxy_names_the_address_in_its_right_most_entry(
    gateway: Gateway, tenant: Tenant
) -> None:
    # The client forges the left part; the proxy appended the address it saw (right-most).
    for i in range(LIMIT):
        forged = {**WRONG, "X-Forwarded-For": f"10.9.9.{i}, 203.0.113.5"}
        assert (await post(gateway, "/v1/responses", forged))[0] == 401
    again = {**WRONG, "X-Forwarded-For": "10.9.9.99, 203.0.113.5"}
    assert_limited(*await post(gateway, "/v1/responses", again))
    # Another client behind the same proxy, and the proxy's own peer address, are not blocked.
    other = {"Authorization": f"Bearer {tenant.key}", "X-Forwarded-For": "203.0.113.6"}
    status, _, _ = await post(gateway, "/v1/responses", other, {"model": MODEL, "input": "x"})
    assert status == 200
    status, body, _ = await post(gateway, "/v1/responses", WRONG)  # no header: the peer
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    # A proxy that adds a header line of its own (HAProxy's `option forwardfor`) after the
    # client's forged one: its line counts, not the client's.
    for i in range(2):
        two_lines = CIMultiDict([*WRONG.items(), ("X-Forwarded-For", f"10.8.8.{i}")])
        two_lines.add("X-Forwarded-For", "203.0.113.5")
        assert_limited(*await post(gateway, "/v1/responses", two_lines))
    # An IPv6 client's whole /64 shares its budget.
    for i in range(LIMIT):
        v6 = {**WRONG, "X-Forwarded-For": f"2001:db8:5:6::{i + 1}"}
        assert (await post(gateway, "/v1/responses", v6))[0] == 401
    assert_limited(
        *await post(gateway, "/v1/responses", {**WRONG, "X-Forwarded-For": "2001:db8:5:6::abc"})
    )


# -- the admin API behind a TLS proxy ---------------------------------------------------------

TLS = {"GATEWAY_ADMIN_REQUIRE_TLS_PROXY": True}


async def admin_status(gateway: Gateway, headers: dict[str, str], path: str = "/teams") -> int:
    status, body, _ = await get(gateway, "/admin/v1" + path, headers)
    if status == 403:
        assert_http_error(body, "admin_tls_required")
        assert body["error"]["type"] == "permission_error"
        assert "https" in body["error"]["message"].lower()
    return status


@pytest.mark.parametrize("settings_overrides", [TLS])
async def test_admin_requires_the_tls_proxy_when_configured(gateway: Gateway) -> None:
    token = {"Authorization": f"Bearer {ADMIN}"}
    before = counted("gateway_errors_total", code="admin_tls_required")
    assert await admin_status(gateway, token) == 403
    for good in (
        {"X-Forwarded-Proto": "https"},
        {"X-Forwarded-Proto": "HTTPS"},
        {"X-Forwarded-Proto": "http, https"},  # the right-most is our proxy's
        {"Forwarded": "proto=https"},
        {"Forwarded": 'for="[2001:db8::1]";proto=HTTPS'},
        {"Forwarded": "proto=http, for=192.0.2.1;proto=https"},
        {"X-Forwarded-Proto": "https", "Forwarded": "proto=https"},
    ):
        assert await admin_status(gateway, {**token, **good}) == 200, good
    for bad in (
        {"X-Forwarded-Proto": "http"},
        {"X-Forwarded-Proto": "https, http"},
        {"X-Forwarded-Proto": ""},
        {"Forwarded": "proto=http"},
        {"Forwarded": "for=192.0.2.1"},
        {"X-Forwarded-Proto": "https", "Forwarded": "proto=http"},  # every header must agree
        {"X-Forwarded-Ssl": "on"},
    ):
        assert await admin_status(gateway, {**token, **bad}) == 403, bad
    assert counted("gateway_errors_total", code="admin_tls_required") - before == 8


@pytest.mark.parametrize("settings_overrides", [{**TLS, **LIMITED}])
async def test_the_tls_refusal_comes_before_the_token(gateway: Gateway, tenant: Tenant) -> None:
    # Without TLS the token is never looked at: no token, a wrong one, a route that would be
    # 404 or 405 all get 403, and none of it counts as a failed authentication.
    for _ in range(LIMIT + 2):
        assert await admin_status(gateway, {}) == 403
        assert await admin_status(gateway, {"Authorization": "Bearer wrong"}) == 403
        assert await admin_status(gateway, {}, "/no/such/route") == 403
    assert len(gateway.app[AUTH_GUARD]) == 0
    https = {"X-Forwarded-Proto": "https"}
    assert await admin_status(gateway, https) == 401
    assert await admin_status(gateway, {**https, "Authorization": f"Bearer {ADMIN}"}) == 200
    status, body, _ = await get(
        gateway, "/admin/v1/no/such/route", {**https, "Authorization": f"Bearer {ADMIN}"}
    )
    assert (status, body["error"]["code"]) == (404, "not_found")
    # Customer endpoints are not the admin API.
    status, _, _ = await get(gateway, "/v1/models", {"Authorization": f"Bearer {tenant.key}"})
    assert status == 200


async def test_admin_without_the_setting_needs_no_proxy(gateway: Gateway) -> None:
    assert await admin_status(gateway, {"Authorization": f"Bearer {ADMIN}"}) == 200


# -- one address, many customers (a NAT) -----------------------------------------------------------

FLOOD = 300
FLOOD_IN_FLIGHT = 16


def wrong_key(i: int) -> dict[str, str]:
    """A well-formed key the store never issued (as a misconfigured script or a guesser sends)."""
    secret, _prefix = new_secret()
    return {"Authorization": f"Bearer {secret}"}


async def test_a_flood_of_wrong_keys_refuses_no_valid_credential_and_costs_no_lookups(
    gateway: Gateway, node_b: Gateway, tenant: Tenant
) -> None:
    """300 wrong keys from one address (the default limit: 60 a minute), then a key issued on
    another node after the flood, which this node has never seen, and the admin token, from the
    same address: both served at once. The wrong keys past the limit get 429 without a lookup."""
    store, digests = gateway.store, gateway.node.view.digests
    lookups, reads = store.lookups, digests.reads
    loop = asyncio.get_running_loop()
    began = loop.time()
    gate = asyncio.Semaphore(FLOOD_IN_FLIGHT)

    async def one(i: int) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with gate:
            return await handshake(gateway, wrong_key(i))

    answers = await asyncio.gather(*(one(i) for i in range(FLOOD)))
    took = loop.time() - began
    limit = gateway.node.settings.auth_failures_per_minute
    refilled = took * limit / 60
    unlimited = [a for a in answers if a[1]["error"]["code"] == "invalid_api_key"]
    for status, body, headers in answers:
        if body["error"]["code"] != "invalid_api_key":
            assert_limited(status, body, headers)
    looked_up, log_reads = store.lookups - lookups, digests.reads - reads
    print(
        f"\n{FLOOD} wrong keys in {took:.2f} s ({FLOOD / took:.0f}/s), {len(unlimited)} answered "
        f"401: {looked_up} secret lookups ({looked_up / took:.0f}/s), {log_reads} reads of "
        f"the digest log ({log_reads / took:.0f}/s)"
    )
    # The failures the limit allows (those in flight when it ran out included) are looked up;
    # past it, none is. The digest log is read at most once per spacing, and once more for the
    # read in flight when the flood began.
    assert len(unlimited) <= limit + refilled + FLOOD_IN_FLIGHT
    assert looked_up == len(unlimited)
    assert log_reads <= took / digests.SYNC_SPACING_SECONDS + 2

    # A key issued on node B after the flood: node A has never seen it.
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        url = node_b.url("/admin/v1/keys")
        async with http.post(url, json={"team_id": tenant.team.id}, headers=headers) as resp:
            assert resp.status == 201
            fresh = (await resp.json())["key"]
    began = loop.time()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {fresh}"}
        )
        served = loop.time() - began
        await assert_usable(ws)
        await ws.close()
    status, _, _ = await get(gateway, "/admin/v1/teams", headers)
    assert status == 200
    # And the tenant's older key, over HTTP.
    status, _, _ = await get(gateway, "/v1/models", {"Authorization": f"Bearer {tenant.key}"})
    assert status == 200
    print(f"a key issued on node B after the flood, served by node A in {served * 1000:.0f} ms")
    assert_limited(*await handshake(gateway, wrong_key(0)))  # the flood is still refused


async def test_keys_issued_before_the_digest_log_existed_are_known(
    gateway: Gateway, tenant: Tenant
) -> None:
    """A store written by an older gateway has no digest log: the first node to read it logs
    every key's digests (the current secret and those in a rotation's grace) before it trusts
    the log to refuse anything."""
    store = gateway.store
    key = await store.get_key(tenant.key_id)
    assert key is not None
    _rotated, _before, new = await store.rotate_key(key.id, 3600)
    await store.redis.delete(store.g("digests"), store.g("digests:complete"))
    view = NodeView(store)  # a node starting on that store
    await view.start()
    try:
        for secret in (tenant.key, new):
            assert await view.may_be_issued(secret)
        assert not await view.may_be_issued(new_secret()[0])
        assert not await view.may_be_issued(None)
    finally:
        await view.stop()
