"""The admin API of CONTRACT.md §5 on one node: every route's happy path, wrong token, malformed
body and unknown id; the audit rows; the OpenAPI document; the customer's `GET /v1/models`; and a
grep proving a key's secret shows up nowhere but in the answer that created it."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import (
    MODEL,
    Connect,
    Gateway,
    Sim,
    Tenant,
    eventually,
    gateway_settings,
    make_tenant,
    turn,
)
from test_ws_handshake import assert_http_error, handshake

from app.admin.api import PREFIX, ROUTES
from app.admin.openapi import OPS
from app.metrics import REGISTRY
from app.server import create_app

TOKEN = "admin-test-token"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
TEAM = {"id": "blue", "name": "Blue", "allowed_models": ["openai/gpt-*"]}


@dataclass
class Admin:
    http: aiohttp.ClientSession
    gateway: Gateway

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None if body is None else orjson.dumps(body)
        url = self.gateway.url(path if path.startswith("/v1/") else PREFIX + path)
        async with self.http.request(method, url, data=data, headers=hdrs) as resp:
            text = await resp.read()
            value = orjson.loads(text) if text else None
            return resp.status, value

    async def ok(
        self,
        method: str,
        path: str,
        body: Any = None,
        status: int = 200,
        *,
        token: str | None = TOKEN,
    ) -> Any:
        got, value = await self.call(method, path, body, token=token)
        assert got == status, value
        return value

    async def error(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        param: str | None = None,
        token: str | None = TOKEN,
    ) -> dict[str, Any]:
        got, value = await self.call(method, path, body, raw=raw, token=token)
        assert got == status, value
        assert_http_error(value, code)
        if param is not None:
            assert value["error"]["param"] == param, value
        return dict(value["error"])


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[Admin]:
    async with aiohttp.ClientSession() as http:
        yield Admin(http, gateway)


def errors_counted(code: str) -> float:
    return REGISTRY.get_sample_value("gateway_errors_total", {"code": code}) or 0.0


def concrete(path: str) -> str:
    return (
        path.replace("{team_id}", "acme")
        .replace("{key_id}", "key_x")
        .replace("{provider}", "openai")
        .replace("{model}", "gpt-test")
    )


# -- the token ------------------------------------------------------------------------------------


# 105 wrong tokens from one address: past GATEWAY_AUTH_FAILURES_PER_MINUTE they would get 429
# (tests/test_guard.py); this test is about the order of the answers, so the limit is off.
@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_AUTH_FAILURES_PER_MINUTE": 0}])
async def test_every_admin_path_needs_the_token_before_404_405_and_400(admin: Admin) -> None:
    cases = [(m, concrete(p)) for m, p, _ in ROUTES] + [
        ("GET", "/no/such/route"),  # would be 404
        ("DELETE", "/teams"),  # would be 405
        ("PATCH", "/keys/key_x"),  # would be 405
        ("POST", "/keys"),  # no body: would be 400
        ("GET", ""),  # /admin/v1 itself
    ]
    before = errors_counted("invalid_admin_token")
    for method, path in cases:
        for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
            got, body = await admin.call(method, path, raw=b"{nope", token=token)
            assert got == 401, (method, path, token, body)
            assert_http_error(body, "invalid_admin_token")
            assert body["error"]["type"] == "authentication_error"
    assert errors_counted("invalid_admin_token") - before == len(cases) * 5
    # With the token, the same requests reach routing and validation.
    await admin.error("GET", "/no/such/route", 404, "not_found")
    await admin.error("DELETE", "/teams", 405, "method_not_allowed")
    await admin.error("POST", "/keys", 400, "invalid_request", raw=b"")


async def test_a_customer_key_is_not_an_admin_token(admin: Admin, tenant: Tenant) -> None:
    await admin.error("GET", "/teams", 401, "invalid_admin_token", token=tenant.key)


@pytest.mark.parametrize("settings_overrides", [{"ADMIN_TOKEN": None}])
async def test_without_an_admin_token_configured_the_api_is_closed(admin: Admin) -> None:
    for token in (TOKEN, "", "None", None):
        await admin.error("GET", "/teams", 401, "invalid_admin_token", token=token)


# -- teams ----------------------------------------------------------------------------------------


async def test_teams_create_replace_read_disable_enable(admin: Admin) -> None:
    created = await admin.ok("POST", "/teams", TEAM, status=201)
    assert created == {
        "id": "blue",
        "name": "Blue",
        "active": True,
        "allowed_models": ["openai/gpt-*"],
        "upstream_credential": "OPENAI_API_KEY",
        "limits": {
            "sockets_per_key": 0,
            "sockets_per_team": 0,
            "responses_per_minute_per_key": 0,
            "tokens_per_minute_per_key": 0,
            "usd_per_day_per_key": 0.0,
            "usd_per_day_per_team": 0.0,
            "usd_per_month_per_team": 0.0,
        },
    }
    assert await admin.ok("GET", "/teams/blue") == created
    disabled = await admin.ok("POST", "/teams/blue/disable")
    assert disabled["active"] is False
    # A replace without `active` keeps the team disabled; limits and credential are replaced.
    replaced = await admin.ok(
        "POST",
        "/teams",
        {**TEAM, "limits": {"sockets_per_key": 2}, "upstream_credential": "BLUE_OPENAI_KEY"},
    )
    assert replaced["active"] is False
    assert replaced["limits"]["sockets_per_key"] == 2
    assert replaced["upstream_credential"] == "BLUE_OPENAI_KEY"
    assert (await admin.ok("POST", "/teams/blue/enable"))["active"] is True
    await admin.ok("POST", "/teams", {"id": "red", "allowed_models": [], "active": False}, 201)
    listing = await admin.ok("GET", "/teams")
    assert listing["object"] == "list"
    assert [t["id"] for t in listing["data"]] == ["blue", "red"]
    assert listing["data"][1]["name"] == "red" and listing["data"][1]["active"] is False


def _team(**fields: Any) -> dict[str, Any]:
    return {"id": "a", "allowed_models": [], **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "allowed_models": []}, "id"),
        (_team(id="a b"), "id"),
        (_team(allowed_models="openai/*"), "allowed_models"),
        (_team(allowed_models=[1]), "allowed_models[0]"),
        (_team(limits={"sockets_per_kee": 1}), "limits.sockets_per_kee"),
        (_team(limits={"sockets_per_key": "1"}), "limits.sockets_per_key"),
        (_team(limits={"sockets_per_key": -1}), "limits.sockets_per_key"),
        (_team(limits={"sockets_per_key": 1.5}), "limits.sockets_per_key"),
        (_team(limits=[1]), "limits"),
        (_team(active="yes"), "active"),
        (_team(upstream_credential="sk-live-123"), "upstream_credential"),
        (_team(colour="blue"), "colour"),
        ([TEAM], None),
        ("team", None),
    ],
)
async def test_teams_malformed_body(admin: Admin, body: Any, param: str | None) -> None:
    err = await admin.error("POST", "/teams", 400, "invalid_request", body)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"[" * 5000, b'{"id":"a",}'])
async def test_teams_body_not_json(admin: Admin, raw: bytes) -> None:
    await admin.error("POST", "/teams", 400, "invalid_request", raw=raw)
    assert (await admin.ok("GET", "/teams"))["data"] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/teams/nope"), ("POST", "/teams/nope/disable"), ("POST", "/teams/nope/enable")],
)
async def test_teams_unknown_id(admin: Admin, method: str, path: str) -> None:
    err = await admin.error(method, path, 404, "not_found")
    assert "nope" in err["message"]


# -- keys -----------------------------------------------------------------------------------------


async def test_keys_create_list_get(admin: Admin, tenant: Tenant) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    created = await admin.ok(
        "POST", "/keys", {"team_id": "acme", "name": "ci", "expires_at": expires}, 201
    )
    assert set(created) == {"id", "key", "prefix", "team_id", "name", "created_at", "expires_at"}
    assert created["key"].startswith(created["prefix"] + "_")
    assert created["team_id"] == "acme" and created["name"] == "ci"
    assert RFC3339.match(created["created_at"]) and RFC3339.match(created["expires_at"])
    assert datetime.fromisoformat(created["expires_at"]) == datetime.fromisoformat(expires)
    bare = await admin.ok("POST", "/keys", {"team_id": "acme"}, 201)
    assert bare["expires_at"] is None and bare["name"] == ""

    listing = await admin.ok("GET", "/keys?team_id=acme")
    assert listing["object"] == "list"
    ids = [k["id"] for k in listing["data"]]
    assert set(ids) == {tenant.key_id, created["id"], bare["id"]}
    for item in listing["data"]:
        assert "key" not in item and "secret_hash" not in item and "old_secrets" not in item
        assert item["status"] == "active" and item["revoked"] is False
    assert created["key"] not in orjson.dumps(listing).decode()
    one = await admin.ok("GET", f"/keys/{created['id']}")
    assert one["prefix"] == created["prefix"] and one["name"] == "ci"

    await admin.ok("POST", "/teams", {"id": "other", "allowed_models": []}, 201)
    assert (await admin.ok("GET", "/keys?team_id=other"))["data"] == []
    assert len((await admin.ok("GET", "/keys"))["data"]) == 3


async def test_keys_create_checks(admin: Admin, tenant: Tenant) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    for expires in (past, datetime.now(UTC).isoformat(), "2030-01-01T00:00:00", "soon", 5):
        body: dict[str, Any] = {"team_id": "acme", "expires_at": expires}
        await admin.error("POST", "/keys", 400, "invalid_request", body, param="expires_at")
    await admin.error("POST", "/keys", 400, "invalid_request", {"name": "x"}, param="team_id")
    await admin.error("POST", "/keys", 400, "invalid_request", {"team_id": 7}, param="team_id")
    body = {"team_id": "acme", "name": ["x"]}
    await admin.error("POST", "/keys", 400, "invalid_request", body, param="name")
    body = {"team_id": "acme", "secret": "mine"}
    await admin.error("POST", "/keys", 400, "invalid_request", body, param="secret")
    await admin.error("POST", "/keys", 400, "invalid_request", raw=b"team_id=acme")
    err = await admin.error("POST", "/keys", 404, "not_found", {"team_id": "ghost"})
    assert err["param"] == "team_id"
    await admin.error("GET", "/keys?team_id=ghost", 404, "not_found", param="team_id")
    await admin.error("GET", "/keys/key_ghost", 404, "not_found")


async def test_keys_rotate_and_revoke(admin: Admin, gateway: Gateway, tenant: Tenant) -> None:
    old = await gateway.store.get_key(tenant.key_id)
    assert old is not None
    rotated = await admin.ok("POST", f"/keys/{tenant.key_id}/rotate", {"grace_seconds": 60})
    assert set(rotated) == {"id", "key", "prefix", "team_id", "name", "created_at", "expires_at"}
    assert rotated["id"] == tenant.key_id
    assert rotated["key"] != tenant.key and rotated["prefix"] != old.prefix
    info = await admin.ok("GET", f"/keys/{tenant.key_id}")
    assert info["prefix"] == rotated["prefix"]
    until = datetime.fromisoformat(info["grace_until"])
    assert timedelta(seconds=55) < until - datetime.now(UTC) <= timedelta(seconds=60)
    # No body: the default grace of a day.
    again = await admin.ok("POST", f"/keys/{tenant.key_id}/rotate")
    info = await admin.ok("GET", f"/keys/{tenant.key_id}")
    assert datetime.fromisoformat(info["grace_until"]) - datetime.now(UTC) > timedelta(hours=23)
    # All three secrets work for now.
    for secret in (tenant.key, rotated["key"], again["key"]):
        assert await admin.ok("GET", "/v1/models", token=secret)

    revoked = await admin.ok("POST", f"/keys/{tenant.key_id}/revoke")
    assert revoked["revoked"] is True and revoked["status"] == "revoked"
    assert RFC3339.match(revoked["revoked_at"])
    assert (await admin.ok("POST", f"/keys/{tenant.key_id}/revoke"))["revoked_at"] == revoked[
        "revoked_at"
    ]
    await admin.error("POST", f"/keys/{tenant.key_id}/rotate", 400, "invalid_request", {})


@pytest.mark.parametrize(
    "raw",
    [
        b'{"grace_seconds":-1}',
        b'{"grace_seconds":"60"}',
        b'{"grace_seconds":1.5}',
        b'{"grace_seconds":true}',
        b'{"grace_seconds":null}',
        b'{"grace_seconds":999999999999}',
        b'{"grace":60}',
        b"[60]",
        b"{",
    ],
)
async def test_keys_rotate_malformed_body(admin: Admin, tenant: Tenant, raw: bytes) -> None:
    err = await admin.error(
        "POST", f"/keys/{tenant.key_id}/rotate", 400, "invalid_request", raw=raw
    )
    if raw.startswith(b'{"grace_seconds"'):
        assert err["param"] == "grace_seconds"
    key = await tenant.store.get_key(tenant.key_id)
    assert key is not None and not key.old_secrets  # nothing rotated


@pytest.mark.parametrize("action", ["rotate", "revoke"])
async def test_keys_unknown_id(admin: Admin, action: str) -> None:
    await admin.error("POST", f"/keys/key_ghost/{action}", 404, "not_found", {})


# -- the model catalog ----------------------------------------------------------------------------


async def test_models_set_list_delete(admin: Admin) -> None:
    price = await admin.ok(
        "PUT", "/models/openai/gpt-5.1", {"input_per_mtok": 1.25, "output_per_mtok": 10}
    )
    assert price == {
        "id": "openai/gpt-5.1",
        "object": "model",
        "input_per_mtok": 1.25,
        "cached_input_per_mtok": 1.25,
        "output_per_mtok": 10.0,
    }
    body = {"input_per_mtok": 2, "cached_input_per_mtok": 0.2, "output_per_mtok": 8}
    price = await admin.ok("PUT", "/models/openai/gpt-mini", body)
    assert price["cached_input_per_mtok"] == 0.2
    listing = await admin.ok("GET", "/models")
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["openai/gpt-5.1", "openai/gpt-mini"]
    assert await admin.ok("GET", "/models/openai/gpt-mini") == price
    gone = await admin.ok("DELETE", "/models/openai/gpt-5.1")
    assert gone == {"id": "openai/gpt-5.1", "object": "model", "deleted": True}
    assert [m["id"] for m in (await admin.ok("GET", "/models"))["data"]] == ["openai/gpt-mini"]
    await admin.error("DELETE", "/models/openai/gpt-5.1", 404, "not_found")
    await admin.error("GET", "/models/openai/gpt-5.1", 404, "not_found")


def _price(**fields: Any) -> dict[str, Any]:
    return {"input_per_mtok": 1, "output_per_mtok": 1, **fields}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"output_per_mtok": 1}, "input_per_mtok"),
        (_price(input_per_mtok="1.25"), "input_per_mtok"),
        (_price(input_per_mtok=True), "input_per_mtok"),
        (_price(input_per_mtok=-1), "input_per_mtok"),
        (_price(output_per_mtok=None), "output_per_mtok"),
        (_price(cached_input_per_mtok=-0.5), "cached_input_per_mtok"),
        (_price(reasoning_per_mtok=1), "reasoning_per_mtok"),
        ([1, 2], None),
    ],
)
async def test_models_malformed_body(admin: Admin, body: Any, param: str | None) -> None:
    err = await admin.error("PUT", "/models/openai/gpt-x", 400, "invalid_request", body)
    assert err["param"] == param
    assert (await admin.ok("GET", "/models"))["data"] == []


async def test_models_provider_must_be_openai(admin: Admin) -> None:
    body = {"input_per_mtok": 1, "output_per_mtok": 1}
    await admin.error(
        "PUT", "/models/anthropic/claude", 400, "invalid_request", body, param="provider"
    )
    await admin.error(
        "PUT", "/models/openai/bad%20name", 400, "invalid_request", body, param="model"
    )
    await admin.error(
        "DELETE", "/models/anthropic/claude", 400, "invalid_request", param="provider"
    )


# -- sessions -------------------------------------------------------------------------------------


async def test_sessions_lists_live_sockets(admin: Admin, connect: Connect, tenant: Tenant) -> None:
    assert (await admin.ok("GET", "/sessions")) == {"object": "list", "data": []}
    async with connect("/v1/responses?model=gpt-test") as ws:
        await turn(ws)
        data = (await admin.ok("GET", "/sessions"))["data"]
        assert len(data) == 1
        session = data[0]
        assert {"id", "node", "key_prefix", "team_id", "model", "opened_at", "turns"} <= set(
            session
        )
        assert session["team_id"] == "acme" and session["node"] == admin.gateway.node.id
        assert tenant.key.startswith(session["key_prefix"])
        assert session["model"] == MODEL
        assert RFC3339.match(session["opened_at"])

    async def no_sessions_listed() -> bool:
        return bool((await admin.ok("GET", "/sessions"))["data"] == [])

    await eventually(no_sessions_listed, timeout=1)


# -- the OpenAPI document -------------------------------------------------------------------------


async def test_openapi_document_covers_every_route(admin: Admin) -> None:
    doc = await admin.ok("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    registered = {(m, PREFIX + p) for m, p, _ in ROUTES}
    assert documented == registered
    assert {(o.method, PREFIX + o.path) for o in OPS} == registered
    schemas = doc["components"]["schemas"]
    text = orjson.dumps(doc).decode()
    for ref in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert ref in schemas, ref
    for ref in set(re.findall(r'"#/components/responses/([^"]+)"', text)):
        assert ref in doc["components"]["responses"], ref
    team_body = doc["paths"]["/admin/v1/teams"]["post"]["requestBody"]
    assert team_body["content"]["application/json"]["schema"]["$ref"].endswith("/TeamRequest")
    assert set(schemas["TeamRequest"]["required"]) == {"id", "allowed_models"}
    assert set(schemas["Limits"]["properties"]) == {
        "sockets_per_key",
        "sockets_per_team",
        "responses_per_minute_per_key",
        "tokens_per_minute_per_key",
        "usd_per_day_per_key",
        "usd_per_day_per_team",
        "usd_per_month_per_team",
    }
    assert schemas["Limits"]["additionalProperties"] is False
    assert "key" in schemas["KeyCreated"]["properties"]
    assert "key" not in schemas["KeyInfo"]["properties"]


# -- audit ----------------------------------------------------------------------------------------


async def test_every_write_is_recorded(admin: Admin, gateway: Gateway, database_url: str) -> None:
    actor = {"X-Admin-Actor": "alice@ops"}
    await admin.call(
        "POST", "/teams", {"id": "audit", "allowed_models": ["openai/*"]}, headers=actor
    )
    _, key = await admin.call("POST", "/keys", {"team_id": "audit"})
    key_id = key["id"]
    await admin.call("POST", f"/keys/{key_id}/rotate", {"grace_seconds": 5})
    await admin.call("POST", f"/keys/{key_id}/revoke")
    await admin.call("POST", "/teams/audit/disable")
    await admin.call("POST", "/teams/audit/enable")
    await admin.call("POST", "/teams", {"id": "audit", "allowed_models": []})
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    await admin.call("PUT", "/models/openai/audit-model", price)
    await admin.call("DELETE", "/models/openai/audit-model")
    await admin.call("POST", "/teams/ghost/disable")  # refused: not recorded
    await admin.call("GET", "/teams")  # a read: not recorded
    assert await gateway.node.ledger.flushed(timeout=5)

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT actor, remote_addr, action, target, details::text AS details, at"
            " FROM admin_actions WHERE target IN ($1, $2, $3) ORDER BY at",
            "audit",
            key_id,
            "openai/audit-model",
        )
    finally:
        await conn.close()
    assert [(r["action"], r["target"]) for r in rows] == [
        ("team.create", "audit"),
        ("key.create", key_id),
        ("key.rotate", key_id),
        ("key.revoke", key_id),
        ("team.disable", "audit"),
        ("team.enable", "audit"),
        ("team.replace", "audit"),
        ("model.set", "openai/audit-model"),
        ("model.delete", "openai/audit-model"),
    ]
    assert rows[0]["actor"] == "alice@ops"
    assert {r["actor"] for r in rows[1:]} == {"admin-token"}
    assert {r["remote_addr"] for r in rows} == {"127.0.0.1"}
    rotate = orjson.loads(rows[2]["details"])
    assert rotate["grace_seconds"] == 5 and rotate["old_prefix"] == key["prefix"]
    everything = " ".join(r["details"] for r in rows)
    assert key["key"] not in everything


# -- Redis away -----------------------------------------------------------------------------------


async def test_redis_unreachable_is_503(
    aiohttp_server: Any, database_url: str, sim: Sim, tmp_path: Path
) -> None:
    settings = gateway_settings(
        "redis://127.0.0.1:1/0", "gwtest:none", database_url, sim.base_url, tmp_path
    )
    server = await aiohttp_server(create_app(settings))
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for method, path, body in [
            ("GET", "/teams", None),
            ("POST", "/teams", TEAM),
            ("POST", "/keys", {"team_id": "blue"}),
            ("PUT", "/models/openai/x", {"input_per_mtok": 1, "output_per_mtok": 1}),
            ("GET", "/sessions", None),
        ]:
            url = server.make_url(PREFIX + path)
            async with http.request(method, url, json=body, headers=auth) as resp:
                assert resp.status == 503, (method, path)
                assert_http_error(await resp.json(), "service_unavailable")
        # The token still comes first.
        async with http.get(server.make_url(PREFIX + "/teams")) as resp:
            assert resp.status == 401


# -- the customer's model list --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/v1/gateway/models"])
async def test_customer_models(admin: Admin, gateway: Gateway, tenant: Tenant, path: str) -> None:
    # acme may route openai/gpt-*; the catalog also prices a model it may not route.
    await admin.ok("PUT", "/models/openai/o3", {"input_per_mtok": 1, "output_per_mtok": 1})
    body = await admin.ok("GET", path, token=tenant.key)
    assert body == {
        "object": "list",
        "data": [
            {"id": "openai/gpt-other", "object": "model", "created": 0, "owned_by": "openai"},
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "openai"},
        ],
    }
    # A removed price disappears from the list; an allowed but unpriced model never shows.
    await admin.ok("DELETE", "/models/openai/gpt-other")
    body = await admin.ok("GET", path, token=tenant.key)
    assert [m["id"] for m in body["data"]] == [MODEL]
    # A team whose upstream credential is not set on this node can be served nothing here.
    other = await make_tenant(
        gateway.store, "nocred", credential="GWTEST_UNSET_CREDENTIAL", prices=()
    )
    body = await admin.ok("GET", path, token=other.key)
    assert body == {"object": "list", "data": []}


async def test_customer_models_refusals(admin: Admin, tenant: Tenant) -> None:
    await admin.error("GET", "/v1/models", 401, "invalid_api_key", token=None)
    await admin.error("GET", "/v1/models", 401, "invalid_api_key", token="sk-gw-nope_nope")
    await admin.error("GET", "/v1/models", 401, "invalid_api_key", token=TOKEN)
    assert (await admin.ok("GET", "/v1/models/openai/gpt-test", token=tenant.key))["id"] == MODEL
    await admin.error("GET", "/v1/models/openai/gpt-none", 404, "not_found", token=tenant.key)
    await admin.ok("POST", "/teams/acme/disable")
    await admin.error("GET", "/v1/models", 403, "team_disabled", token=tenant.key)
    await admin.ok("POST", "/teams/acme/enable")
    await admin.ok("POST", f"/keys/{tenant.key_id}/revoke")
    await admin.error("GET", "/v1/gateway/models", 401, "api_key_revoked", token=tenant.key)


# -- the secret stays secret ----------------------------------------------------------------------


async def test_the_secret_appears_nowhere_but_its_answer(
    admin: Admin, gateway: Gateway, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await admin.ok("POST", "/keys", {"team_id": "acme", "name": "grep"}, 201)
    rotated = await admin.ok("POST", f"/keys/{created['id']}/rotate", {"grace_seconds": 30})
    secrets = [tenant.key, created["key"], rotated["key"]]
    for secret in secrets:
        async with aiohttp.ClientSession() as http:
            url = gateway.url("/v1/responses")
            headers = {"Authorization": f"Bearer {secret}"}
            async with http.ws_connect(url, headers=headers) as ws:
                await turn(ws)
    status, _, _ = await handshake(gateway, {"Authorization": f"Bearer {secrets[1]}x"})
    assert status == 401
    listings = [
        await admin.ok("GET", "/keys"),
        await admin.ok("GET", "/sessions"),
        await admin.ok("GET", f"/keys/{created['id']}"),
        await admin.ok("GET", "/teams"),
    ]
    redis = gateway.store.redis
    values: list[bytes] = []
    async for name in redis.scan_iter(match=gateway.store.prefix + ":*"):
        kind = await redis.type(name)
        if kind == b"string":
            values.append(_bytes(await redis.get(name) or b""))
        elif kind == b"hash":
            values.extend(_bytes(v) for kv in (await redis.hgetall(name)).items() for v in kv)
        elif kind == b"set":
            values.extend(map(_bytes, await redis.smembers(name)))
        elif kind == b"zset":
            values.extend(_bytes(v) for v in await redis.zrange(name, 0, -1))
        values.append(_bytes(name))
    haystacks = {
        "logs": "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records),
        "redis": b"\n".join(values).decode(errors="replace"),
        "listings": orjson.dumps(listings).decode(),
    }
    assert values and caplog.records
    for secret in secrets:
        _, _, tail = secret.partition("_")
        for where, text in haystacks.items():
            assert secret not in text, where
            assert tail not in text, where


def _bytes(value: object) -> bytes:
    """A Redis reply as bytes (the store's client does not decode, but its types allow more)."""
    assert isinstance(value, bytes | str), value
    return value.encode() if isinstance(value, str) else value
