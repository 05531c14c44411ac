"""`POST /v1/responses` and `/responses/compact` when OpenAI fails (app/relay.py through
app/upstream.py `post_http`): unreachable, silent, cut before its answer or in the middle of an
SSE stream. What the customer gets and what the ledger records."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, Gateway, Tenant
from test_ledger_gateway import fetch

from app import sse


async def post(gateway: Gateway, tenant: Tenant, path: str, **fields: Any) -> tuple[int, bytes]:
    body = {"model": MODEL, "input": "hi", **fields}
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.url(path), json=body, headers=headers) as resp:
            return resp.status, await resp.read()


async def statuses(gateway: Gateway, database_url: str, tenant: Tenant) -> list[tuple[Any, ...]]:
    assert await gateway.node.ledger.flushed(10)
    rows = await fetch(
        database_url,
        "SELECT transport, error_code, status FROM turns WHERE key_id = $1 ORDER BY received_at",
        tenant.key_id,
    )
    return [tuple(row.values()) for row in rows]


def refusal(raw: bytes) -> tuple[str, str]:
    error = orjson.loads(raw)["error"]
    return error["code"], error["message"]


@pytest.mark.parametrize("settings_overrides", [{"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}])
async def test_unreachable(gateway: Gateway, tenant: Tenant, database_url: str) -> None:
    for path, fields in (
        ("/v1/responses", {}),
        ("/v1/responses", {"stream": True}),
        ("/v1/responses/compact", {}),
    ):
        status, raw = await post(gateway, tenant, path, **fields)
        assert status == 502
        assert refusal(raw) == (
            "upstream_websocket_handshake_failed",
            "Could not reach OpenAI over HTTP (ClientConnectorError).",
        )
    code = "upstream_websocket_handshake_failed"
    assert await statuses(gateway, database_url, tenant) == [
        ("http", code, "error"),
        ("http", code, "error"),
        ("compact", code, "error"),
    ]


@pytest.mark.parametrize(
    ("settings_overrides", "fault", "reason"),
    [
        ({"GATEWAY_UPSTREAM_IDLE_SECONDS": 0.5}, "hang", "SocketTimeoutError"),
        ({}, "drop", "ServerDisconnectedError"),
    ],
)
async def test_no_answer(
    gateway: Gateway, tenant: Tenant, database_url: str, fault: str, reason: str
) -> None:
    status, raw = await post(gateway, tenant, "/v1/responses", metadata={"sim_http_fault": fault})
    assert status == 502
    assert refusal(raw) == (
        "upstream_websocket_handshake_failed",
        f"Could not reach OpenAI over HTTP ({reason}).",
    )
    code = "upstream_websocket_handshake_failed"
    assert await statuses(gateway, database_url, tenant) == [("http", code, "error")]


@pytest.mark.parametrize(
    ("settings_overrides", "fault"),
    [({"GATEWAY_UPSTREAM_IDLE_SECONDS": 0.5}, "hang"), ({}, "drop")],
)
async def test_sse_cut_midway(
    gateway: Gateway, tenant: Tenant, database_url: str, fault: str
) -> None:
    metadata = {"sim_http_fault": fault, "sim_fault_after": "2"}
    status, raw = await post(gateway, tenant, "/v1/responses", stream=True, metadata=metadata)
    assert status == 200

    async def chunks() -> Any:
        yield raw

    kinds = [orjson.loads(e.data)["type"] async for e in sse.parse(chunks())]
    assert kinds[0] == "response.created" and not kinds[-1].startswith("response.completed")
    assert await statuses(gateway, database_url, tenant) == [("http", None, "error")]
