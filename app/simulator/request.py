"""Reading a `response.create` (or `POST /v1/responses`, or a compaction) into a checked request.

The checks run in a fixed order and raise the first `SimError` they meet, as OpenAI answers one
error per request: the model, then each known field's type, then ranges, then the fields of each
tool, then what WebSocket mode refuses, then the input items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.simulator import errors
from app.simulator.errors import Json
from app.simulator.tools import echoed_tools

# Known fields whose JSON type is checked: field -> (accepted Python types, how OpenAI names them).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "input": ((str, list), "a string or an array"),
    "instructions": ((str, list), "a string or an array"),
    "previous_response_id": ((str,), "a string"),
    "metadata": ((dict,), "an object"),
    "tools": ((list,), "an array"),
    "temperature": ((int, float), "a decimal"),
    "top_p": ((int, float), "a decimal"),
    "top_logprobs": ((int,), "an integer"),
    "max_output_tokens": ((int,), "an integer"),
    "max_tool_calls": ((int,), "an integer"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "store": ((bool,), "a boolean"),
    "stream": ((bool,), "a boolean"),
    "background": ((bool,), "a boolean"),
    "generate": ((bool,), "a boolean"),
    "stream_id": ((str,), "a string"),
}

# Numeric fields with a range: field -> (minimum, maximum).
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0, 2),
    "top_p": (0, 1),
    "top_logprobs": (0, 20),
    "max_output_tokens": (1, 2**31 - 1),
    "max_tool_calls": (0, 2**31 - 1),
}

_SAMPLING = ("temperature", "top_p")


@dataclass(frozen=True)
class CreateRequest:
    """A checked request; `fields` keeps every field as received, nulls dropped, for the echo;
    `tools` are the request's tools as the response echoes them (app/simulator/tools.py)."""

    fields: Json
    model: str
    input_items: tuple[Json, ...]
    previous_response_id: str | None
    generate: bool
    store: bool
    stream: bool
    stream_id: str | None
    metadata: dict[str, str]
    tools: tuple[Json, ...]


def create_fields(frame: Json) -> Json:
    """The flat fields of a `response.create` frame.

    Both shapes are read: `{"type":"response.create","model":…}` and
    `{"type":"response.create","response":{…}}` (inside `response` wins). A null means absent.
    """
    fields = {k: v for k, v in frame.items() if k not in ("type", "response")}
    nested = frame.get("response")
    if isinstance(nested, dict):
        fields.update(nested)
    return {k: v for k, v in fields.items() if v is not None}


def stream_id_of(frame: Json) -> str | None:
    value = frame.get("stream_id")
    return value if isinstance(value, str) else None


def has_decimal_sampling(fields: Json) -> bool:
    """Fault 1's trigger: `temperature` or `top_p` written as a JSON decimal (`1.2`, even `1.0`)."""
    return any(isinstance(fields.get(name), float) for name in _SAMPLING)


def parse_create(fields: Json, *, websocket: bool) -> CreateRequest:
    _check_model(fields)
    _check_types(fields)
    _check_ranges(fields)
    tools = echoed_tools(fields.get("tools", []))
    if fields.get("background") is True:
        where = "in WebSocket mode" if websocket else "by the simulator"
        raise errors.unsupported_parameter(
            "background", f"Background responses are not supported {where}."
        )
    metadata = _metadata(fields)
    return CreateRequest(
        fields=fields,
        model=fields["model"],
        input_items=input_items(fields.get("input")),
        previous_response_id=fields.get("previous_response_id"),
        generate=fields.get("generate", True),
        store=fields.get("store", False),
        stream=fields.get("stream", False),
        stream_id=fields.get("stream_id"),
        metadata=metadata,
        tools=tools,
    )


@dataclass(frozen=True)
class CompactRequest:
    model: str
    input_items: tuple[Json, ...]
    instructions: Any
    previous_response_id: str | None


def parse_compact(body: Json) -> CompactRequest:
    fields = {k: v for k, v in body.items() if v is not None}
    _check_model(fields)
    _check_types(fields)
    return CompactRequest(
        model=fields["model"],
        input_items=input_items(fields.get("input")),
        instructions=fields.get("instructions"),
        previous_response_id=fields.get("previous_response_id"),
    )


def input_items(value: object) -> tuple[Json, ...]:
    """The input as items: a string is one user message; an item without `type` is a message."""
    if value is None:
        return ()
    if isinstance(value, str):
        return ({"type": "message", "role": "user", "content": value},)
    assert isinstance(value, list)  # _check_types ran first
    items: list[Json] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise errors.invalid_type(f"input[{index}]", "an object", item)
        items.append(item if "type" in item else {"type": "message", **item})
    return tuple(items)


def _check_model(fields: Json) -> None:
    model = fields.get("model")
    if model is None:
        raise errors.missing_required("model")
    if not isinstance(model, str) or not model:
        raise errors.invalid_type("model", "a non-empty string", model)


def _check_types(fields: Json) -> None:
    for name, (types, expected) in _FIELD_TYPES.items():
        if name not in fields:
            continue
        value = fields[name]
        # JSON true/false are not numbers, though Python's bool is an int.
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            raise errors.invalid_type(name, expected, value)


def _check_ranges(fields: Json) -> None:
    for name, (low, high) in _RANGES.items():
        value = fields.get(name)
        if value is not None and not low <= value <= high:
            raise errors.out_of_range(name, value, low, high)


def _metadata(fields: Json) -> dict[str, str]:
    metadata: dict[str, Any] = fields.get("metadata", {})
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise errors.invalid_type(f"metadata.{key}", "a string", value)
    return metadata
