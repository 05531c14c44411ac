"""CONTRACT.md §3: every numbered check over real sockets, with the exact error frame, and the
socket still usable afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from conftest import (
    MODEL,
    Connect,
    Gateway,
    Sim,
    Tenant,
    create,
    make_tenant,
    recv,
    send,
    text_of,
    turn,
    until_terminal,
)

from app.models import Limits


def assert_error(
    event: dict[str, Any], code: str, status: int, param: str | None = None, etype: str = ""
) -> None:
    assert event["type"] == "error", event
    assert event["status"] == status, event
    assert event["error"]["code"] == code, event
    assert event["error"]["param"] == param, event
    expected_type = etype or {
        400: "invalid_request_error",
        409: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        429: "rate_limit_error",
    }.get(status, "server_error")
    assert event["error"]["type"] == expected_type, event
    assert isinstance(event["error"]["message"], str) and event["error"]["message"]


async def assert_usable(ws: aiohttp.ClientWebSocketResponse, text: str = "still here") -> None:
    events = await turn(ws, input=[{"role": "user", "content": text}])
    assert events[-1]["type"] == "response.completed", events[-1]
    assert text_of(events) == f"echo: {text}"


async def test_a_plain_turn_streams_openai_events_unchanged(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, input=[{"role": "user", "content": "hi there"}])
    types = [e["type"] for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-1] == "response.completed"
    assert text_of(events) == "echo: hi there"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    usage = events[-1]["response"]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0


@pytest.mark.parametrize("path", ["/v1/responses/ws", "/v1/responses"])
async def test_both_paths_serve_the_session(connect: Connect, path: str) -> None:
    async with connect(path) as ws:
        await assert_usable(ws)


# -- check 1: one JSON object in a text frame ----------------------------------------------------

CHECK1_FRAMES = {
    "invalid json": "{not json",
    "array": "[1, 2]",
    "string": '"response.create"',
    "number": "42",
    "null": "null",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "empty": "",
}


@pytest.mark.parametrize("frame", CHECK1_FRAMES.values(), ids=CHECK1_FRAMES.keys())
async def test_check1_not_one_json_object(connect: Connect, frame: str) -> None:
    async with connect() as ws:
        await ws.send_str(frame)
        assert_error(await recv(ws), "invalid_response_create", 400)
        await assert_usable(ws)


async def test_check1_binary_frame(connect: Connect) -> None:
    async with connect() as ws:
        await ws.send_bytes(b'{"type":"response.create"}')
        assert_error(await recv(ws), "invalid_response_create", 400)
        await assert_usable(ws)


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_MAX_FRAME_BYTES": 65536}])
async def test_check1_frame_over_the_limit_closes_1009(gateway: Gateway, connect: Connect) -> None:
    limit = gateway.node.settings.max_frame_bytes
    async with connect() as ws:
        await send(ws, create(input=[{"role": "user", "content": "x" * (limit - 300)}]))
        assert (await until_terminal(ws))[-1]["type"] == "response.completed"
        await send(ws, create(input=[{"role": "user", "content": "x" * (limit + 1)}]))
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009


# -- check 2: type ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"model": MODEL},
        {"type": "response.cancel", "model": MODEL},
        {"type": 7, "model": MODEL},
        {"type": "session.update"},
    ],
)
async def test_check2_other_types_are_refused(connect: Connect, frame: dict[str, Any]) -> None:
    async with connect() as ws:
        await send(ws, frame)
        event = await recv(ws)
        assert_error(event, "invalid_response_create", 400, "type")
        await assert_usable(ws)


async def test_check2_response_processed_is_dropped_silently(connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, {"type": "response.processed", "response_id": "resp_1"})
        events = await turn(ws)
        assert events[0]["type"] == "response.created"


async def test_check2_nested_shape_means_the_flat_one(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        await send(
            ws,
            {
                "type": "response.create",
                "model": "openai/ignored-outside",
                "stream_id": "lane-1",
                "response": {
                    "model": MODEL,
                    "input": [{"role": "user", "content": "nested"}],
                    "instructions": None,
                },
            },
        )
        events = await until_terminal(ws)
    assert text_of(events) == "echo: nested"
    assert all(e.get("stream_id") == "lane-1" for e in events)
    body = (await sim.requests())[-1]["body"]
    assert body["model"] == "gpt-test"
    assert body["stream_id"] == "lane-1"
    assert "instructions" not in body and "response" not in body


# -- check 3: model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [None, "gpt-test", "anthropic/claude-3", "openai/", "openai/a/b", "openai/gpt test", 5, ""],
)
async def test_check3_model_form(connect: Connect, model: Any) -> None:
    frame = create()
    if model is None:
        del frame["model"]
    else:
        frame["model"] = model
    async with connect() as ws:
        await send(ws, frame)
        assert_error(await recv(ws), "invalid_response_create", 400, "model")
        await assert_usable(ws)


# -- check 4: known fields -----------------------------------------------------------------------

FIELD_CASES: list[tuple[str, Any]] = [
    ("temperature", 2.5),
    ("temperature", -1),
    ("temperature", "1.2"),
    ("temperature", True),
    ("top_p", 1.5),
    ("top_logprobs", 21),
    ("top_logprobs", 2.5),
    ("max_output_tokens", 0),
    ("max_output_tokens", "100"),
    ("metadata", {f"k{i}": "v" for i in range(17)}),
    ("metadata", {"k" * 65: "v"}),
    ("metadata", {"k": "v" * 513}),
    ("metadata", {"k": 1}),
    ("metadata", ["k"]),
    ("input", 42),
    ("store", "no"),
    ("tools", {"type": "function"}),
    ("previous_response_id", 12),
]


@pytest.mark.parametrize(("name", "value"), FIELD_CASES)
async def test_check4_field_types_and_ranges(connect: Connect, name: str, value: Any) -> None:
    async with connect() as ws:
        await send(ws, create(**{name: value}))
        assert_error(await recv(ws), "invalid_response_create", 400, name)
        await assert_usable(ws)


async def test_check4_edges_pass(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(
            ws,
            input=[],
            temperature=2,
            top_p=0,
            top_logprobs=20,
            max_output_tokens=1,
            metadata={f"k{i}": "v" * 512 for i in range(16)},
            some_future_field={"kept": True},
        )
        assert events[-1]["type"] == "response.completed"


# -- check 5: routing -----------------------------------------------------------------------------


async def test_check5_reasons_in_order(gateway: Gateway, connect: Connect) -> None:
    other = await make_tenant(
        gateway.store,
        team_id="narrow",
        models=("openai/gpt-allowed",),
        credential="NO_SUCH_CREDENTIAL_VAR",
        prices=(),
    )
    async with connect(key=other.key) as ws:
        await send(ws, create(model="openai/gpt-unpriced"))
        event = await recv(ws)
        assert_error(event, "openai_routing_failed", 403, "model")
        reasons = ["model_not_allowed", "openai_provider_unavailable", "pricing_unavailable"]
        assert event["error"]["details"] == {"reasons": reasons}
        for reason in reasons:
            assert reason in event["error"]["message"]


@pytest.mark.parametrize(
    ("model", "reason"),
    [("openai/o3", "model_not_allowed"), ("openai/gpt-unpriced", "pricing_unavailable")],
)
async def test_check5_single_reason(connect: Connect, model: str, reason: str) -> None:
    async with connect() as ws:
        await send(ws, create(model=model))
        event = await recv(ws)
        assert_error(event, "openai_routing_failed", 403, "model")
        assert event["error"]["details"] == {"reasons": [reason]}
        await assert_usable(ws)


async def test_check5_provider_unavailable(gateway: Gateway, connect: Connect) -> None:
    other = await make_tenant(gateway.store, team_id="nocred", credential="GW_TEST_UNSET_VAR")
    async with connect(key=other.key) as ws:
        await send(ws, create())
        event = await recv(ws)
        assert event["error"]["details"] == {"reasons": ["openai_provider_unavailable"]}


async def test_check5_a_removed_price_refuses_the_next_turn(
    gateway: Gateway, connect: Connect
) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        await gateway.store.delete_price(MODEL)
        await asyncio.sleep(0.6)  # the node's view refreshes within 0.25 s
        await send(ws, create())
        event = await recv(ws)
        assert event["error"]["details"] == {"reasons": ["pricing_unavailable"]}


# -- check 6: one response in flight ------------------------------------------------------------


async def test_check6_one_response_in_flight(connect: Connect) -> None:
    async with connect() as ws:
        slow = {"sim_delay_ms": "60", "sim_deltas": "8"}
        await send(ws, create(metadata=slow, input=[{"role": "user", "content": "first"}]))
        first = await recv(ws)
        assert first["type"] == "response.created"
        await send(ws, create(stream_id="s2", input=[{"role": "user", "content": "second"}]))
        events = [first]
        refusal = None
        while True:
            event = await recv(ws)
            if event["type"] == "error":
                refusal = event
                continue
            events.append(event)
            if event["type"] == "response.completed":
                break
        assert refusal is not None
        assert_error(refusal, "response_already_in_flight", 409)
        assert refusal["stream_id"] == "s2"
        assert events[-1]["response"]["status"] == "completed"
        assert text_of(events).startswith("echo: first")
        await assert_usable(ws)


async def test_check6_invalid_frame_in_flight_gets_its_own_error(connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, create(metadata={"sim_delay_ms": "50", "sim_deltas": "6"}))
        await send(ws, create(model="gpt-test"))
        events = await until_terminal(ws)
        while events[-1]["type"] == "error":
            assert_error(events[-1], "invalid_response_create", 400, "model")
            events = await until_terminal(ws)
        assert events[-1]["type"] == "response.completed"


# -- check 7: model lock --------------------------------------------------------------------------


async def test_check7_model_locked_after_first_turn(connect: Connect) -> None:
    async with connect() as ws:
        await assert_usable(ws)
        await send(ws, create(model="openai/gpt-other"))
        assert_error(await recv(ws), "model_mismatch", 400, "model")
        await assert_usable(ws)


async def test_check7_refused_turns_lock_nothing(connect: Connect) -> None:
    async with connect() as ws:
        await send(ws, create(model="openai/gpt-other", temperature=9))
        assert_error(await recv(ws), "invalid_response_create", 400, "temperature")
        events = await turn(ws, model=MODEL)
        assert events[-1]["type"] == "response.completed"


@pytest.mark.parametrize("query", ["gpt-other", "openai/gpt-other"])
async def test_check7_query_model_prelocks(connect: Connect, query: str) -> None:
    async with connect(params={"model": query}) as ws:
        await send(ws, create(model=MODEL))
        assert_error(await recv(ws), "model_mismatch", 400, "model")
        events = await turn(ws, model="openai/gpt-other")
        assert events[-1]["type"] == "response.completed"


async def test_check7_empty_query_model_is_absent(connect: Connect) -> None:
    async with connect(params={"model": ""}) as ws:
        await assert_usable(ws)


@pytest.mark.parametrize("query", ["anthropic/claude", "openai/a/b", "gpt 5"])
async def test_malformed_query_model_is_http_400(
    gateway: Gateway, tenant: Tenant, query: str
) -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(
                gateway.url("/v1/responses"),
                params={"model": query},
                headers={"Authorization": f"Bearer {tenant.key}"},
            )
    assert info.value.status == 400


# -- check 8: rate limit --------------------------------------------------------------------------


async def test_check8_rate_limit(gateway: Gateway) -> None:
    limited = await make_tenant(
        gateway.store, team_id="limited", limits=Limits(responses_per_minute_per_key=2)
    )
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            gateway.url("/v1/responses"), headers={"Authorization": f"Bearer {limited.key}"}
        )
        await send(ws, create(temperature=7))  # refused frames do not count
        assert_error(await recv(ws), "invalid_response_create", 400, "temperature")
        for _ in range(2):
            assert (await turn(ws))[-1]["type"] == "response.completed"
        await send(ws, create(stream_id="s3"))
        event = await recv(ws)
        assert_error(event, "rate_limit_exceeded", 429)
        assert event["stream_id"] == "s3"
        await ws.close()


# -- check 9: what goes upstream ------------------------------------------------------------------


async def test_check9_upstream_request_is_normalized(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        events = await turn(
            ws,
            store=True,
            stream=True,
            stream_options={"include_obfuscation": False},
            background=False,
            instructions="be brief",
            unknown_field={"x": 1},
            user=None,
        )
        assert events[-1]["type"] == "response.completed"
    body = (await sim.requests())[-1]["body"]
    assert body["store"] is False
    assert body["model"] == "gpt-test"
    for stripped in ("stream", "stream_options", "background", "user"):
        assert stripped not in body
    assert body["instructions"] == "be brief"
    assert body["unknown_field"] == {"x": 1}
    assert body["type"] == "response.create"
    assert (await sim.handshakes())[-1]["headers"]["authorization"].endswith(
        "upstream-test-0123456789"
    )


async def test_client_frames_captured_from_real_clients_are_accepted(connect: Connect) -> None:
    import json
    from pathlib import Path

    fixture = Path(__file__).parents[2] / "shared" / "fixtures" / "client_frames.json"
    if not fixture.exists():
        fixture = Path("/work/shared/fixtures/client_frames.json")
    frames = json.loads(fixture.read_text())["frames"]
    assert frames
    for item in frames:
        frame = dict(item["frame"])
        body = frame.get("response", frame)
        body["model"] = MODEL
        frame.pop("previous_response_id", None)
        body.pop("previous_response_id", None)
        async with connect() as ws:
            await send(ws, frame)
            events = await until_terminal(ws)
            assert events[-1]["type"] == "response.completed", (item["what"], events[-1])
