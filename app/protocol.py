"""Client frames: parsing and checks 1-4 of CONTRACT.md §3, and the upstream request body.

Pure functions over JSON values, no I/O, so every rule is tested without sockets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import Code, GatewayError

# No white space, slash or control character (a NUL would not even fit in the ledger).
MODEL_RE = re.compile(r"^openai/[^\s/\x00-\x1f\x7f]+$")
BARE_MODEL_RE = re.compile(r"^[^\s/\x00-\x1f\x7f]+$")
# orjson parses 1024 levels but serializes only 254: a deeper frame could not go upstream.
MAX_DEPTH = 254
PROVIDER_PREFIX = "openai/"

# Fields of OpenAI's `response.create` (openai-python's ResponsesClientEvent). A null in one of
# these means "absent" and is not sent upstream; unknown fields pass through untouched.
KNOWN_FIELDS = frozenset(
    {
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "generate",
        "image",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_id",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
# WebSocket mode: responses run in the foreground and stream by nature.
STRIPPED_FIELDS = ("stream", "stream_options", "background")

_BOOL_FIELDS = ("background", "generate", "parallel_tool_calls", "store", "stream")
_STR_FIELDS = (
    "instructions",
    "previous_response_id",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "service_tier",
    "truncation",
    "user",
)
_OBJECT_FIELDS = ("reasoning", "text", "prompt", "stream_options")
_LIST_FIELDS = ("tools", "include", "context_management")


def _invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(Code.INVALID_RESPONSE_CREATE, message, param=param)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(slots=True)
class ClientFrame:
    """A `response.create` that passed checks 1-4, flattened, with nulls of known fields removed."""

    fields: dict[str, Any]
    model: str  # openai/<model>

    @property
    def stream_id(self) -> Any:
        return self.fields.get("stream_id")

    @property
    def previous_response_id(self) -> str | None:
        value = self.fields.get("previous_response_id")
        return value if isinstance(value, str) else None

    @property
    def input(self) -> Any:
        return self.fields.get("input")

    @property
    def has_decimal_sampling(self) -> bool:
        """A non-integer JSON number in temperature/top_p: OpenAI's silent-close fault."""
        return any(isinstance(self.fields.get(k), float) for k in ("temperature", "top_p"))

    def upstream_body(self, **overrides: Any) -> dict[str, Any]:
        """The request as sent upstream (CONTRACT.md §3 check 9)."""
        body: dict[str, Any] = {"type": "response.create"}
        for key, value in self.fields.items():
            if key not in STRIPPED_FIELDS:
                body[key] = value
        body["model"] = self.model[len(PROVIDER_PREFIX) :]
        body["store"] = False
        body.update(overrides)
        return body


def parse_json_object(data: str | bytes) -> dict[str, Any]:
    """Check 1: one JSON object."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        raise _invalid("Expected one JSON object; the frame is not valid JSON.") from None
    if not isinstance(value, dict):
        raise _invalid(f"Expected one JSON object, got {_type_name(value)}.")
    if _may_be_deep(data):
        try:
            orjson.dumps(value)
        except TypeError:
            raise _invalid(f"The frame is nested deeper than {MAX_DEPTH} levels.") from None
    return value


def _may_be_deep(data: str | bytes) -> bool:
    """Cheap bound: fewer than MAX_DEPTH brackets (let alone characters) cannot nest MAX_DEPTH
    deep."""
    if len(data) <= MAX_DEPTH:
        return False
    if isinstance(data, str):
        return data.count("[") + data.count("{") > MAX_DEPTH
    return data.count(b"[") + data.count(b"{") > MAX_DEPTH


def flatten(frame: dict[str, Any]) -> dict[str, Any]:
    """The nested shape `{"type":…,"response":{…}}` means the flat one; inside wins."""
    fields = frame.copy()  # in C; the frame is the caller's to drop
    fields.pop("type", None)
    nested = fields.get("response")
    if isinstance(nested, dict):
        del fields["response"]
        fields.update(nested)
    if None in fields.values():  # rare: look for the nulls only when there is one
        for key in [k for k, v in fields.items() if v is None and k in KNOWN_FIELDS]:
            del fields[key]
    return fields


# Model names that passed check 3, so that a socket's every turn does not match the pattern again
# (a few names a node; dropped whole when full).
_VALID_MODELS: set[str] = set()
_VALID_MODELS_KEPT = 1024


def check_model(value: object) -> str:
    """Check 3: `openai/<model>`."""
    if type(value) is str and value in _VALID_MODELS:  # a list or an object is unhashable
        return value
    if value is None:
        raise _invalid("Missing model: expected 'openai/<model>'.", "model")
    if not isinstance(value, str) or not MODEL_RE.match(value):
        raise _invalid(f"Invalid model {value!r}: expected 'openai/<model>'.", "model")
    if len(_VALID_MODELS) >= _VALID_MODELS_KEPT:
        _VALID_MODELS.clear()
    _VALID_MODELS.add(value)
    return value


def normalize_query_model(value: str) -> str:
    """`?model=` at the handshake: bare or `openai/` form; returns the `openai/` form."""
    if value.startswith(PROVIDER_PREFIX):
        return check_model(value)
    if BARE_MODEL_RE.match(value):
        return PROVIDER_PREFIX + value
    raise _invalid(f"Invalid model {value!r}: expected 'openai/<model>'.", "model")


def check_fields(fields: dict[str, Any]) -> None:
    """Check 4: known fields' types and ranges; the first violation in `_CHECKS`' order wins.
    Only the fields the frame has are looked at (a handful, against the 28 checked), in the
    frame's order; when one fails, all are looked at again in `_CHECKS`' order."""
    checks = _CHECKS
    try:
        for name, value in fields.items():
            check = checks.get(name)
            if check is not None and value is not None:
                check(name, value)
    except GatewayError:
        present = sorted((name for name in fields if name in checks), key=_RANK.__getitem__)
        for name in present:
            value = fields[name]
            if value is not None:
                checks[name](name, value)
        raise


def _range(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not _is_number(value) or not low <= value <= high:
            raise _invalid(f"{name} must be a number from {low:g} to {high:g}.", name)

    return check


def _top_logprobs(name: str, value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= 20:
        raise _invalid("top_logprobs must be an integer from 0 to 20.", name)


def _max_output_tokens(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise _invalid("max_output_tokens must be a positive integer.", name)


def _max_tool_calls(name: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise _invalid("max_tool_calls must be a non-negative integer.", name)


def _input(name: str, value: Any) -> None:
    if not isinstance(value, str | list):
        raise _invalid(f"input must be a string or an array, got {_type_name(value)}.", name)


def _kind(kind: type | tuple[type, ...], article: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, kind):
            raise _invalid(f"{name} must be {article}, got {_type_name(value)}.", name)

    return check


def _tool_choice(name: str, value: Any) -> None:
    if not isinstance(value, str | dict):
        raise _invalid("tool_choice must be a string or an object.", name)


def _check_metadata(_name: str, value: object) -> None:
    if not isinstance(value, dict):
        raise _invalid(f"metadata must be an object, got {_type_name(value)}.", "metadata")
    if len(value) > 16:
        raise _invalid("metadata holds at most 16 pairs.", "metadata")
    for key, item in value.items():
        if len(key) > 64:
            raise _invalid("metadata keys are at most 64 characters.", "metadata")
        if not isinstance(item, str) or len(item) > 512:
            raise _invalid("metadata values are strings of at most 512 characters.", "metadata")


# Check 4's fields in the order their violations are reported, each with its check (given the
# field's name and a value that is not null).
_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "temperature": _range(0, 2),
    "top_p": _range(0, 1),
    "top_logprobs": _top_logprobs,
    "max_output_tokens": _max_output_tokens,
    "max_tool_calls": _max_tool_calls,
    "metadata": _check_metadata,
    "input": _input,
    **{name: _kind(bool, "a boolean") for name in _BOOL_FIELDS},
    **{name: _kind(str, "a string") for name in _STR_FIELDS},
    **{name: _kind(dict, "an object") for name in _OBJECT_FIELDS},
    **{name: _kind(list, "an array") for name in _LIST_FIELDS},
    "tool_choice": _tool_choice,
}
_RANK = {name: rank for rank, name in enumerate(_CHECKS)}


class Ignored(Exception):
    """A frame that is dropped silently (`response.processed`)."""


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Checks 1-4 in the contract's order. Raises `GatewayError` or `Ignored`."""
    frame = parse_json_object(data)
    kind = frame.get("type")
    if kind == "response.processed":
        raise Ignored
    if kind != "response.create":
        shown = kind if isinstance(kind, str) else _type_name(kind)
        raise _invalid(f"Unsupported message type {shown!r}: expected 'response.create'.", "type")
    fields = flatten(frame)
    model = check_model(fields.get("model"))
    check_fields(fields)
    return ClientFrame(fields=fields, model=model)


def stream_id_of(data: str | bytes) -> Any:
    """Best effort: the `stream_id` of a frame that failed a check, to echo on its error."""
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    nested = value.get("response")
    found = value.get("stream_id")
    if isinstance(nested, dict) and nested.get("stream_id") is not None:
        found = nested["stream_id"]
    # A lane name is a string; anything else is not echoed (it could not even be serialized).
    return found if isinstance(found, str) else None
