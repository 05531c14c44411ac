"""The request's `tools`, checked, in the shape OpenAI's Response echoes them.

OpenAI answers every function tool with all of its fields, each of its type (openai-python's
`FunctionTool`; the OpenResponses `FunctionTool`, which strict clients validate, requires them):
`name` a string, `description` a string or null, `parameters` an object or null, `strict` a
boolean. What the request left out (or sent as null) is filled in: `strict` true, OpenAI's default
for the Responses API, the others null. (OpenAI falls back to `strict: false` for a schema it
cannot make strict; the simulator does not judge schemas.) A field of the wrong type gets OpenAI's
400 `invalid_type` naming it (`tools[0].strict`), as any other field of the request does.

Function tools inside a `namespace` tool are treated the same. Tools of other types, and fields
of a function tool the simulator does not know, are echoed as sent.
"""

from __future__ import annotations

from typing import Any

from app.simulator import errors
from app.simulator.errors import Json

STRICT_DEFAULT = True

# Optional fields of a function tool: field -> (its JSON type as a Python type, OpenAI's name).
_FUNCTION_FIELDS: dict[str, tuple[type, str]] = {
    "description": (str, "a string"),
    "parameters": (dict, "an object"),
    "strict": (bool, "a boolean"),
}


def echoed_tools(tools: list[Any]) -> tuple[Json, ...]:
    """The tools as the response echoes them; raises the first `SimError` met, in order."""
    return tuple(_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools))


def _tool(tool: object, where: str) -> Json:
    if not isinstance(tool, dict):
        raise errors.invalid_type(where, "an object", tool)
    kind = _required_string(tool, "type", where)
    if kind == "function":
        return _function(tool, where)
    inner = tool.get("tools")
    if kind == "namespace" and isinstance(inner, list):
        return {**tool, "tools": [_tool(t, f"{where}.tools[{i}]") for i, t in enumerate(inner)]}
    return tool


def _function(tool: Json, where: str) -> Json:
    echoed: Json = {
        "type": "function",
        "name": _required_string(tool, "name", where),
        "description": None,
        "parameters": None,
        "strict": STRICT_DEFAULT,
    }
    for field, (kind, expected) in _FUNCTION_FIELDS.items():
        value = tool.get(field)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise errors.invalid_type(f"{where}.{field}", expected, value)
        echoed[field] = value
    return {**tool, **echoed}


def _required_string(tool: Json, field: str, where: str) -> str:
    value = tool.get(field)
    if value is None:
        raise errors.missing_required(f"{where}.{field}")
    if not isinstance(value, str):
        raise errors.invalid_type(f"{where}.{field}", "a string", value)
    return value
