"""No secret anywhere (CONTRACT.md §4, §6): after a run of turns (refusals, upstream
faults, the HTTP fallback, a retry), admin calls, a key rotation and a revocation, every place the
gateway writes to is searched for the gateway keys' secrets, the upstream keys and the admin token:
its log records (every logger, at DEBUG), `/metrics`, every ledger row in Postgres, the spill dir
(with a second node whose Postgres is away, so rows really are spilled), Redis, and every frame,
HTTP body and header a client received. The only place a gateway key may appear is the admin
answer that created or rotated it; the upstream keys reach no customer, not even the part of a
wrong one that OpenAI's 401 quotes (its first 8 and last 4 characters)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import (
    MODEL,
    UPSTREAM_KEY,
    Gateway,
    Sim,
    Tenant,
    create,
    gateway_settings,
)
from services import free_port

from app.logs import JsonFormatter
from app.server import create_app
from app.simulator.errors import masked_key

ADMIN_TOKEN = "admin-test-token"  # conftest's gateway_settings
TEAM_CREDENTIAL = "GW_TEST_BLUE_UPSTREAM_KEY"
TEAM_UPSTREAM_KEY = "sk-blue-upstream-9f8e7d6c5b4a"
# A key the upstream refuses (the simulator's 401 faults, which quote the key sent as OpenAI does).
# Its last 4 characters cannot occur by chance in ids, numbers or hex.
RED_CREDENTIAL = "GW_TEST_RED_UPSTREAM_KEY"
RED_UPSTREAM_KEY = "sk-proj-red-upstream-wrong-5tQ-XZ"
TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Client:
    """A customer and an operator on one HTTP session; remembers everything they received."""

    http: aiohttp.ClientSession
    gateway: Gateway
    received: list[str] = field(default_factory=list)  # frames, bodies, headers
    issued: list[str] = field(default_factory=list)  # the admin answers that carry a new key

    def _keep(self, status: int, headers: Any, body: bytes) -> None:
        self.received.append(f"{status} {dict(headers)!r}")
        self.received.append(body.decode(errors="replace"))

    async def admin(
        self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}", "X-Admin-Actor": "secrets-test"}
        url = self.gateway.url("/admin/v1" + path)
        async with self.http.request(method, url, json=body, headers=headers) as resp:
            raw = await resp.read()
            value = orjson.loads(raw) if raw else None
            if isinstance(value, dict) and "key" in value:
                self.issued.append(raw.decode())  # shown once, by design
            else:
                self._keep(resp.status, resp.headers, raw)
            return value

    async def http_call(self, method: str, path: str, key: str, body: Any = None) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        url = self.gateway.url(path)
        async with self.http.request(method, url, json=body, headers=headers) as resp:
            self._keep(resp.status, resp.headers, await resp.read())
            return resp.status

    async def handshake_refused(self, key: str) -> int:
        url = self.gateway.url("/v1/responses")
        hdrs = {
            "Authorization": f"Bearer {key}",
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        async with self.http.get(url, headers=hdrs) as resp:
            self._keep(resp.status, resp.headers, await resp.read())
            return resp.status

    async def socket(self, key: str) -> Socket:
        ws = await self.http.ws_connect(
            self.gateway.url("/v1/responses"),
            headers={"Authorization": f"Bearer {key}"},
            max_msg_size=0,
        )
        self.received.append(repr(dict(ws._response.headers)))
        return Socket(ws, self.received)


@dataclass
class Socket:
    ws: aiohttp.ClientWebSocketResponse
    received: list[str]

    async def recv(self) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=10)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            self.received.append(f"close {self.ws.close_code} {msg.extra!r}")
            return {"type": "closed", "code": self.ws.close_code}
        self.received.append(msg.data)
        value = orjson.loads(msg.data)
        assert isinstance(value, dict)
        return value

    async def turn(self, **fields: Any) -> dict[str, Any]:
        await self.ws.send_str(orjson.dumps(create(**fields)).decode())
        while True:
            event = await self.recv()
            if event["type"] in ("response.completed", "response.failed", "error", "closed"):
                return event

    async def refused(self, frame: dict[str, Any] | str) -> dict[str, Any]:
        await self.ws.send_str(frame if isinstance(frame, str) else orjson.dumps(frame).decode())
        return await self.recv()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        yield Client(http, gateway)


def log_text(records: list[logging.LogRecord]) -> str:
    """Every field of every record, and each record as the JSON log line `serve` would print."""
    formatter = JsonFormatter()
    lines = []
    for record in records:
        lines.append(repr(record.__dict__))
        lines.append(record.getMessage())
        lines.append(formatter.format(record))
    return "\n".join(lines)


async def ledger_text(database_url: str) -> tuple[str, dict[str, int]]:
    conn = await asyncpg.connect(database_url)
    try:
        counts: dict[str, int] = {}
        parts: list[str] = []
        for table in ("sockets", "turns", "admin_actions"):
            rows = await conn.fetch(f"SELECT * FROM {table}")
            counts[table] = len(rows)
            parts += [repr(dict(r)) for r in rows]
        return "\n".join(parts), counts
    finally:
        await conn.close()


def files_text(root: Path) -> tuple[str, int]:
    """Every file under `root`, as text; and how many of them held anything."""
    parts = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            parts.append(f"{path}\n{path.read_bytes().decode(errors='replace')}")
    return "\n".join(parts), sum(1 for p in parts if p.count("\n") > 1 or len(p) > 200)


async def redis_text(gateway: Gateway) -> str:
    redis = gateway.store.redis
    values: list[Any] = []
    async for name in redis.scan_iter(match=gateway.store.prefix + ":*"):
        kind = await redis.type(name)
        if kind == b"string":
            values.append(await redis.get(name))
        elif kind == b"hash":
            values.extend(v for kv in (await redis.hgetall(name)).items() for v in kv)
        elif kind == b"set":
            values.extend(await redis.smembers(name))
        elif kind == b"zset":
            values.extend(await redis.zrange(name, 0, -1))
        values.append(name)
    return "\n".join(v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in values)


def needles(secret: str) -> list[str]:
    """A secret and, for a gateway key, its private tail (the prefix before `_` is public); for
    an upstream key, what OpenAI's 401 quotes of it: the masked form, its last 4 characters
    (after the mask) and, to be safe, its last 8."""
    _, sep, tail = secret.partition("_")
    if sep and secret.startswith("sk-gw-"):
        return [secret, tail]
    if secret in UPSTREAM_KEYS:
        found = [secret, masked_key(secret), "*" + secret[-4:], secret[-8:]]
        return found + ([secret[-4:]] if secret == RED_UPSTREAM_KEY else [])
    return [secret]


UPSTREAM_KEYS = (UPSTREAM_KEY, TEAM_UPSTREAM_KEY, RED_UPSTREAM_KEY)


async def wrong_upstream_key(client: Client, sim: Sim, monkeypatch: pytest.MonkeyPatch) -> str:
    """A team whose upstream key OpenAI refuses: over the WebSocket handshake, the HTTP fallback
    and the HTTP relay. OpenAI's 401 quotes the key masked; the customer sees none of it."""
    monkeypatch.setenv(RED_CREDENTIAL, RED_UPSTREAM_KEY)
    team = {
        "id": "red",
        "name": "Red",
        "allowed_models": ["openai/gpt-*"],
        "upstream_credential": RED_CREDENTIAL,
    }
    await client.admin("POST", "/teams", team)
    red = await client.admin("POST", "/keys", {"team_id": "red", "name": "red-1"})
    ws = await client.socket(red["key"])
    await sim.arm("401")
    refused = await ws.turn()
    assert refused["error"]["code"] == "upstream_websocket_handshake_failed", refused
    assert refused["error"]["message"] == (
        "Could not open the upstream WebSocket to OpenAI: "
        "upstream refused the handshake with HTTP 401."
    )
    # The silent close of a decimal temperature sends the turn over HTTP, which is refused: a
    # 502 of the gateway's own, as for the handshake (the customer's key is not the one refused).
    fallback = await ws.turn(temperature=0.5, metadata={"sim_http_fault": "status_401"})
    assert (fallback["status"], fallback["error"]["code"]) == (
        502,
        "upstream_websocket_handshake_failed",
    ), fallback
    assert "upstream credential (HTTP 401)" in fallback["error"]["message"]
    await ws.ws.close()
    wrong = {"model": MODEL, "input": "red", "metadata": {"sim_http_fault": "status_401"}}
    for body in (wrong, {**wrong, "stream": True}):
        assert await client.http_call("POST", "/v1/responses", red["key"], body) == 502
        assert "upstream credential (HTTP 401)" in client.received[-1]
    seen = [h["headers"].get("authorization") for h in await sim.handshakes()]
    assert f"Bearer {RED_UPSTREAM_KEY}" in seen  # the refused key did go upstream
    key: str = red["key"]
    return key


async def run_traffic(
    client: Client, gateway: Gateway, sim: Sim, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Turns, refusals, faults, admin calls, a rotation and a revocation; the new keys."""
    monkeypatch.setenv(TEAM_CREDENTIAL, TEAM_UPSTREAM_KEY)
    team = {
        "id": "blue",
        "name": "Blue",
        "allowed_models": ["openai/gpt-*"],
        "upstream_credential": TEAM_CREDENTIAL,
        "limits": {"sockets_per_key": 5},
    }
    assert (await client.admin("POST", "/teams", team))["id"] == "blue"
    blue = await client.admin("POST", "/keys", {"team_id": "blue", "name": "blue-1"})
    rotated = await client.admin("POST", f"/keys/{blue['id']}/rotate", {"grace_seconds": 60})
    doomed = await client.admin("POST", "/keys", {"team_id": "acme", "name": "doomed"})
    prices = {"input_per_mtok": 1, "output_per_mtok": 2}
    await client.admin("PUT", "/models/openai/gpt-extra", prices)
    await client.admin("GET", "/teams")
    await client.admin("GET", "/keys")
    await client.admin("GET", f"/keys/{blue['id']}")
    await client.admin("GET", "/openapi.json")
    await client.admin("GET", "/teams", token="wrong-admin-token")
    await client.admin("GET", "/teams", token=tenant.key)

    ws = await client.socket(tenant.key)
    first = await ws.turn(input="one two")
    assert first["type"] == "response.completed"
    assert (await ws.refused(create(model="gpt-test")))["error"][
        "code"
    ] == "invalid_response_create"
    assert (await ws.refused(create(temperature=9)))["error"]["param"] == "temperature"
    assert (await ws.refused(create(model="openai/o3")))["error"]["code"] == "openai_routing_failed"
    assert (await ws.refused("{not json"))["error"]["code"] == "invalid_response_create"
    retried = await ws.turn(
        previous_response_id=first["response"]["id"], metadata={"sim_fault": "forget"}
    )
    assert retried["type"] == "response.completed"
    for fault in ("close_1011", "drop", "error_no_status", "response_failed"):
        assert (await ws.turn(metadata={"sim_fault": fault}))["type"] in (
            "error",
            "response.failed",
        )
    assert (await ws.turn(temperature=0.5))["type"] == "response.completed"  # the HTTP fallback
    await sim.arm("401")  # the fallback's silent close took the upstream socket: a new one
    refused = await ws.turn()
    assert refused["error"]["code"] == "upstream_websocket_handshake_failed", refused
    assert (await ws.turn())["type"] == "response.completed"
    await client.admin("GET", "/sessions")

    old_blue = await client.socket(blue["key"])  # the rotated-out secret, within its grace
    assert (await old_blue.turn())["type"] == "response.completed"
    new_blue = await client.socket(rotated["key"])
    assert (await new_blue.turn(input="blue"))["type"] == "response.completed"

    live = await client.socket(doomed["key"])
    assert (await live.turn())["type"] == "response.completed"
    await client.admin("POST", f"/keys/{doomed['id']}/revoke")
    expelled = await live.recv()
    assert expelled.get("error", {}).get("code") == "api_key_revoked", expelled
    assert (await live.recv())["type"] == "closed"
    await client.admin("POST", "/teams/blue/disable")
    await client.admin("POST", "/teams/blue/enable")

    for key in (doomed["key"], rotated["key"] + "x", UPSTREAM_KEY, TEAM_UPSTREAM_KEY, ADMIN_TOKEN):
        assert await client.handshake_refused(key) == 401
    body = {"model": MODEL, "input": "over http"}
    assert await client.http_call("POST", "/v1/responses", tenant.key, body) == 200
    assert await client.http_call("POST", "/v1/responses", tenant.key, {**body, "stream": True})
    failing = {**body, "metadata": {"sim_http_fault": "status_500"}}
    assert await client.http_call("POST", "/v1/responses", tenant.key, failing) == 500
    assert await client.http_call("POST", "/v1/responses/compact", rotated["key"], body) == 200
    assert await client.http_call("GET", "/v1/models", rotated["key"]) == 200
    assert await client.http_call("GET", "/v1/models", UPSTREAM_KEY) == 401
    assert await client.http_call("POST", "/v1/responses", ADMIN_TOKEN, body) == 401
    for sock in (ws, old_blue, new_blue):
        await sock.ws.close()
    red = await wrong_upstream_key(client, sim, monkeypatch)
    return [tenant.key, blue["key"], rotated["key"], doomed["key"], red]


async def spill_with_postgres_away(
    aiohttp_server: Any,
    redis_url: str,
    redis_prefix: str,
    sim: Sim,
    tmp_path: Path,
    customer: Client,
) -> tuple[Path, list[str]]:
    """A second node whose Postgres never answers: its ledger rows go to its spill dir. What its
    client receives joins `customer`'s."""
    spill = tmp_path / "spill-away"
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/gateway"
    settings = gateway_settings(redis_url, redis_prefix, nowhere, sim.base_url, spill)
    server = await aiohttp_server(create_app(settings))
    away = Gateway(server, server.app)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, away)
        made = await client.admin("POST", "/keys", {"team_id": "acme", "name": "spilled"})
        ws = await client.socket(made["key"])
        assert (await ws.turn(input="spill me"))["type"] == "response.completed"
        assert (await ws.refused(create(temperature=5)))["type"] == "error"
        await client.admin("POST", f"/keys/{made['id']}/rotate", {"grace_seconds": 0})
        await ws.ws.close()
        await server.close()  # the ledger gives up on Postgres and spills what it holds
    customer.received += client.received
    customer.issued += client.issued
    return spill, [made["key"]]


async def test_no_secret_in_logs_metrics_ledger_spill_redis_or_answers(
    gateway: Gateway,
    sim: Sim,
    tenant: Tenant,
    client: Client,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    aiohttp_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("gateway", "app", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    keys = await run_traffic(client, gateway, sim, tenant, monkeypatch)
    away_spill, away_keys = await spill_with_postgres_away(
        aiohttp_server, redis_url, redis_prefix, sim, tmp_path, client
    )
    keys += away_keys
    async with client.http.get(gateway.url("/metrics")) as resp:
        metrics = await resp.text()
    assert await gateway.node.ledger.flushed(10)
    ledger, counts = await ledger_text(database_url)
    spill, spilled_files = files_text(tmp_path)
    haystacks = {
        "logs": log_text(caplog.records),
        "metrics": metrics,
        "ledger": ledger,
        "spill dir": spill,
        "redis": await redis_text(gateway),
        "customer": "\n".join(client.received),
    }
    # The search looks where the data is: each haystack holds what the run produced.
    assert len(caplog.records) > 50
    assert "gateway_responses_total" in metrics and "gateway_errors_total" in metrics
    assert counts["sockets"] >= 4 and counts["turns"] >= 15 and counts["admin_actions"] >= 7
    assert spilled_files >= 1 and any(away_spill.rglob("*.jsonl")), spill[:2000]
    assert keys[-1].partition("_")[0] in spill  # the spilled rows name the key by its prefix
    assert tenant.key.partition("_")[0] in haystacks["logs"]
    assert len(client.received) > 100 and client.issued
    secrets = {
        **{f"gateway key {i}": k for i, k in enumerate(keys)},
        "upstream key": UPSTREAM_KEY,
        "team upstream key": TEAM_UPSTREAM_KEY,
        "refused upstream key": RED_UPSTREAM_KEY,
        "admin token": ADMIN_TOKEN,
    }
    leaks = [
        f"{what} in {where}"
        for what, secret in secrets.items()
        for needle in needles(secret)
        for where, text in haystacks.items()
        if needle in text
    ]
    assert not leaks, leaks
    # Each new key was shown once, to the operator who made it (or rotated it), and nowhere else.
    for secret in keys[1:]:
        assert sum(secret in answer for answer in client.issued) == 1, secret


async def test_the_upstream_keys_go_upstream_and_never_to_the_customer(
    gateway: Gateway,
    sim: Sim,
    tenant: Tenant,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await run_traffic(client, gateway, sim, tenant, monkeypatch)
    seen = await sim.handshakes()
    used = {h["headers"].get("authorization") for h in seen}
    assert f"Bearer {UPSTREAM_KEY}" in used and f"Bearer {TEAM_UPSTREAM_KEY}" in used
    assert f"Bearer {RED_UPSTREAM_KEY}" in used
    for text in client.received:
        for secret in UPSTREAM_KEYS:
            for needle in [*needles(secret), secret.removeprefix("sk-"), secret[:8] + "*"]:
                assert needle not in text, needle
    team = await client.admin("GET", "/teams/blue")
    assert team["upstream_credential"] == TEAM_CREDENTIAL
