"""Every Response object the simulator sends passes strict schemas: openai-python's types in strict
mode, every field present and none unchecked, echoed `tools` with every field of a function tool
(the OpenResponses compliance suite's `tool-calling` test validates them). Over WebSocket, over
`POST /v1/responses` (JSON and SSE), and the compaction; a real simulator on a real port.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from conftest import Sim
from openai.types.responses import CompactedResponse, Response
from pydantic import BaseModel, ValidationError
from test_simulator import EVENTS, MODEL, Json, assert_error, connect, post, sse_events, turn

PARAMS = {
    "type": "object",
    "properties": {"q": {"type": "string"}},
    "required": ["q"],
    "additionalProperties": False,
}
TOOLS: list[Json] = [
    {"type": "function", "name": "lookup"},
    {"type": "function", "name": "describe", "description": "Say what a thing is."},
    {"type": "function", "name": "loose", "parameters": {"type": "object"}, "strict": False},
    {"type": "function", "name": "exact", "description": "x", "parameters": PARAMS, "strict": True},
    {"type": "function", "name": "nulls", "description": None, "parameters": None, "strict": None},
    {
        "type": "namespace",
        "name": "crm",
        "description": "CRM tools.",
        "tools": [{"type": "function", "name": "find", "parameters": PARAMS}],
    },
    {"type": "custom", "name": "free_text"},
    {"type": "web_search"},
]
# How OpenAI echoes them: a function tool has all of its fields, `strict` true unless sent false.
ECHOED: list[Json] = [
    {"type": "function", "name": "lookup", "description": None, "parameters": None, "strict": True},
    {**TOOLS[1], "parameters": None, "strict": True},
    {**TOOLS[2], "description": None},
    TOOLS[3],
    {**TOOLS[4], "strict": True},
    {**TOOLS[5], "tools": [{**TOOLS[5]["tools"][0], "description": None, "strict": True}]},
    TOOLS[6],
    TOOLS[7],
]
# The fields of a function tool that OpenAI always sends and the OpenResponses `FunctionTool`
# requires (nullable); openai-python marks them optional, so its validation lets an absent one by.
FUNCTION_TOOL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "type": str,
    "name": str,
    "description": (str, type(None)),
    "parameters": (dict, type(None)),
    "strict": bool,  # OpenAI answers a boolean (the schemas would allow null)
}
# Fields OpenAI's Response carries (the OpenResponses `ResponseResource` requires them) that
# openai-python's `Response` does not declare, so it keeps them unchecked: checked here by hand.
UNDECLARED: dict[str, type | tuple[type, ...]] = {
    "store": bool,
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
}
RESPONSE_EVENTS = {
    "response.created",
    "response.in_progress",
    "response.completed",
    "response.failed",
    "response.incomplete",
}


def user(text: str) -> Json:
    return {"type": "message", "role": "user", "content": text}


def is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    """`isinstance`, except that JSON's true and false are not numbers."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def unchecked_fields(value: Any, path: str) -> list[str]:
    """Fields no type checked: openai-python's models keep unknown fields as extras."""
    if isinstance(value, BaseModel):
        found = [f"{path}.{name}" for name in value.model_extra or {}]
        for name in type(value).model_fields:
            found += unchecked_fields(getattr(value, name), f"{path}.{name}")
        return found
    if isinstance(value, list):
        return [f for i, item in enumerate(value) for f in unchecked_fields(item, f"{path}.{i}")]
    return []  # plain JSON (`parameters`, `metadata`): any value is its type


def function_tool_faults(tools: list[Json], path: str) -> list[str]:
    faults: list[str] = []
    for index, tool in enumerate(tools):
        where = f"{path}.{index}"
        if tool.get("type") == "namespace":
            faults += function_tool_faults(tool["tools"], f"{where}.tools")
        if tool.get("type") != "function":
            continue
        for field, kind in FUNCTION_TOOL_FIELDS.items():
            if field not in tool:
                faults.append(f"{where}.{field}: missing")
            elif not is_a(tool[field], kind):
                faults.append(f"{where}.{field}: {tool[field]!r} is not {kind}")
    return faults


def assert_strict_response(response: Json, where: str) -> None:
    try:
        model = Response.model_validate(response, strict=True)
    except ValidationError as exc:
        raise AssertionError(f"{where}: {exc}") from None
    missing = sorted(set(Response.model_fields) - set(response))
    assert not missing, f"{where}: fields of Response absent: {missing}"
    unchecked = set(unchecked_fields(model, "response")) - {f"response.{f}" for f in UNDECLARED}
    assert not unchecked, f"{where}: fields no type checks: {sorted(unchecked)}"
    for field, kind in UNDECLARED.items():
        assert is_a(response[field], kind), f"{where}: {field}: {response[field]!r} is not {kind}"
    faults = function_tool_faults(response["tools"], "tools")
    assert not faults, f"{where}: {faults}"


def assert_strict_events(events: list[Json], where: str) -> list[str]:
    """Every event validates strictly; each Response object in them too. Their types, in order."""
    for event in events:
        try:
            EVENTS.validate_python(event, strict=True)
        except ValidationError as exc:
            raise AssertionError(f"{where}: {event['type']}: {exc}") from None
        if event["type"] in RESPONSE_EVENTS:
            assert_strict_response(event["response"], f"{where}: {event['type']}")
    return [event["type"] for event in events]


async def test_every_websocket_response_object_is_strictly_valid(sim: Sim) -> None:
    seen: set[str] = set()
    async with connect(sim.server) as ws:
        warm = await turn(ws, generate=False, input=[user("prewarm")], tools=TOOLS)
        text = await turn(
            ws, input=[user("hello")], previous_response_id=warm[-1]["response"]["id"], tools=TOOLS
        )
        call = await turn(ws, input=[user('do [[call:lookup {"q":"x"}]]')], tools=TOOLS)
        item = call[-1]["response"]["output"][0]
        assert item["type"] == "function_call"
        output = {"type": "function_call_output", "call_id": item["call_id"], "output": "42"}
        answer = await turn(
            ws, input=[output], previous_response_id=call[-1]["response"]["id"], tools=TOOLS
        )
        half = await turn(ws, input="a b c d", tools=TOOLS, metadata={"sim_fault": "incomplete"})
        failed = await turn(
            ws, tools=TOOLS, metadata={"sim_fault": "response_failed", "sim_fault_after": "2"}
        )
        bare = await turn(ws, input="no tools")
        for name, events in [
            ("warm-up", warm),
            ("text", text),
            ("call", call),
            ("answer", answer),
            ("incomplete", half),
            ("failed", failed),
            ("no tools", bare),
        ]:
            seen |= set(assert_strict_events(events, f"websocket {name}"))
    assert seen >= RESPONSE_EVENTS
    assert warm[-1]["response"]["tools"] == ECHOED
    assert bare[-1]["response"]["tools"] == []


async def test_every_http_response_object_is_strictly_valid(sim: Sim) -> None:
    bodies: dict[str, Json] = {
        "text": {"input": "hi", "tools": TOOLS},
        "call": {"input": "[[call:find]]", "tools": TOOLS},
        "incomplete": {
            "input": "a b c d",
            "tools": TOOLS,
            "metadata": {"sim_http_fault": "incomplete"},
        },
        "failed": {"input": "x", "tools": TOOLS, "metadata": {"sim_http_fault": "response_failed"}},
        "no tools": {"input": "x"},
    }
    seen: set[str] = set()
    async with aiohttp.ClientSession() as http:
        for name, body in bodies.items():
            status, kind, raw = await post(
                http, sim.server, "/v1/responses", {"model": MODEL, **body}
            )
            assert (status, kind) == (200, "application/json"), raw
            response = orjson.loads(raw)
            assert_strict_response(response, f"JSON {name}")
            assert response["tools"] == (ECHOED if "tools" in body else [])
            if name == "call":
                assert response["output"][0]["namespace"] == "crm"
            status, kind, raw = await post(
                http, sim.server, "/v1/responses", {"model": MODEL, **body, "stream": True}
            )
            assert (status, kind) == (200, "text/event-stream"), raw
            seen |= set(assert_strict_events(sse_events(raw), f"SSE {name}"))
    assert seen >= RESPONSE_EVENTS


async def test_the_compaction_is_strictly_valid(sim: Sim) -> None:
    body = {"model": MODEL, "input": [user("a"), user("b")], "instructions": "be kind"}
    async with aiohttp.ClientSession() as http:
        status, _, raw = await post(http, sim.server, "/v1/responses/compact", body)
    assert status == 200
    compacted = orjson.loads(raw)
    try:
        model = CompactedResponse.model_validate(compacted, strict=True)
    except ValidationError as exc:
        raise AssertionError(str(exc)) from None
    assert not unchecked_fields(model, "compaction")


BAD_TOOLS = [
    ({"type": "function", "name": "f", "strict": "yes"}, "invalid_type", "tools[1].strict"),
    ({"type": "function", "name": "f", "parameters": "{}"}, "invalid_type", "tools[1].parameters"),
    ({"type": "function", "name": "f", "description": 5}, "invalid_type", "tools[1].description"),
    ({"type": "function", "name": 7}, "invalid_type", "tools[1].name"),
    ({"type": "function"}, "missing_required_parameter", "tools[1].name"),
    ({"name": "f"}, "missing_required_parameter", "tools[1].type"),
    ("lookup", "invalid_type", "tools[1]"),
    (
        {"type": "namespace", "name": "n", "description": "d", "tools": [{"type": "function"}]},
        "missing_required_parameter",
        "tools[1].tools[0].name",
    ),
]


@pytest.mark.parametrize(("bad", "code", "param"), BAD_TOOLS)
async def test_wrong_typed_tool_fields_get_openais_400(
    sim: Sim, bad: Any, code: str, param: str
) -> None:
    """OpenAI refuses a mistyped field anywhere in the request, a tool's included: so does the
    simulator, rather than echo a tool a strict client would reject."""
    tools = [TOOLS[0], bad]
    async with connect(sim.server) as ws:
        assert_error((await turn(ws, tools=tools))[-1], code, param)
        assert (await turn(ws, tools=TOOLS))[-1]["type"] == "response.completed"
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "input": "x", "tools": tools}
        status, _, raw = await post(http, sim.server, "/v1/responses", body)
    error = orjson.loads(raw)["error"]
    assert (status, error["code"], error["param"]) == (400, code, param)
    assert f"'{param}'" in error["message"]
