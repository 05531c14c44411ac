"""The upstream simulator on a real port, driven by real aiohttp clients (docs/simulator.md)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestServer
from openai.types.responses import Response, ResponsesServerEvent
from pydantic import TypeAdapter

from app.simulator import (
    SimulatorOptions,
    create_simulator_app,
    run_simulator,
)

Json = dict[str, Any]

KEY = "sk-sim-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "gpt-test"
MIB = 1024 * 1024
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}
FIXTURES = Path("/work/shared/fixtures/client_frames.json")
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
TEXT_TURN = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def sim_opts(request: pytest.FixtureRequest) -> SimulatorOptions:
    """Parametrize indirectly with a dict of `SimulatorOptions` fields."""
    return SimulatorOptions(**getattr(request, "param", {}))


@pytest.fixture
async def server(aiohttp_server: Any, sim_opts: SimulatorOptions) -> TestServer:
    srv: TestServer = await aiohttp_server(create_simulator_app(sim_opts))
    return srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def connect(
    server: TestServer, headers: dict[str, str] | None = None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            server.make_url("/v1/responses"),
            headers=AUTH if headers is None else headers,
            max_msg_size=64 * MIB,
        ) as ws:
            yield ws


def create(**fields: Any) -> Json:
    fields.setdefault("model", MODEL)
    fields.setdefault("input", [{"role": "user", "content": "hello world"}])
    return {"type": "response.create", **fields}


async def send(ws: aiohttp.ClientWebSocketResponse, frame: Json | str) -> None:
    await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> Json:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.TEXT, f"expected a text frame, got {msg!r}"
    value: Json = orjson.loads(msg.data)
    return value


async def until_terminal(ws: aiohttp.ClientWebSocketResponse) -> list[Json]:
    events = [await recv(ws)]
    while events[-1]["type"] not in TERMINAL:
        events.append(await recv(ws))
    return events


async def turn(ws: aiohttp.ClientWebSocketResponse, **fields: Any) -> list[Json]:
    await send(ws, create(**fields))
    return await until_terminal(ws)


async def closing(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[Json], aiohttp.WSMessage]:
    """Every event until the socket ends, and the message that ended it."""
    events: list[Json] = []
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type is not WSMsgType.TEXT:
            return events, msg
        events.append(orjson.loads(msg.data))


def text_of(events: list[Json]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def without_stamp(event: Json) -> Json:
    return {k: v for k, v in event.items() if k != "sim_sent_at"}


def not_found_frame(response_id: str) -> Json:
    return {
        "type": "error",
        "status": 400,
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{response_id}' not found.",
            "param": "previous_response_id",
        },
    }


def assert_error(event: Json, code: str, param: str | None, status: int = 400) -> None:
    assert event["type"] == "error", event
    assert event["status"] == status, event
    assert event["error"]["code"] == code, event
    assert event["error"]["param"] == param, event
    assert event["error"]["message"]
    EVENTS.validate_python(event)


async def assert_usable(ws: aiohttp.ClientWebSocketResponse) -> None:
    events = await turn(ws, input="still here")
    assert events[-1]["type"] == "response.completed"
    assert text_of(events) == "echo: still here"


async def control(
    http: aiohttp.ClientSession, server: TestServer, method: str, path: str, body: Any = None
) -> Any:
    async with http.request(method, server.make_url(path), json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def post(
    http: aiohttp.ClientSession,
    server: TestServer,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    async with http.post(
        server.make_url(path), json=body, headers=AUTH if headers is None else headers
    ) as resp:
        return resp.status, resp.content_type, await resp.read()


def sse_events(raw: bytes) -> list[Json]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        event = orjson.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def handshake_headers(auth: dict[str, str] = AUTH) -> dict[str, str]:
    return {
        **auth,
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(),
    }


# -- a text turn --------------------------------------------------------------------------------


async def test_text_turn_streams_valid_openai_events(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(
            ws,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi there"}]}],
            instructions="be brief",
            temperature=1,
            metadata={"k": "v"},
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            store=False,
        )
    assert [e["type"] for e in events] == TEXT_TURN
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert text_of(events) == "echo: hi there"
    assert [e["delta"] for e in events[4:7]] == ["echo: ", "hi ", "there"]
    for event in events:
        EVENTS.validate_python(event)
        assert isinstance(event["sim_sent_at"], float)
        assert "stream_id" not in event
    created, completed = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["completed_at"] is None
    assert created["usage"] is None and created["output"] == []
    assert completed["status"] == "completed" and completed["completed_at"] >= created["created_at"]
    assert completed["id"] == created["id"] and completed["id"].startswith("resp_")
    model = Response.model_validate(completed)
    assert model.output_text == "echo: hi there"
    missing = set(Response.model_fields) - set(completed)
    assert not missing, f"fields of Response absent from the JSON: {missing}"
    for name in ("error", "incomplete_details", "conversation", "prompt", "user"):
        assert completed[name] is None
    echoed = {
        "model": MODEL,
        "instructions": "be brief",
        "temperature": 1,
        "top_p": 1.0,
        "metadata": {"k": "v"},
        "tools": [{**WEATHER_TOOL, "strict": True}],  # OpenAI's default, filled in
        "tool_choice": "auto",
        "store": False,
        "previous_response_id": None,
        "parallel_tool_calls": True,
    }
    assert {k: completed[k] for k in echoed} == echoed
    item = completed["output"][0]
    assert item["id"] == events[2]["item"]["id"] == events[4]["item_id"]
    assert item["content"][0]["text"] == "echo: hi there"
    assert completed["usage"] == {
        "input_tokens": 4,  # "be brief" + "hi there"
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    }


async def test_string_input_and_no_user_message(server: TestServer) -> None:
    async with connect(server) as ws:
        assert text_of(await turn(ws, input="plain  string")) == "echo: plain  string"
        developer = [{"type": "message", "role": "developer", "content": "rules"}]
        assert text_of(await turn(ws, input=developer)) == "echo: (no input)"


async def test_reasoning_models_report_reasoning_tokens(server: TestServer) -> None:
    async with connect(server) as ws:
        for model, reasoning in [("o3", 8), ("gpt-5-mini", 8), ("my-reasoner", 8), ("gpt-4o", 0)]:
            usage = (await turn(ws, model=model, input="a b"))[-1]["response"]["usage"]
            assert usage["output_tokens_details"]["reasoning_tokens"] == reasoning, model
            assert usage["output_tokens"] == 3 + reasoning


async def test_forced_deltas_and_delay(server: TestServer) -> None:
    async with connect(server) as ws:
        start = time.monotonic()
        events = await turn(ws, input="one two", metadata={"sim_deltas": "5", "sim_delay_ms": "30"})
        elapsed = time.monotonic() - start
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["echo: ", "one ", "two ", "echo: ", "one"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "echo: one two echo: one"
    assert elapsed >= 0.15


async def test_terminal_only_sends_the_last_event_alone(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, input="one two", metadata={"sim_terminal_only": "true"})
        assert [e["type"] for e in events] == ["response.completed"]
        assert events[0]["response"]["output"][0]["content"][0]["text"] == "echo: one two"
        await send(ws, create(metadata={"sim_terminal_only": "yes"}))
        refused = await recv(ws)
        assert refused["error"]["param"] == "metadata.sim_terminal_only"


async def test_incomplete_stops_halfway(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, input="a b c d e", metadata={"sim_fault": "incomplete"})
        assert events[-1]["type"] == "response.incomplete"
        response = events[-1]["response"]
        assert response["status"] == "incomplete" and response["completed_at"] is None
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert text_of(events) == "echo: a b "  # half of the 6 words, rounded up
        assert response["output"][0]["status"] == "incomplete"
        assert response["usage"]["output_tokens"] == 3
        EVENTS.validate_python(events[-1])
        assert (await turn(ws, input="x", max_output_tokens=1))[-1]["type"] == "response.completed"


# -- chaining and the connection cache ------------------------------------------------------------


async def test_chaining_on_one_connection(server: TestServer) -> None:
    async with connect(server) as ws:
        first = (await turn(ws, input="one two"))[-1]["response"]
        second = (await turn(ws, input="three", previous_response_id=first["id"]))[-1]["response"]
        assert second["previous_response_id"] == first["id"]
        assert second["output"][0]["content"][0]["text"] == "echo: three"
        # The chain: "one two" (2) + "echo: one two" (3) cached, then "three" (1).
        usage = second["usage"]
        assert usage["input_tokens"] == 6
        assert usage["input_tokens_details"]["cached_tokens"] == 5
        events = await turn(ws, input=[], previous_response_id=second["id"])
        assert text_of(events) == "echo: three"  # the last user message of the remembered chain
        # Only the most recent response is remembered.
        stale = await turn(ws, input="x", previous_response_id=first["id"])
        assert [without_stamp(e) for e in stale] == [not_found_frame(first["id"])]
        await assert_usable(ws)
        latest = events[-1]["response"]["id"]
    async with connect(server) as ws:  # a new connection knows nothing
        events = await turn(ws, input="x", previous_response_id=latest)
        assert [without_stamp(e) for e in events] == [not_found_frame(latest)]


async def test_failed_continuation_evicts(server: TestServer) -> None:
    async with connect(server) as ws:
        r1 = (await turn(ws))[-1]["response"]["id"]
        bogus = [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]
        events = await turn(ws, input=bogus, previous_response_id=r1)
        assert_error(events[-1], "invalid_function_call_output", "input")
        events = await turn(ws, input="again", previous_response_id=r1)
        assert [without_stamp(e) for e in events] == [not_found_frame(r1)]

        r2 = (await turn(ws))[-1]["response"]["id"]
        failed = await turn(ws, previous_response_id=r2, metadata={"sim_fault": "response_failed"})
        assert failed[-1]["type"] == "response.failed"
        events = await turn(ws, previous_response_id=r2)
        assert [without_stamp(e) for e in events] == [not_found_frame(r2)]

        # An error answering a request that did not continue the cached response keeps it.
        r3 = (await turn(ws))[-1]["response"]["id"]
        assert_error((await turn(ws, model=None))[-1], "missing_required_parameter", "model")
        assert (await turn(ws, previous_response_id=r3))[-1]["type"] == "response.completed"


async def test_forget_fault_answers_not_found_and_evicts(server: TestServer) -> None:
    async with connect(server) as ws:
        r1 = (await turn(ws))[-1]["response"]["id"]
        events = await turn(ws, previous_response_id=r1, metadata={"sim_fault": "forget"})
        assert [without_stamp(e) for e in events] == [not_found_frame(r1)]
        events = await turn(ws, previous_response_id=r1)
        assert [without_stamp(e) for e in events] == [not_found_frame(r1)]


async def test_stored_responses_chain_from_anywhere(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    async with connect(server) as ws:
        stored = (await turn(ws, input="kept", store=True))[-1]["response"]
        assert stored["store"] is True
    async with connect(server) as ws:
        events = await turn(ws, input=[], previous_response_id=stored["id"])
        assert text_of(events) == "echo: kept"
    status, _, raw = await post(
        http, server, "/v1/responses", {"model": MODEL, "previous_response_id": stored["id"]}
    )
    assert status == 200
    assert orjson.loads(raw)["output"][0]["content"][0]["text"] == "echo: kept"


async def test_requests_on_one_connection_run_one_at_a_time(server: TestServer) -> None:
    async with connect(server) as ws:
        slow = {"sim_delay_ms": "20", "sim_deltas": "5"}
        await send(ws, create(input="first", metadata=slow, stream_id="a"))
        await send(ws, create(input="second", stream_id="b"))
        first = await until_terminal(ws)
        second = await until_terminal(ws)
    assert {e["stream_id"] for e in first} == {"a"}
    assert {e["stream_id"] for e in second} == {"b"}
    assert text_of(second) == "echo: second"
    assert second[0]["sequence_number"] == 0


# -- warm-up and tools ----------------------------------------------------------------------------


async def test_warm_up_then_chained_turn(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, generate=False, input="warm words")
        assert [e["type"] for e in events] == [
            "response.created",
            "response.in_progress",
            "response.completed",
        ]
        warm = events[-1]["response"]
        assert warm["output"] == []
        assert warm["usage"]["output_tokens"] == 0 and warm["usage"]["input_tokens"] == 2
        Response.model_validate(warm)
        events = await turn(ws, input=[], previous_response_id=warm["id"])
        assert text_of(events) == "echo: warm words"
        assert events[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 2


async def test_function_call_round_trip(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(
            ws, input='weather? [[call:get_weather {"city": "Paris"}]]', tools=[WEATHER_TOOL]
        )
        assert [e["type"] for e in events] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        for event in events:
            EVENTS.validate_python(event)
        call = events[-1]["response"]["output"][0]
        assert call["type"] == "function_call" and call["name"] == "get_weather"
        assert call["arguments"] == '{"city": "Paris"}' == events[4]["arguments"]
        assert re.fullmatch(r"call_[0-9a-f]{24}", call["call_id"])
        assert events[2]["item"]["id"] == call["id"] == events[3]["item_id"]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
        events = await turn(ws, input=[output], previous_response_id=events[-1]["response"]["id"])
        assert text_of(events) == "tool said: sunny"

        # The same conversation resent in full, unchained, is accepted too.
        full = [{"role": "user", "content": "weather?"}, call, output]
        assert text_of(await turn(ws, input=full)) == "tool said: sunny"

        # Without a function tool the marker is only text; without arguments they are "{}".
        assert text_of(await turn(ws, input="[[call:x]]")) == "echo: [[call:x]]"
        events = await turn(ws, input="[[call:get_weather]]", tools=[WEATHER_TOOL])
        assert events[-1]["response"]["output"][0]["arguments"] == "{}"


async def test_stream_id_is_echoed_on_events_and_errors(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, stream_id="lane-1")
        assert all(e["stream_id"] == "lane-1" for e in events)
        events = await turn(ws, stream_id="lane-2", previous_response_id="resp_missing")
        assert events[-1]["stream_id"] == "lane-2"
        assert_error(events[-1], "previous_response_not_found", "previous_response_id")


# -- refusals that keep the socket open ------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "param"),
    [
        (create(model=None), "missing_required_parameter", "model"),
        (create(temperature="1.2"), "invalid_type", "temperature"),
        (create(top_p=True), "invalid_type", "top_p"),
        (create(temperature=3), "integer_above_max_value", "temperature"),
        (create(background=True), "unsupported_parameter", "background"),
        (create(input=5), "invalid_type", "input"),
        (create(metadata={"sim_fault": "nonsense"}), "invalid_value", "metadata.sim_fault"),
        (create(metadata={"sim_deltas": "many"}), "invalid_value", "metadata.sim_deltas"),
        ({"type": "response.cancel"}, "unknown_event_type", "type"),
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
    ],
)
async def test_invalid_requests_get_an_error_and_the_socket_stays_open(
    server: TestServer, frame: Json | str, code: str, param: str | None
) -> None:
    async with connect(server) as ws:
        await send(ws, frame)
        assert_error(await recv(ws), code, param)
        await assert_usable(ws)


async def test_nested_response_shape_is_read(server: TestServer) -> None:
    async with connect(server) as ws:
        await send(ws, {"type": "response.create", "response": {"model": MODEL, "input": "nest"}})
        assert text_of(await until_terminal(ws)) == "echo: nest"


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling", [{"temperature": 1.2}, {"temperature": 1.0}, {"top_p": 0.5}], ids=str
)
async def test_decimal_sampling_closes_silently(server: TestServer, sampling: Json) -> None:
    async with connect(server) as ws:
        await send(ws, create(**sampling))
        events, msg = await closing(ws)
    assert events == []
    assert msg.type is WSMsgType.CLOSE and msg.data == 1000 and msg.extra == ""


async def test_integer_sampling_works(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, temperature=1, top_p=1)
        assert events[-1]["type"] == "response.completed"


@pytest.mark.parametrize("sim_opts", [{"decimal_close": False}], indirect=True)
async def test_decimal_close_can_be_switched_off(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, temperature=1.2)
        assert events[-1]["response"]["temperature"] == 1.2


async def test_silent_close_on_demand(server: TestServer) -> None:
    async with connect(server) as ws:
        await send(ws, create(metadata={"sim_fault": "silent_close"}))
        events, msg = await closing(ws)
    assert events == []
    assert msg.type is WSMsgType.CLOSE and msg.data == 1000 and msg.extra == ""


async def test_drop_is_an_abnormal_closure(server: TestServer) -> None:
    async with connect(server) as ws:
        await send(ws, create(metadata={"sim_fault": "drop", "sim_deltas": "10"}))
        events, msg = await closing(ws)
        assert [e["type"] for e in events] == TEXT_TURN[:3]
        assert msg.type is WSMsgType.CLOSED  # no close frame came
        assert ws.close_code == 1006


async def test_close_1011_after_a_few_events(server: TestServer) -> None:
    async with connect(server) as ws:
        await send(ws, create(metadata={"sim_fault": "close_1011", "sim_fault_after": "5"}))
        events, msg = await closing(ws)
    assert len(events) == 5
    assert msg.type is WSMsgType.CLOSE and msg.data == 1011 and msg.extra == "internal error"


async def test_hang_sends_nothing_more(server: TestServer, http: aiohttp.ClientSession) -> None:
    async with connect(server) as ws:
        await send(ws, create(metadata={"sim_fault": "hang"}))
        events = [await recv(ws) for _ in range(3)]
        assert events[-1]["type"] == "response.output_item.added"
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)
        assert not ws.closed
        listed = await control(http, server, "GET", "/_sim/connections")
        assert len(listed["data"]) == 1
    for _ in range(100):  # the simulator notices the client leaving
        if not (await control(http, server, "GET", "/_sim/connections"))["data"]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the hung connection was not released")


async def test_error_without_status(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, stream_id="s", metadata={"sim_fault": "error_no_status"})
        error = events[-1]
        assert "status" not in error
        assert error["error"]["code"] == "server_error" and error["error"]["type"] == "server_error"
        assert error["sequence_number"] == 3 == len(events) - 1
        assert error["stream_id"] == "s"
        EVENTS.validate_python(error)
        await assert_usable(ws)


async def test_response_failed(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, metadata={"sim_fault": "response_failed", "sim_fault_after": "2"})
        assert [e["type"] for e in events] == [
            "response.created",
            "response.in_progress",
            "response.failed",
        ]
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
        EVENTS.validate_python(events[-1])
        await assert_usable(ws)


async def test_large_completed_frame(server: TestServer) -> None:
    size = 6 * MIB
    async with connect(server) as ws:
        await send(ws, create(metadata={"sim_fault": "large", "sim_large_bytes": str(size)}))
        raw: list[str] = []
        while True:
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.TEXT
            raw.append(msg.data)
            if '"type":"response.completed"' in msg.data[:40]:
                break
        completed = orjson.loads(raw[-1])
        assert abs(len(raw[-1].encode()) - size) < 64
        text = completed["response"]["output"][0]["content"][0]["text"]
        assert text.startswith("echo: hello world lorem")
        deltas = [orjson.loads(r) for r in raw if '"response.output_text.delta"' in r[:60]]
        assert "".join(d["delta"] for d in deltas) == text
        await assert_usable(ws)


async def test_connection_limit_on_demand(server: TestServer) -> None:
    async with connect(server) as ws:
        await send(ws, create(stream_id="s", metadata={"sim_fault": "connection_limit"}))
        events, msg = await closing(ws)
    assert [without_stamp(e) for e in events] == [
        {
            "type": "error",
            "status": 400,
            "error": {
                "type": "invalid_request_error",
                "code": "websocket_connection_limit_reached",
                "message": events[0]["error"]["message"],
                "param": None,
            },
            "stream_id": "s",
        }
    ]
    assert "60 minutes" in events[0]["error"]["message"]
    assert msg.type is WSMsgType.CLOSE and msg.data == 1000


@pytest.mark.parametrize("sim_opts", [{"max_connection_seconds": 0.5}], indirect=True)
async def test_connection_age_limit(server: TestServer) -> None:
    async with connect(server) as ws:  # idle at the limit
        assert (await turn(ws))[-1]["type"] == "response.completed"
        events, msg = await closing(ws)
        assert [e["error"]["code"] for e in events] == ["websocket_connection_limit_reached"]
        assert msg.type is WSMsgType.CLOSE and msg.data == 1000
    async with connect(server) as ws:  # a response in flight is cut
        await send(ws, create(metadata={"sim_deltas": "50", "sim_delay_ms": "40"}))
        events, msg = await closing(ws)
        assert events[0]["type"] == "response.created"
        assert events[-1]["error"]["code"] == "websocket_connection_limit_reached"
        assert all(e["type"] != "response.completed" for e in events)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1000


@pytest.mark.parametrize("sim_opts", [{"fault": "close_1011"}], indirect=True)
async def test_run_wide_fault_and_its_per_request_override(server: TestServer) -> None:
    async with connect(server) as ws:
        events = await turn(ws, metadata={"sim_fault": "none"})
        assert events[-1]["type"] == "response.completed"
        await send(ws, create())
        _, msg = await closing(ws)
        assert msg.data == 1011


async def random_outcome(ws: aiohttp.ClientWebSocketResponse) -> str:
    while True:
        try:
            msg = await ws.receive(timeout=1.0)
        except TimeoutError:
            return "hang"
        if msg.type is not WSMsgType.TEXT:
            return {1006: "drop", 1011: "close_1011"}[ws.close_code or 0]
        if orjson.loads(msg.data)["type"] == "response.failed":
            return "response_failed"


async def random_outcomes(server: TestServer, turns: int) -> list[str]:
    outcomes = []
    for _ in range(turns):
        async with connect(server) as ws:
            await send(ws, create())
            outcomes.append(await random_outcome(ws))
    return outcomes


async def test_random_faults_replay_with_their_seed(aiohttp_server: Any) -> None:
    options = SimulatorOptions(fault_rate=1.0, seed=3)
    first = await random_outcomes(await aiohttp_server(create_simulator_app(options)), 4)
    again = await random_outcomes(await aiohttp_server(create_simulator_app(options)), 4)
    assert first == again
    assert set(first) <= {"drop", "close_1011", "hang", "response_failed"}
    assert len(set(first)) > 1


async def test_armed_turn_fault(server: TestServer, http: aiohttp.ClientSession) -> None:
    armed = await control(http, server, "POST", "/_sim/faults", {"turn": "drop", "count": 1})
    assert armed["turn"] == [{"fault": "drop", "count": 1}]
    async with connect(server) as ws:
        await send(ws, create())
        _, msg = await closing(ws)
        assert msg.type is WSMsgType.CLOSED and ws.close_code == 1006
    async with connect(server) as ws:
        await assert_usable(ws)


# -- handshakes ---------------------------------------------------------------------------------


async def test_handshake_needs_a_bearer(server: TestServer, http: aiohttp.ClientSession) -> None:
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}):
        async with http.get(
            server.make_url("/v1/responses"), headers=handshake_headers(headers)
        ) as resp:
            assert resp.status == 401
            body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] is None
    status, _, raw = await post(http, server, "/v1/responses", {"model": MODEL}, headers={})
    assert status == 401 and orjson.loads(raw)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("sim_opts", [{"api_key": KEY}], indirect=True)
async def test_configured_api_key(server: TestServer) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with connect(server, {"Authorization": "Bearer sk-other"}):
            pass
    assert refused.value.status == 401
    async with connect(server) as ws:
        await assert_usable(ws)


async def test_plain_get_is_told_to_upgrade(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.make_url("/v1/responses"), headers=AUTH) as resp:
        assert resp.status == 426
        assert (await resp.json())["error"]["code"] == "websocket_upgrade_required"


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("401", "invalid_api_key"),
        ("429", "rate_limit_exceeded"),
        ("500", "server_error"),
        ("503", "service_unavailable"),
    ],
)
async def test_armed_handshake_refusals(
    server: TestServer, http: aiohttp.ClientSession, fault: str, code: str
) -> None:
    await control(http, server, "POST", "/_sim/faults", {"handshake": fault, "count": 2})
    async with http.get(server.make_url("/v1/responses"), headers=handshake_headers()) as resp:
        assert resp.status == int(fault)
        assert (await resp.json())["error"]["code"] == code
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with connect(server):
            pass
    assert refused.value.status == int(fault)
    async with connect(server) as ws:  # only two were armed
        await assert_usable(ws)


async def test_armed_handshake_hang(server: TestServer, http: aiohttp.ClientSession) -> None:
    await control(http, server, "POST", "/_sim/faults", {"handshake": "hang"})
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            async with connect(server):
                pass
    async with connect(server) as ws:
        await assert_usable(ws)


@pytest.mark.parametrize(
    "sim_opts", [{"handshake_fault": "500", "handshake_delay_ms": 100}], indirect=True
)
async def test_run_wide_handshake_fault_and_delay(server: TestServer) -> None:
    for _ in range(2):
        start = time.monotonic()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with connect(server):
                pass
        assert refused.value.status == 500
        assert time.monotonic() - start >= 0.1


@pytest.mark.parametrize(
    "body", [{"handshake": "418"}, {"turn": "x"}, {"handshake": "401", "count": 0}, {}]
)
async def test_bad_fault_arming_is_refused(
    server: TestServer, http: aiohttp.ClientSession, body: Json
) -> None:
    async with http.post(server.make_url("/_sim/faults"), json=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_value"


# -- HTTP ----------------------------------------------------------------------------------------


async def test_http_json_and_sse(server: TestServer, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "input": "over http", "temperature": 1.2}  # no silent close here
    status, content_type, raw = await post(http, server, "/v1/responses", body)
    assert status == 200 and content_type == "application/json"
    response = orjson.loads(raw)
    assert set(Response.model_fields) <= set(response)
    assert Response.model_validate(response).output_text == "echo: over http"
    assert response["status"] == "completed" and response["temperature"] == 1.2

    status, content_type, raw = await post(
        http, server, "/v1/responses", {**body, "stream": True, "stream_id": "h"}
    )
    assert status == 200 and content_type == "text/event-stream"
    events = sse_events(raw)
    assert [e["type"] for e in events] == TEXT_TURN[:4] + ["response.output_text.delta"] * 3 + [
        *TEXT_TURN[-4:]
    ]
    for event in events:
        EVENTS.validate_python(event)
        assert event["stream_id"] == "h" and "sim_sent_at" in event
    assert text_of(events) == "echo: over http"


async def test_http_chaining_needs_store(server: TestServer, http: aiohttp.ClientSession) -> None:
    status, _, raw = await post(http, server, "/v1/responses", {"model": MODEL, "input": "a"})
    unstored = orjson.loads(raw)["id"]
    status, _, raw = await post(
        http, server, "/v1/responses", {"model": MODEL, "previous_response_id": unstored}
    )
    assert status == 400
    assert orjson.loads(raw) == {"error": not_found_frame(unstored)["error"]}
    status, _, raw = await post(
        http, server, "/v1/responses", {"model": MODEL, "input": "b", "store": True}
    )
    stored = orjson.loads(raw)["id"]
    status, _, raw = await post(
        http,
        server,
        "/v1/responses",
        {"model": MODEL, "input": [], "previous_response_id": stored, "stream": True},
    )
    assert status == 200 and text_of(sse_events(raw)) == "echo: b"


async def test_http_faults(server: TestServer, http: aiohttp.ClientSession) -> None:
    def body(fault: str, **more: Any) -> Json:
        return {"model": MODEL, "input": "x", "metadata": {"sim_http_fault": fault}, **more}

    status, _, raw = await post(http, server, "/v1/responses", body("status_429"))
    assert status == 429 and orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    status, _, raw = await post(http, server, "/v1/responses", body("response_failed", stream=True))
    assert sse_events(raw)[-1]["type"] == "response.failed"
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, server, "/v1/responses", body("drop", stream=True))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, server, "/v1/responses", body("drop"))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await post(http, server, "/v1/responses", body("hang"))
    status, _, raw = await post(http, server, "/v1/responses", body("incomplete", stream=True))
    assert sse_events(raw)[-1]["type"] == "response.incomplete"
    status, _, raw = await post(http, server, "/v1/responses", body("status_500"))
    assert status == 500 and orjson.loads(raw)["error"]["type"] == "server_error"
    # WebSocket faults do not apply over HTTP.
    status, _, raw = await post(
        http, server, "/v1/responses", {**body("none"), "metadata": {"sim_fault": "silent_close"}}
    )
    assert status == 200


async def test_http_validation_errors(server: TestServer, http: aiohttp.ClientSession) -> None:
    status, _, raw = await post(http, server, "/v1/responses", {"input": "x"})
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error == {
        "type": "invalid_request_error",
        "code": "missing_required_parameter",
        "message": "Missing required parameter: 'model'.",
        "param": "model",
    }
    async with http.post(server.make_url("/v1/responses"), data=b"{nope", headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    async with http.get(server.make_url("/v1/nowhere")) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


# -- compaction ---------------------------------------------------------------------------------


async def test_compaction_and_its_output_as_input(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    conversation = [
        {"role": "user", "content": "first question"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "first answer here"}],
        },
        {"role": "user", "content": "second question"},
    ]
    status, _, raw = await post(
        http,
        server,
        "/v1/responses/compact",
        {"model": MODEL, "input": conversation, "instructions": "be kind"},
    )
    assert status == 200
    compacted = orjson.loads(raw)
    assert compacted["object"] == "response.compaction" and compacted["id"].startswith("cmp_")
    [item] = compacted["output"]  # only output items: the user's messages are folded too
    assert item["type"] == "compaction" and item["id"].startswith("cmp_")
    assert (
        isinstance(item["encrypted_content"], str)
        and "first answer" not in item["encrypted_content"]
        and "first question" not in item["encrypted_content"]
    )
    assert compacted["usage"]["input_tokens"] == 9
    assert compacted["usage"]["output_tokens"] == 7  # every folded word
    assert compacted["usage"]["input_tokens_details"]["cache_write_tokens"] == 0

    follow_up = [*compacted["output"], {"role": "user", "content": "third"}]
    status, _, raw = await post(http, server, "/v1/responses", {"model": MODEL, "input": follow_up})
    response = orjson.loads(raw)
    assert status == 200 and response["output"][0]["content"][0]["text"] == "echo: third"
    assert response["usage"]["input_tokens"] == 8  # the folded answer counts as context
    async with connect(server) as ws:
        assert text_of(await turn(ws, input=follow_up)) == "echo: third"
        forged = [{"type": "compaction", "id": "cmp_x", "encrypted_content": "garbage"}]
        assert_error((await turn(ws, input=forged))[-1], "invalid_encrypted_content", "input")

    status, _, raw = await post(http, server, "/v1/responses/compact", {"input": conversation})
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "model"


# -- the control API ----------------------------------------------------------------------------


async def test_request_log(server: TestServer, http: aiohttp.ClientSession) -> None:
    async with connect(server, {**AUTH, "OpenAI-Beta": "responses_websockets=2026-02-06"}) as ws:
        frame = create(input="logged", temperature=1)
        await send(ws, frame)
        await until_terminal(ws)
        listed = await control(http, server, "GET", "/_sim/connections")
        [conn] = listed["data"]
        assert conn["last_response_id"].startswith("resp_") and conn["turns"] == 1
    await post(http, server, "/v1/responses", {"model": MODEL, "input": "by http"})
    data = (await control(http, server, "GET", "/_sim/requests"))["data"]
    assert [d["kind"] for d in data] == ["handshake", "request", "request"]
    handshake, ws_request, http_request = data
    assert handshake["conn"] == ws_request["conn"] == conn["id"]
    assert handshake["headers"]["authorization"] == f"Bearer {KEY}"
    assert handshake["headers"]["openai-beta"] == "responses_websockets=2026-02-06"
    assert handshake["body"] is None and handshake["path"] == "/v1/responses"
    assert ws_request["body"] == frame
    assert http_request["conn"] is None and http_request["body"]["input"] == "by http"
    assert all(isinstance(d["at"], float) for d in data)

    await control(http, server, "DELETE", "/_sim/requests")
    assert (await control(http, server, "GET", "/_sim/requests"))["data"] == []
    await control(http, server, "POST", "/_sim/faults", {"handshake": "500"})
    await post(http, server, "/v1/responses", {"model": MODEL})
    reset = await control(http, server, "POST", "/_sim/reset")
    assert reset == {"handshake": [], "turn": []}
    assert (await control(http, server, "GET", "/_sim/requests"))["data"] == []
    async with connect(server) as ws:  # the armed 500 is gone
        await assert_usable(ws)


# -- real clients' frames -----------------------------------------------------------------------


def fixture_frames() -> dict[str, Json]:
    frames = json.loads(FIXTURES.read_text())["frames"]
    return {f["what"]: f["frame"] for f in frames}


async def completed(ws: aiohttp.ClientWebSocketResponse, frame: Json) -> Json:
    await send(ws, frame)
    events = await until_terminal(ws)
    for event in events:
        EVENTS.validate_python(event)
    assert events[-1]["type"] == "response.completed", events[-1]
    response: Json = events[-1]["response"]
    Response.model_validate(response)
    return response


async def test_real_client_frames_are_answered(server: TestServer) -> None:
    frames = list(fixture_frames().values())
    prewarm, real_turn, tool_turn, tool_output, python_sdk, agents_sdk = frames
    async with connect(server) as ws:
        warm = await completed(ws, prewarm)
        assert warm["output"] == []
        answer = await completed(ws, {**real_turn, "previous_response_id": warm["id"]})
        assert answer["output"][0]["content"][0]["text"] == "echo: say hi"
    async with connect(server) as ws:
        warm = await completed(ws, prewarm)
        answer = await completed(ws, {**tool_turn, "previous_response_id": warm["id"]})
        assert answer["output"][0]["content"][0]["text"] == "echo: run echo"
        # The same turn, with the model asked to call Codex's exec_command tool.
        asking = copy.deepcopy(tool_turn)
        asking["input"][-1]["content"][0]["text"] += ' [[call:exec_command {"cmd":"echo hi"}]]'
        call = await completed(ws, {**asking, "previous_response_id": answer["id"]})
        [item] = call["output"]
        assert item["type"] == "function_call" and item["name"] == "exec_command"
        follow = copy.deepcopy(tool_output)
        follow["previous_response_id"] = call["id"]
        follow["input"][0]["call_id"] = item["call_id"]
        answer = await completed(ws, follow)
        assert answer["output"][0]["content"][0]["text"].startswith("tool said: Chunk ID")
    async with connect(server) as ws:  # the follow-up alone, unchained: taken as it comes
        unchained = {k: v for k, v in tool_output.items() if k != "previous_response_id"}
        answer = await completed(ws, unchained)
        assert answer["output"][0]["content"][0]["text"].startswith("tool said: Chunk ID")
    for frame in (python_sdk, agents_sdk):
        async with connect(server) as ws:
            answer = await completed(ws, frame)
            assert answer["output"][0]["content"][0]["text"] == "echo: say hi"


# -- running it --------------------------------------------------------------------------------


async def test_run_simulator_prints_where_and_closes_sockets_on_shutdown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    task = asyncio.create_task(run_simulator("127.0.0.1", 0, SimulatorOptions()))
    for _ in range(200):
        out = capsys.readouterr().out
        if out:
            break
        await asyncio.sleep(0.01)
    match = re.fullmatch(r"simulator listening on http://127\.0\.0\.1:(\d+)/v1\n", out)
    assert match, out
    url = f"http://127.0.0.1:{match[1]}/v1/responses"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=AUTH) as ws:
            await send(ws, create())
            assert (await until_terminal(ws))[-1]["type"] == "response.completed"
            task.cancel()
            _, msg = await closing(ws)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
    with pytest.raises(asyncio.CancelledError):
        await task
