"""Strict clients: every event and object the gateway sends validates against openai-python's types
(strict mode, every field of `Response` present), over WebSocket and SSE; OpenAI's eviction
semantics; `POST /v1/responses` and `/v1/responses/compact` through the gateway."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MODEL, Connect, Gateway, Sim, Tenant, send, turn, until_terminal
from openai.types.responses import CompactedResponse, Response, ResponsesServerEvent
from pydantic import TypeAdapter, ValidationError
from test_ws_checks import assert_error

from app import sse

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
TOOLS = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a thing up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def strict_event(raw: dict[str, Any]) -> Any:
    text = orjson.dumps(raw)
    try:
        event = EVENTS.validate_json(text, strict=True)
    except ValidationError:
        event = EVENTS.validate_json(text)  # strict refuses some unions' coercions
        raise AssertionError(f"strict validation failed for {raw['type']}") from None
    response = raw.get("response")
    if isinstance(response, dict):
        strict_response(response)
    return event


def strict_response(response: dict[str, Any]) -> None:
    Response.model_validate(response, strict=True)
    missing = set(Response.model_fields) - set(response)
    assert not missing, f"Response fields missing: {sorted(missing)}"


async def ws_flows(connect: Connect) -> list[dict[str, Any]]:
    """Text, tool call and its output, warm-up and an error, all on one socket."""
    seen: list[dict[str, Any]] = []
    async with connect() as ws:
        warm = await turn(ws, generate=False, input=[user("prewarm")], tools=TOOLS)
        seen += warm
        r0 = warm[-1]["response"]["id"]
        text = await turn(ws, input=[user("hello")], previous_response_id=r0, tools=TOOLS)
        seen += text
        call = await turn(
            ws,
            input=[user('please [[call:lookup {"q":"x"}]]')],
            previous_response_id=text[-1]["response"]["id"],
            tools=TOOLS,
        )
        seen += call
        item = next(e["item"] for e in call if e["type"] == "response.output_item.done")
        assert item["type"] == "function_call" and item["name"] == "lookup"
        out = [{"type": "function_call_output", "call_id": item["call_id"], "output": "42"}]
        answer = await turn(
            ws, input=out, previous_response_id=call[-1]["response"]["id"], tools=TOOLS
        )
        seen += answer
        assert answer[-1]["type"] == "response.completed"
        error = await turn(ws, input=[user("x")], previous_response_id="resp_nope")
        seen += error
    return seen


async def test_every_websocket_event_validates_strictly(connect: Connect) -> None:
    events = await ws_flows(connect)
    kinds = {e["type"] for e in events}
    assert {
        "response.created",
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.completed",
        "error",
    } <= kinds
    for raw in events:
        strict_event(raw)


async def post(
    gateway: Gateway, key: str, path: str, body: dict[str, Any]
) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url(path), json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            return resp.status, resp.content_type, await resp.read()


async def test_http_json_and_sse_validate_strictly(gateway: Gateway, tenant: Tenant) -> None:
    status, ctype, raw = await post(
        gateway, tenant.key, "/v1/responses", {"model": MODEL, "input": "hi"}
    )
    assert (status, ctype) == (200, "application/json")
    response = orjson.loads(raw)
    strict_response(response)
    assert response["output"][0]["content"][0]["text"] == "echo: hi"

    status, ctype, raw = await post(
        gateway, tenant.key, "/v1/responses", {"model": MODEL, "input": "hi", "stream": True}
    )
    assert (status, ctype) == (200, "text/event-stream")

    async def chunks() -> Any:
        yield raw

    events = [orjson.loads(e.data) async for e in sse.parse(chunks())]
    assert events[-1]["type"] == "response.completed"
    for event in events:
        strict_event(event)


async def test_http_checks_and_errors(gateway: Gateway, tenant: Tenant, sim: Sim) -> None:
    status, _, raw = await post(gateway, tenant.key, "/v1/responses", {"model": "gpt-test"})
    assert status == 400
    assert orjson.loads(raw)["error"]["code"] == "invalid_response_create"
    status, _, raw = await post(gateway, "sk-gw-bad_bad", "/v1/responses", {"model": MODEL})
    assert (status, orjson.loads(raw)["error"]["code"]) == (401, "invalid_api_key")
    status, _, raw = await post(
        gateway, tenant.key, "/v1/responses", {"model": "openai/o1-unpriced", "input": "x"}
    )
    assert status == 403
    assert orjson.loads(raw)["error"]["details"]["reasons"][0] == "model_not_allowed"
    body = {"model": MODEL, "input": "x", "store": True, "background": True}
    status, _, _raw = await post(gateway, tenant.key, "/v1/responses", body)
    assert status == 200
    sent = [r for r in await sim.requests() if r["conn"] is None][-1]["body"]
    assert sent["store"] is False and "background" not in sent and sent["model"] == "gpt-test"


async def test_unknown_route_is_openai_shaped_404(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url("/v1/nothing-here")) as resp:
            assert resp.status == 404
            body = await resp.json()
    assert body["error"]["code"] == "not_found"
    assert set(body["error"]) >= {"type", "code", "message", "param"}


# -- eviction: a failed continuation evicts what it continued -----------------------------------


@pytest.mark.parametrize("third_input", ["string", "array"])
async def test_failed_continuation_evicts(connect: Connect, sim: Sim, third_input: str) -> None:
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")], tools=TOOLS))[-1]["response"]["id"]
        bad = [{"type": "function_call_output", "call_id": "call_unknown", "output": "x"}]
        failed = await turn(ws, input=bad, previous_response_id=r1, tools=TOOLS)
        assert failed[-1]["type"] in ("error", "response.failed")
        before = len(await sim.requests())
        third: Any = "three" if third_input == "string" else [user("three")]
        events = await turn(ws, input=third, previous_response_id=r1)
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")
    assert len(await sim.requests()) == before + 1  # no retry: the gateway forgot r1 too


# -- compaction -----------------------------------------------------------------------------------


async def test_compaction_round_trip(gateway: Gateway, tenant: Tenant, connect: Connect) -> None:
    history: list[dict[str, Any]] = []
    async with connect() as ws:
        previous = None
        for text in ("one", "two", "three"):
            events = await turn(ws, input=[user(text)], previous_response_id=previous)
            previous = events[-1]["response"]["id"]
            history += [user(text), *events[-1]["response"]["output"]]
    status, _, raw = await post(
        gateway, tenant.key, "/v1/responses/compact", {"model": MODEL, "input": history}
    )
    assert status == 200, raw
    compacted = orjson.loads(raw)
    CompactedResponse.model_validate(compacted, strict=True)
    assert compacted["object"] == "response.compaction"
    assert any(item["type"] == "compaction" for item in compacted["output"])
    async with connect() as ws:
        await send(
            ws,
            {
                "type": "response.create",
                "model": MODEL,
                "input": [*compacted["output"], user("four")],
            },
        )
        events = await until_terminal(ws)
    assert events[-1]["type"] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"].endswith("text.delta")) == "echo: four"


async def test_compaction_without_model_is_400(gateway: Gateway, tenant: Tenant) -> None:
    status, _, raw = await post(gateway, tenant.key, "/v1/responses/compact", {"input": []})
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert (error["code"], error["param"]) == ("invalid_response_create", "model")
