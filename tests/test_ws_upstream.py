"""Upstream behaviour through the gateway: faults become clear error events on a usable socket,
the `previous_response_not_found` retry, the 60-minute limit, and openai-python's own client."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import (
    MODEL,
    Connect,
    Gateway,
    Sim,
    Tenant,
    create,
    drop_upstream_connections,
    eventually,
    recv,
    send,
    text_of,
    turn,
)
from openai.types.responses import EasyInputMessageParam
from test_ws_checks import assert_error, assert_usable

from app import metrics

USER = {"role": "user", "content": "first question"}


def user(text: str) -> EasyInputMessageParam:
    return {"role": "user", "content": text}


def closed_details(event: dict[str, Any]) -> dict[str, Any]:
    assert_error(event, "upstream_websocket_closed", 502)
    details = event["error"]["details"]
    assert str(details["upstream_close_code"]) in event["error"]["message"]
    return dict(details)


# -- handshake faults -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["401", "429", "500", "503"])
async def test_upstream_handshake_refused(connect: Connect, sim: Sim, fault: str) -> None:
    await sim.arm(fault)
    async with connect() as ws:
        await send(ws, create(stream_id="lane"))
        event = await recv(ws)
        assert_error(event, "upstream_websocket_handshake_failed", 502)
        assert f"HTTP {fault}" in event["error"]["message"]
        assert event["stream_id"] == "lane"
        await assert_usable(ws)  # the next turn tries again


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_UPSTREAM_HANDSHAKE_SECONDS": 0.5}])
async def test_upstream_handshake_that_never_answers(connect: Connect, sim: Sim) -> None:
    await sim.arm("hang")
    async with connect() as ws:
        await send(ws, create())
        event = await recv(ws)
        assert_error(event, "upstream_websocket_handshake_failed", 502)
        assert "timed out" in event["error"]["message"]
        await assert_usable(ws)


# -- faults mid-response --------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "code"), [("drop", 1006), ("close_1011", 1011)])
async def test_upstream_closes_mid_response(connect: Connect, fault: str, code: int) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": fault, "sim_deltas": "10"})
        assert events[0]["type"] == "response.created"  # what came before is forwarded
        details = closed_details(events[-1])
        assert details["upstream_close_code"] == code
        await assert_usable(ws)


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_UPSTREAM_IDLE_SECONDS": 0.5}])
async def test_upstream_silent_mid_response(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": "hang"})
        details = closed_details(events[-1])
        assert details["upstream_close_code"] == 1006
        assert "silent" in details["upstream_close_reason"]
        await assert_usable(ws)


async def test_upstream_error_without_status_gets_one(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": "error_no_status"})
        assert events[-1]["type"] == "error"
        assert events[-1]["status"] == 500
        await assert_usable(ws)


async def test_upstream_response_failed_is_forwarded(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": "response_failed"})
        assert events[-1]["type"] == "response.failed"
        await assert_usable(ws)


async def test_large_completed_frame_passes(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(
            ws, metadata={"sim_fault": "large", "sim_large_bytes": str(6 * 1024 * 1024)}
        )
        assert events[-1]["type"] == "response.completed"
        await assert_usable(ws)


async def test_upstream_errors_are_forwarded_unchanged(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, temperature="1.2")  # refused by the gateway (check 4)
        assert_error(events[-1], "invalid_response_create", 400, "temperature")
        events = await turn(ws, background=True)  # stripped: WebSocket mode runs in foreground
        assert events[-1]["type"] == "response.completed"


# -- decimal temperature: OpenAI closes silently ------------------------------------------------


@pytest.mark.parametrize("field", ["temperature", "top_p"])
async def test_decimal_sampling_silent_close_never_reaches_the_client_silently(
    connect: Connect, sim: Sim, field: str
) -> None:
    async with connect() as ws:
        events = await turn(ws, **{field: 0.5})
        last = events[-1]
        # Served over the HTTP fallback: the customer sees a normal response.
        assert last["type"] == "response.completed", last
        assert text_of(events) == "echo: hello"
        await assert_usable(ws)


# -- previous_response_not_found: the retry --------------------------------------------------------


async def test_retry_with_remembered_context(connect: Connect, sim: Sim) -> None:
    before = metrics.UPSTREAM_RETRIES_TOTAL.labels(
        reason="previous_response_not_found"
    )._value.get()
    async with connect() as ws:
        first = await turn(ws, input=[user("one")])
        r1 = first[-1]["response"]["id"]
        await sim.requests()
        second = await turn(
            ws,
            input=[user("two")],
            previous_response_id=r1,
            metadata={"sim_fault": "forget"},  # the upstream lost its cache for this request
        )
    assert [e["type"] for e in second][-1] == "response.completed"
    assert not any(e["type"] == "error" for e in second)
    assert text_of(second) == "echo: two"
    requests = [r["body"] for r in await sim.requests()]
    assert len(requests) == 3
    assert requests[1]["previous_response_id"] == r1
    retried = requests[2]
    assert retried["previous_response_id"] is None
    contents = [item.get("content") for item in retried["input"] if item.get("role") == "user"]
    assert contents == ["one", "two"]
    assert any(
        item.get("type") == "message" and item.get("role") == "assistant"
        for item in retried["input"]
    )
    after = metrics.UPSTREAM_RETRIES_TOTAL.labels(reason="previous_response_not_found")._value.get()
    assert after == before + 1


async def test_not_found_without_memory_reaches_the_client(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        events = await turn(ws, input=[user("x")], previous_response_id="resp_unknown")
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")
        await assert_usable(ws)
    assert len(await sim.requests()) == 2  # no retry: nothing to retry with


async def test_not_found_with_string_input_is_not_retried(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        r1 = (await turn(ws))[-1]["response"]["id"]
        events = await turn(
            ws, input="two", previous_response_id=r1, metadata={"sim_fault": "forget"}
        )
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")


# -- OpenAI's 60-minute limit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sim_options", [pytest.param({"max_connection_seconds": 1.0}, id="1s-limit")], indirect=True
)
async def test_connection_limit_is_invisible(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")]))[-1]["response"]["id"]
        await asyncio.sleep(1.5)  # the upstream sends the limit error and closes
        events = await turn(ws, input=[user("two")], previous_response_id=r1)
        assert events[-1]["type"] == "response.completed", events[-1]
        assert not any(e["type"] == "error" for e in events)
        assert text_of(events) == "echo: two"
    requests = [r["body"] for r in await sim.requests()]
    assert requests[-1]["previous_response_id"] is None
    contents = [i.get("content") for i in requests[-1]["input"] if i.get("role") == "user"]
    assert contents == ["one", "two"]
    assert len(await sim.handshakes()) == 2


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_UPSTREAM_MAX_AGE_SECONDS": 0.5}])
async def test_old_upstream_socket_is_replaced_at_a_turn_boundary(
    connect: Connect, sim: Sim
) -> None:
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")]))[-1]["response"]["id"]
        await asyncio.sleep(0.7)
        events = await turn(ws, input=[user("two")], previous_response_id=r1)
        assert events[-1]["type"] == "response.completed"
    assert len(await sim.handshakes()) == 2
    assert (await sim.requests())[-1]["body"]["previous_response_id"] is None


async def test_limit_mid_response_is_an_upstream_close(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": "connection_limit"})
        assert all(
            e.get("error", {}).get("code") != "websocket_connection_limit_reached" for e in events
        )
        closed_details(events[-1])
        await assert_usable(ws)


# -- real clients -------------------------------------------------------------------------------


async def test_openai_python_client_two_chained_turns(gateway: Gateway, tenant: Tenant) -> None:
    from openai import AsyncOpenAI
    from openai.types.responses import ResponsesServerEvent
    from pydantic import TypeAdapter

    adapter: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
    client = AsyncOpenAI(base_url=gateway.url("/v1"), api_key=tenant.key)
    previous = None
    texts = []
    seen_types: set[str] = set()
    async with client.responses.connect() as conn:
        for text in ("one", "two"):
            await conn.response.create(
                model=MODEL, input=[user(text)], previous_response_id=previous, store=False
            )
            deltas = []
            while True:
                raw = await conn.recv_bytes()
                event = adapter.validate_json(raw)
                seen_types.add(event.type)
                if event.type == "response.output_text.delta":
                    deltas.append(event.delta)
                if event.type == "response.completed":
                    previous = event.response.id
                    break
                assert event.type != "error", raw
            texts.append("".join(deltas))
    assert texts == ["echo: one", "echo: two"]
    assert {"response.created", "response.output_text.delta", "response.completed"} <= seen_types


async def test_openai_python_parses_gateway_errors(gateway: Gateway, tenant: Tenant) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=gateway.url("/v1"), api_key=tenant.key)
    async with client.responses.connect() as conn:
        await conn.response.create(model="gpt-test", input=[user("x")], stream_id="lane-9")
        event = await conn.recv()
        assert event.type == "error"
        assert event.status == 400
        assert event.error.code == "invalid_response_create"
        assert event.stream_id == "lane-9"


async def test_silent_close_without_decimal_is_an_upstream_close(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, metadata={"sim_fault": "silent_close"})
        assert len(events) == 1
        details = closed_details(events[0])
        assert details["upstream_close_code"] == 1000
        await assert_usable(ws)


async def test_decimal_fallback_is_served_over_http_and_chains(connect: Connect, sim: Sim) -> None:
    before = metrics.UPSTREAM_RETRIES_TOTAL.labels(reason="http_fallback")._value.get()
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")]))[-1]["response"]["id"]
        second = await turn(ws, input=[user("two")], previous_response_id=r1, temperature=1.2)
        assert second[-1]["type"] == "response.completed"
        assert text_of(second) == "echo: two"
        r2 = second[-1]["response"]["id"]
        third = await turn(ws, input=[user("three")], previous_response_id=r2)
        assert third[-1]["type"] == "response.completed"
        assert text_of(third) == "echo: three"
    requests = await sim.requests()
    http = [r for r in requests if r["conn"] is None]
    assert len(http) == 1
    assert http[0]["body"]["stream"] is True
    assert http[0]["body"]["previous_response_id"] is None
    assert [i.get("content") for i in http[0]["body"]["input"] if i.get("role") == "user"] == [
        "one",
        "two",
    ]
    # Turn 3 chains to the HTTP-served response: the upstream socket never saw it, so the
    # gateway sends the remembered conversation on a fresh socket.
    last = requests[-1]["body"]
    assert last["previous_response_id"] is None
    contents = [i.get("content") for i in last["input"] if i.get("role") == "user"]
    assert contents == ["one", "two", "three"]
    after = metrics.UPSTREAM_RETRIES_TOTAL.labels(reason="http_fallback")._value.get()
    assert after == before + 1


async def test_decimal_fallback_of_an_unknown_chain_is_not_found(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, previous_response_id="resp_elsewhere", temperature=0.7)
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")
        await assert_usable(ws)


# -- stream_id on the turns the gateway serves itself --------------------------------------------


def assert_lane(events: list[dict[str, Any]], stream_id: object) -> None:
    """Every event carries exactly the client's stream_id (the same JSON type too)."""
    lanes = [(e["type"], e.get("stream_id", "<none>")) for e in events]
    assert all(lane == stream_id and type(lane) is type(stream_id) for _, lane in lanes), lanes


@pytest.mark.parametrize("stream_id", ["lane-7", 42], ids=["string", "integer"])
@pytest.mark.parametrize("fault", [None, "response_failed", "status_500", "drop"])
async def test_fallback_turn_carries_the_stream_id_on_every_event(
    connect: Connect, sim: Sim, stream_id: object, fault: str | None
) -> None:
    metadata = {} if fault is None else {"sim_http_fault": fault}
    async with connect() as ws:
        events = await turn(ws, temperature=0.7, stream_id=stream_id, metadata=metadata)
        await assert_usable(ws)
    ends = {
        None: "response.completed",
        "response_failed": "response.failed",
        "status_500": "error",
        "drop": "error",
    }
    assert events[-1]["type"] == ends[fault], events[-1]
    if fault in (None, "response_failed"):
        assert events[0]["type"] == "response.created" and len(events) > 3
    assert_lane(events, stream_id)
    (http,) = [r for r in await sim.requests() if r["conn"] is None]
    assert "stream_id" not in http["body"]  # WebSocket-only: not a field of POST /responses


async def test_fallback_turn_without_stream_id_gets_none(connect: Connect) -> None:
    async with connect() as ws:
        events = await turn(ws, temperature=0.7)
    assert events[-1]["type"] == "response.completed"
    assert not [e for e in events if "stream_id" in e]


async def test_retried_turn_carries_the_stream_id_on_every_event(
    connect: Connect, sim: Sim
) -> None:
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")], stream_id="lane-1"))[-1]["response"]["id"]
        events = await turn(
            ws,
            input=[user("two")],
            previous_response_id=r1,
            metadata={"sim_fault": "forget"},
            stream_id="lane-2",
        )
        assert events[-1]["type"] == "response.completed" and text_of(events) == "echo: two"
        assert_lane(events, "lane-2")
        # Chained to an older response: not remembered, no retry; the error is the lane's too.
        events = await turn(
            ws,
            input=[user("three")],
            previous_response_id=r1,
            metadata={"sim_fault": "forget"},
            stream_id="lane-3",
        )
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")
        assert_lane(events, "lane-3")
    bodies = [r["body"] for r in await sim.requests()]
    assert bodies[2]["previous_response_id"] is None  # the retry, on the same lane
    assert bodies[2]["stream_id"] == "lane-2"


async def test_openai_python_sees_its_lane_on_a_fallback_turn(
    gateway: Gateway, tenant: Tenant
) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=gateway.url("/v1"), api_key=tenant.key)
    seen: list[tuple[str, str | None]] = []
    async with client.responses.connect() as conn:
        await conn.response.create(
            model=MODEL, input=[user("x")], temperature=0.7, stream_id="lane-py", store=False
        )
        while not seen or seen[-1][0] not in ("response.completed", "error"):
            event = await conn.recv()
            seen.append((event.type, getattr(event, "stream_id", None)))
    assert seen[-1][0] == "response.completed", seen
    assert {lane for _, lane in seen} == {"lane-py"}, seen


# -- conversation memory bounds --------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_CONTEXT_BYTES": 2048}])
async def test_memory_bound_per_socket(gateway: Gateway, connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        small = (await turn(ws, input=[user("short")]))[-1]["response"]["id"]
        events = await turn(
            ws, input=[user("ok")], previous_response_id=small, metadata={"sim_fault": "forget"}
        )
        assert events[-1]["type"] == "response.completed"  # within the bound: retried
        big = (await turn(ws, input=[user("y " * 2000)]))[-1]["response"]["id"]
        events = await turn(
            ws, input=[user("more")], previous_response_id=big, metadata={"sim_fault": "forget"}
        )
        # Over the bound the gateway does not guess: the client resends the context.
        assert_error(events[-1], "previous_response_not_found", 400, "previous_response_id")
    assert gateway.node.memory_budget.used == 0  # a closed socket leaves nothing behind
    assert await gateway.node.ledger.flushed(10)
    conn = await asyncpg.connect(gateway.node.settings.database_url)
    try:
        flag = await conn.fetchval(
            "SELECT memory_bound_exceeded FROM turns WHERE previous_response_id = $1", big
        )
    finally:
        await conn.close()
    assert flag is True


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_CONTEXT_TOTAL_BYTES": 3000}])
async def test_memory_bound_per_node_drops_the_least_recent(
    gateway: Gateway, connect: Connect
) -> None:
    async with connect() as first, connect() as second:
        r1 = (await turn(first, input=[user("a " * 500)]))[-1]["response"]["id"]
        r2 = (await turn(second, input=[user("b " * 500)]))[-1]["response"]["id"]
        assert gateway.node.memory_budget.used <= 3000
        lost = await turn(
            first, input=[user("x")], previous_response_id=r1, metadata={"sim_fault": "forget"}
        )
        assert_error(lost[-1], "previous_response_not_found", 400, "previous_response_id")
        kept = await turn(
            second, input=[user("x")], previous_response_id=r2, metadata={"sim_fault": "forget"}
        )
        assert kept[-1]["type"] == "response.completed"


async def test_upstream_drop_between_turns_keeps_the_conversation(
    connect: Connect, sim: Sim
) -> None:
    async with connect() as ws:
        r1 = (await turn(ws, input=[user("one")]))[-1]["response"]["id"]
        r2 = (await turn(ws, input=[user("two")], previous_response_id=r1))[-1]["response"]["id"]
        assert await drop_upstream_connections(sim) == 1
        await asyncio.sleep(0.1)
        third = await turn(ws, input=[user("three")], previous_response_id=r2)
        assert third[-1]["type"] == "response.completed", third[-1]
        assert text_of(third) == "echo: three"
    last = (await sim.requests())[-1]["body"]
    assert last["previous_response_id"] is None
    contents = [i.get("content") for i in last["input"] if i.get("role") == "user"]
    assert contents == ["one", "two", "three"]
    assert sum(1 for i in last["input"] if i.get("role") == "assistant") == 2
    assert len(await sim.handshakes()) == 2


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_MAX_PENDING_BYTES": 256 * 1024}])
async def test_client_that_stops_reading_is_closed_1008(gateway: Gateway, connect: Connect) -> None:
    closes = metrics.WS_CLOSES_TOTAL.labels(side="gateway", code="1008")
    before = closes._value.get()
    async with connect() as ws:
        big = str(24 * 1024 * 1024)  # streamed as 64 KiB deltas
        await send(ws, create(metadata={"sim_fault": "large", "sim_large_bytes": big}))
        await asyncio.sleep(2.0)  # not reading: kernel buffers fill, then the gateway's
        for _ in range(2000):
            msg = await ws.receive(timeout=5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        assert ws.close_code == 1008
    await eventually(lambda: closes._value.get() == before + 1)
    await eventually(lambda: not gateway.node.sessions)


@pytest.mark.parametrize("settings_overrides", [{"GATEWAY_HTTP_FALLBACK": False}])
async def test_http_fallback_can_be_turned_off(connect: Connect, sim: Sim) -> None:
    async with connect() as ws:
        events = await turn(ws, temperature=1.2)
        details = closed_details(events[-1])
        assert (details["upstream_close_code"], details["upstream_close_reason"]) == (1000, "")
        await assert_usable(ws)
    assert all(r["conn"] is not None for r in await sim.requests())
