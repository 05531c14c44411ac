"""Hostile frames (CONTRACT.md §3): hypothesis throws malformed, oversized, deeply nested,
wrong-typed and random frames at one real socket of a real gateway.

Every frame must get exactly one answer: one error frame (with `status`, and a code from the
contract's table), or the events of an accepted turn ending in a terminal event, or, for frames
over `GATEWAY_MAX_FRAME_BYTES` and invalid UTF-8, a contract close code (1009, 1007). Nothing may
raise out of a handler (no exception reaches the event loop, no ERROR log line), the session is
idle again after each answer, and a valid turn on the same socket still works afterwards.

How one frame is judged: the fuzz frame is followed at once by a *sentinel*, a `response.create`
naming `openai/gpt-other` on a socket pre-locked (`?model=`) to `openai/gpt-test`. Checks 1-5
pass, so the sentinel is answered by check 6 or 7: `response_already_in_flight` when the fuzz frame
was accepted (its turn is then read to its terminal event), `model_mismatch` when it was not.
Everything the socket said before the sentinel's error is the fuzz frame's answer.

The frame generator, `Prober` and `judge` are shared with `scripts/fuzz.py`, the longer run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from conftest import Gateway, Tenant
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.protocol import KNOWN_FIELDS
from app.session import State

MODEL = "openai/gpt-test"  # the model every fuzz socket is locked to (conftest's MODEL)
SENTINEL_MODEL = "openai/gpt-other"  # allowed and priced for conftest's tenant: passes checks 1-5
LIMIT = 8192  # GATEWAY_MAX_FRAME_BYTES in this module: oversized frames stay cheap
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})

# CONTRACT.md §3: every error code the gateway sends on a socket, with its status.
WS_ERRORS = {
    "invalid_response_create": 400,
    "openai_routing_failed": 403,
    "response_already_in_flight": 409,
    "model_mismatch": 400,
    "rate_limit_exceeded": 429,
    "upstream_websocket_handshake_failed": 502,
    "upstream_websocket_closed": 502,
    "previous_response_not_found": 400,
    "api_key_revoked": 401,
    "api_key_expired": 401,
    "team_disabled": 403,
    "server_shutting_down": 503,
}
# The codes checks 1-8 answer a refused frame with.
FRAME_REFUSALS = frozenset(
    {
        "invalid_response_create",
        "openai_routing_failed",
        "response_already_in_flight",
        "model_mismatch",
        "rate_limit_exceeded",
    }
)
TYPE_OF_STATUS = {
    400: "invalid_request_error",
    409: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}

# orjson loads up to 1024 levels but dumps only 254: a frame nested 255-1024 deep used to be
# parsed and then break the gateway when it serialized it again (the regressions below).
DUMPS_DEPTH_LIMIT = 254
# The simulator logs an ERROR when a request breaks it (a body it cannot echo, nested 253 levels
# deep); the gateway's part is to answer with an error frame, which `judge` checks.
SIMULATOR_LOGGER = "app.simulator"


# -- frames ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One client WebSocket message: its payload bytes, sent as a text or a binary frame."""

    data: bytes
    binary: bool = False
    note: str = ""  # which generator made it, for the report

    @property
    def text(self) -> str | None:
        """The payload as text, or None when it is not valid UTF-8."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def size(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 300 else self.data[:300] + b"..."
        kind = "binary" if self.binary else "text"
        return f"Frame({self.note}, {kind}, {self.size} B, {shown!r})"


def encode(value: Any, ascii_only: bool = True) -> bytes:
    """JSON text of `value`; lone surrogates come out as `\\udxxx` escapes or as invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def text_frame(value: Any, note: str, ascii_only: bool = True) -> Frame:
    return Frame(encode(value, ascii_only), note=note)


def _chars(nul: bool, surrogates: bool) -> st.SearchStrategy[str]:
    # Hypothesis' characters() may draw lone surrogates itself: left out unless asked.
    chars = st.characters(exclude_categories=["Cs"])
    if surrogates:
        chars = chars | st.characters(categories=["Cs"])
    return chars if nul else chars.filter(lambda c: c != "\x00")


def texts(
    max_size: int = 16, *, nul: bool = True, surrogates: bool = True
) -> st.SearchStrategy[str]:
    return st.text(_chars(nul, surrogates), max_size=max_size)


def json_values(max_leaves: int = 8, *, surrogates: bool = True) -> st.SearchStrategy[Any]:
    text = texts(surrogates=surrogates)
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | text
    )
    return st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.dictionaries(texts(8, surrogates=surrogates), kids, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def clean_texts(max_size: int = 16) -> st.SearchStrategy[str]:
    """Text a strict JSON reader takes: no lone surrogates."""
    return texts(max_size, surrogates=False)


def clean_values(max_leaves: int = 4) -> st.SearchStrategy[Any]:
    return json_values(max_leaves, surrogates=False)


def _metadata_keys(min_size: int = 0, max_size: int = 64) -> st.SearchStrategy[str]:
    # `sim_*` keys are the simulator's switches (faults, delays): not the gateway's business.
    keys = st.text(_chars(nul=True, surrogates=False), min_size=min_size, max_size=max_size)
    return keys.filter(lambda k: not k.startswith("sim_"))


def _messages() -> st.SearchStrategy[list[Any]]:
    message = st.fixed_dictionaries({"role": st.just("user"), "content": clean_texts(40)})
    return st.lists(message, max_size=3)


def _numbers(low: float, high: float) -> st.SearchStrategy[float]:
    return st.integers(int(low), int(high)) | st.floats(low, high)


def _one_pair(keys: st.SearchStrategy[str], values: st.SearchStrategy[Any]) -> Any:
    return st.dictionaries(keys, values, min_size=1, max_size=1)


# Values each known field may take (CONTRACT.md §3 check 4, and OpenAI's types for the fields
# the contract names by example); anything in INVALID is of the wrong type or out of range.
# Both hold only text a strict JSON reader takes, so the field is the frame's only fault.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "temperature": _numbers(0, 2),
    "top_p": _numbers(0, 1),
    "top_logprobs": st.integers(0, 20),
    "max_output_tokens": st.integers(1, 2**31),
    "metadata": st.dictionaries(_metadata_keys(), st.text(max_size=512), max_size=16),
    "input": clean_texts(40) | _messages(),
    "store": st.booleans(),
    "stream": st.booleans(),
    "background": st.booleans(),
    "parallel_tool_calls": st.booleans(),
    "instructions": clean_texts(40),
    "user": clean_texts(),
    "reasoning": st.dictionaries(clean_texts(8), clean_values(), max_size=2),
    "include": st.lists(clean_texts(), max_size=2),
}
_NOT_A_NUMBER = st.booleans() | clean_texts() | st.lists(st.integers(), max_size=2)
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.floats(min_value=2, exclude_min=True, allow_infinity=False)
    | st.floats(max_value=-1e-9, allow_infinity=False)
    | st.integers(min_value=3)
    | _NOT_A_NUMBER,
    "top_p": st.floats(min_value=1, exclude_min=True, allow_infinity=False)
    | st.integers(max_value=-1)
    | _NOT_A_NUMBER,
    "top_logprobs": st.integers(min_value=21)
    | st.integers(max_value=-1)
    | st.floats(0, 20).filter(lambda f: not f.is_integer())
    | _NOT_A_NUMBER,
    "max_output_tokens": st.integers(max_value=0)
    | st.floats(1, 1e6).filter(lambda f: not f.is_integer())
    | _NOT_A_NUMBER,
    "metadata": st.dictionaries(_metadata_keys(), clean_texts(4), min_size=17, max_size=20)
    | _one_pair(_metadata_keys(65, 80), clean_texts(4))
    | _one_pair(st.just("k"), st.text(min_size=513, max_size=600))
    | _one_pair(st.just("k"), st.integers() | st.booleans() | st.lists(clean_texts(), max_size=1))
    | st.lists(clean_texts(), max_size=2)
    | clean_texts(),
    "input": st.integers() | st.booleans() | st.dictionaries(clean_texts(4), clean_texts(4)),
    "store": st.integers() | clean_texts() | st.lists(st.booleans(), max_size=1),
    "stream": st.integers() | clean_texts(),
    "background": st.integers() | clean_texts(),
    "parallel_tool_calls": st.integers() | clean_texts(),
    "instructions": st.integers() | st.booleans() | st.lists(clean_texts(), max_size=1),
    "user": st.integers() | st.dictionaries(clean_texts(4), clean_texts(4), max_size=1),
    "previous_response_id": st.integers() | st.booleans() | st.lists(clean_texts(), max_size=1),
    "reasoning": clean_texts() | st.integers() | st.lists(clean_texts(), max_size=1),
    "tools": clean_texts() | st.integers() | st.dictionaries(clean_texts(4), clean_texts(4)),
    "include": clean_texts() | st.integers(),
}
BAD_MODELS: list[Any] = [
    "",
    "gpt-test",
    "openai/",
    "openai/a/b",
    "openai/gpt test",
    "OPENAI/gpt-test",
    "openai/gpt-test\n",
    " openai/gpt-test",
    "anthropic/claude-3",
    "openai/o3",  # not allowed for the tenant: routing
    "openai/gpt-unpriced",  # no price: routing
    SENTINEL_MODEL,  # allowed and priced, but the socket is locked: model_mismatch
    5,
    True,
    ["openai/gpt-test"],
    {"id": "openai/gpt-test"},
]


def models() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.just(MODEL),
        st.sampled_from(BAD_MODELS),
        texts().map(lambda s: "openai/" + s),  # control characters, NUL included
        json_values(4),
    )


def _valid_or_wrong(name: str) -> st.SearchStrategy[Any]:
    if name == "metadata":  # never random `sim_*` switches
        return st.one_of(VALID[name], INVALID[name], st.none())
    if name == "previous_response_id":  # kept by the ledger: a NUL used to lose the row
        return st.one_of(texts(), INVALID[name], st.none())
    options = [json_values(6), st.none()]
    if name in VALID:
        options.append(VALID[name])
    if name in INVALID:
        options.append(INVALID[name])
    return st.one_of(options)


OTHER_FIELDS = sorted(KNOWN_FIELDS - {"model", "type", "previous_response_id"})


@st.composite
def creates(draw: st.DrawFn) -> dict[str, Any]:
    """A `response.create` with random known fields (right or wrong types), flat or nested."""
    names = draw(st.lists(st.sampled_from([*OTHER_FIELDS, "previous_response_id"]), max_size=5))
    fields: dict[str, Any] = {n: draw(_valid_or_wrong(n)) for n in names}
    extra = draw(
        st.dictionaries(
            texts(10).filter(lambda k: k not in KNOWN_FIELDS and k not in ("type", "response")),
            json_values(4),
            max_size=2,
        )
    )
    fields.update(extra)
    if draw(st.booleans()):
        fields["model"] = draw(models())
    if draw(st.booleans()):
        return {"type": "response.create", **fields}
    outside = draw(
        st.fixed_dictionaries(
            {},
            optional={"model": models(), "stream_id": json_values(3)},
        )
    )
    return {"type": "response.create", **outside, "response": fields}


@st.composite
def valid_creates(draw: st.DrawFn) -> dict[str, Any]:
    """A `response.create` every check accepts: right types and ranges, unknown fields kept."""
    names = draw(st.lists(st.sampled_from(sorted(VALID)), max_size=5, unique=True))
    fields: dict[str, Any] = {n: draw(VALID[n]) for n in names}
    unknown = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
        lambda k: k not in KNOWN_FIELDS and k not in ("type", "response")
    )
    fields.update(draw(st.dictionaries(unknown, clean_values(), max_size=2)))
    fields["model"] = MODEL
    if draw(st.booleans()):
        return {"type": "response.create", **fields}
    return {"type": "response.create", "response": fields}


@st.composite
def wrong_field_creates(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid `response.create` but for one known field of the wrong type or range."""
    name = draw(st.sampled_from(sorted(INVALID)))
    frame: dict[str, Any] = {"type": "response.create", "model": MODEL, "input": "hi"}
    frame[name] = draw(INVALID[name])
    # A lone surrogate somewhere makes the whole text one a strict JSON reader refuses (an error
    # with no `param`, tested elsewhere): not a wrong field.
    try:
        orjson.loads(encode(frame))
    except orjson.JSONDecodeError:
        assume(False)
    return name, frame


def _deep(depth: int, opener: str) -> str:
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def depths() -> st.SearchStrategy[int]:
    """Shallow, around orjson's dump limit (254) and parse limit (1024), and past both."""
    return st.one_of(
        st.integers(1, 3000),
        st.integers(DUMPS_DEPTH_LIMIT - 3, DUMPS_DEPTH_LIMIT + 3),
        st.integers(1020, 1026),
    )


@st.composite
def deep_frames(draw: st.DrawFn) -> Frame:
    depth = draw(depths())
    value = _deep(depth, draw(st.sampled_from(["[", "{"])))
    where = draw(st.sampled_from(["alone", "input", "tools", "text", "x_unknown", "stream_id"]))
    if where == "alone":
        return Frame(value.encode(), note=f"deep: {depth}")
    head = {"type": "response.create", "model": draw(st.sampled_from([MODEL, "gpt-test"]))}
    body = json.dumps(head)[:-1] + f', "{where}": {value}}}'
    return Frame(body.encode(), note=f"deep: {depth} in {where}")


@st.composite
def mutated_frames(draw: st.DrawFn) -> Frame:
    """A JSON frame cut, spliced or corrupted at a random place."""
    data = encode(draw(creates()))
    at = draw(st.integers(0, len(data)))
    how = draw(st.sampled_from(["cut", "insert", "delete", "double"]))
    if how == "cut":
        data = data[:at]
    elif how == "insert":
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    elif how == "delete":
        data = data[:at] + data[at + 1 :]
    else:
        data = data + data
    return Frame(data, note=f"mutated: {how}")


@st.composite
def near_limit_frames(draw: st.DrawFn, limit: int = LIMIT) -> Frame:
    """A valid turn padded to within a few bytes of the limit, or exactly to it."""
    size = draw(st.integers(limit - 64, limit) | st.just(limit))
    message = {"role": "user", "content": ""}
    head = {"type": "response.create", "model": MODEL, "input": [message]}
    message["content"] = "x" * (size - len(encode(head)))
    data = encode(head)
    assert len(data) == size
    return Frame(data, note=f"near limit: {size}")


@st.composite
def oversized_frames(draw: st.DrawFn, limit: int = LIMIT) -> Frame:
    """A frame over the limit: a valid turn, random text, binary or invalid UTF-8."""
    size = draw(st.integers(limit + 1, 4 * limit))
    kind = draw(st.sampled_from(["turn", "text", "binary", "invalid utf-8"]))
    if kind == "turn":
        head = {"type": "response.create", "model": MODEL, "input": "x" * size}
        return Frame(encode(head), note="oversized: turn")
    fill = draw(st.binary(min_size=1, max_size=16))
    data = (fill * (size // len(fill) + 1))[:size]
    if kind == "text":
        return Frame(bytes(32 + b % 95 for b in data), note="oversized: text")
    if kind == "invalid utf-8":
        return Frame(b"\xff" + data[1:], note="oversized: invalid utf-8")
    return Frame(data, binary=True, note="oversized: binary")


def frames(limit: int = LIMIT, *, oversized: bool = False) -> st.SearchStrategy[Frame]:
    """Every kind of hostile frame (oversized ones only when asked: each costs a reconnect)."""
    kinds: list[st.SearchStrategy[Frame]] = [
        json_values().map(lambda v: text_frame(v, "random json")),
        json_values()
        .filter(lambda v: not isinstance(v, dict))
        .map(lambda v: text_frame(v, "json, not an object")),
        texts(200).map(lambda s: Frame(s.encode("utf-8", "surrogatepass"), note="random text")),
        st.binary(max_size=200).map(lambda b: Frame(b, note="random bytes as text")),
        st.binary(max_size=300).map(lambda b: Frame(b, binary=True, note="binary")),
        creates().map(lambda v: text_frame(v, "response.create")),
        creates().map(lambda v: Frame(encode(v), True, "binary json")),
        creates().map(lambda v: text_frame(v, "response.create, raw unicode", ascii_only=False)),
        valid_creates().map(lambda v: text_frame(v, "valid response.create")),
        wrong_field_creates().map(lambda nv: text_frame(nv[1], f"wrong field: {nv[0]}")),
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(
                    ["response.cancel", "session.update", "", "Response.Create"]
                )
                | json_values(3)
            },
            optional={"model": models(), "stream_id": json_values(3)},
        ).map(lambda v: text_frame(v, "other type")),
        st.dictionaries(texts(8), json_values(4), max_size=3).map(
            lambda v: text_frame({**v, "type": "response.processed"}, "response.processed")
        ),
        deep_frames(),
        mutated_frames(),
        near_limit_frames(limit),
    ]
    if oversized:
        kinds.append(oversized_frames(limit))
    return st.one_of(kinds)


# -- judging one frame ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the socket said to one frame."""

    answer: list[dict[str, Any]] = field(default_factory=list)
    accepted: bool = False  # the sentinel found the frame's turn in flight
    closed: int | None = None  # the gateway closed the socket with this code
    problems: list[str] = field(default_factory=list)  # seen while reading

    @property
    def kind(self) -> str:
        if self.closed is not None:
            return f"closed {self.closed}"
        if self.accepted:
            last = self.answer[-1] if self.answer else {}
            code = (last.get("error") or {}).get("code") if last.get("type") == "error" else None
            return f"accepted -> {last.get('type')}" + (f" {code}" if code else "")
        if not self.answer:
            return "ignored"
        first = self.answer[0]
        return f"refused {(first.get('error') or {}).get('code')}"


def _as_value(frame: Frame) -> Any:
    """The frame's JSON as a strict reader sees it (no NaN, no binary); None if it is none."""
    text = frame.text
    if frame.binary or text is None:
        return None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _field_names(value: dict[str, Any]) -> set[str]:
    names = set(value)
    nested = value.get("response")
    if isinstance(nested, dict):
        names |= set(nested)
    return names


def error_shape_problems(event: dict[str, Any], gateway_made: bool) -> list[str]:
    """CONTRACT.md §3: every error frame has `status`; the gateway's own use the table."""
    problems: list[str] = []
    status = event.get("status")
    error = event.get("error")
    if not isinstance(status, int) or isinstance(status, bool):
        problems.append(f"error frame without an integer status: {event}")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str | None):
        return [*problems, f"error frame without an error object: {event}"]
    if not gateway_made:
        return problems
    code = error.get("code")
    if code not in WS_ERRORS:
        problems.append(f"error code {code!r} is not in the contract's table: {event}")
    elif status != WS_ERRORS[code]:
        problems.append(f"{code} with status {status}, expected {WS_ERRORS[code]}")
    expected_type = TYPE_OF_STATUS.get(status, "server_error") if isinstance(status, int) else None
    if error.get("type") != expected_type:
        problems.append(f"{code} with error.type {error.get('type')!r}, expected {expected_type}")
    if not isinstance(error.get("message"), str) or not error.get("message"):
        problems.append(f"{code} without a message")
    if "param" not in error or not isinstance(error["param"], str | None):
        problems.append(f"{code} without a string or null param")
    return problems


def judge(frame: Frame, outcome: Outcome, limit: int) -> list[str]:
    """The contract's promises for one frame; empty when the gateway kept them all."""
    problems = list(outcome.problems)
    if outcome.closed is not None:
        if frame.size > limit:
            if outcome.closed != 1009:
                problems.append(f"oversized frame closed with {outcome.closed}, expected 1009")
        elif not frame.binary and frame.text is None:
            if outcome.closed != 1007:
                problems.append(f"invalid UTF-8 closed with {outcome.closed}, expected 1007")
        else:
            problems.append(f"socket closed with {outcome.closed}; it should have stayed open")
        return problems
    if frame.size > limit:
        problems.append(f"a {frame.size} B frame (limit {limit}) did not close the socket")
    value = _as_value(frame)
    if outcome.accepted:
        return problems + _accepted_problems(frame, value, outcome.answer)
    if not outcome.answer:
        if not (isinstance(value, dict) and value.get("type") == "response.processed"):
            problems.append("no answer: only response.processed may be dropped silently")
        return problems
    if len(outcome.answer) != 1:
        kinds = [e.get("type") for e in outcome.answer]
        return [*problems, f"a refused frame got {len(kinds)} frames, expected one: {kinds}"]
    event = outcome.answer[0]
    if event.get("type") != "error":
        return [*problems, f"a frame that was not accepted got {event.get('type')!r}"]
    problems += error_shape_problems(event, gateway_made=True)
    code = (event.get("error") or {}).get("code")
    if code not in FRAME_REFUSALS:
        problems.append(f"{code!r} is not a refusal of checks 1-8")
    if not isinstance(value, dict) or value.get("type") != "response.create":
        if code != "invalid_response_create":
            problems.append(f"a frame that is no response.create got {code!r}")
    param = (event.get("error") or {}).get("param")
    if param is not None and isinstance(value, dict):
        if param not in _field_names(value) | {"type", "model"}:
            problems.append(f"param {param!r} names no field of the frame")
    return problems


def _accepted_problems(frame: Frame, value: Any, answer: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    if not isinstance(value, dict) or value.get("type") != "response.create":
        problems.append("a frame that is no response.create was accepted")
    terminals = [e for e in answer if e.get("type") in TERMINAL]
    if len(terminals) != 1 or answer[-1] is not terminals[0]:
        problems.append(f"an accepted turn must end in one terminal event: {len(terminals)}")
    for event in answer:
        if event.get("type") == "error":
            code = (event.get("error") or {}).get("code")
            problems += error_shape_problems(event, gateway_made=code in WS_ERRORS)
    return problems


# -- one socket, many frames ----------------------------------------------------------------------

Check = Callable[[], Awaitable[str | None]]


async def _no_check() -> str | None:
    return None


class Prober:
    """One client socket (reopened when the gateway closes it) that judges frames one by one."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        compress: bool = False,
        timeout: float = 15.0,
        idle_check: Check = _no_check,
        gone_check: Check = _no_check,
    ) -> None:
        self.url = url
        self.key = key
        self.compress = compress
        self.timeout = timeout
        self.idle_check = idle_check  # the node's view: this socket's session is idle
        self.gone_check = gone_check  # the node's view: a closed socket's session has gone
        self.connects = 0
        self._token = secrets.token_hex(4)
        self._count = 0
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _socket(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(
            self.url,
            params={"model": MODEL},  # pre-locks the session: the sentinel's check 7
            headers={"Authorization": f"Bearer {self.key}"},
            max_msg_size=0,
            compress=15 if self.compress else 0,
            autoclose=True,
        )
        self.connects += 1
        return self._ws

    async def reset(self) -> None:
        """Close the socket: the next frame opens a new one (after a fault: a clean one)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def probe(self, frame: Frame) -> Outcome:
        try:
            outcome = await self._probe(frame)
        except BaseException:
            await self.reset()
            raise
        if outcome.problems or outcome.closed is not None:
            await self.reset()
        return outcome

    async def _probe(self, frame: Frame) -> Outcome:
        ws = await self._socket()
        self._count += 1
        sentinel = f"sentinel-{self._token}-{self._count}"
        outcome = Outcome()
        try:
            await ws.send_frame(
                frame.data, aiohttp.WSMsgType.BINARY if frame.binary else aiohttp.WSMsgType.TEXT
            )
            await ws.send_str(
                orjson.dumps(
                    {
                        "type": "response.create",
                        "model": SENTINEL_MODEL,
                        "input": [],
                        "stream_id": sentinel,
                    }
                ).decode()
            )
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            pass  # the gateway closed the socket already: its close frame is read below
        reply = await self._read(ws, outcome, sentinel, until_sentinel=True)
        if reply is None:
            return outcome
        code = (reply.get("error") or {}).get("code")
        if code == "response_already_in_flight":
            outcome.accepted = True
            if not any(e.get("type") in TERMINAL for e in outcome.answer):
                await self._read(ws, outcome, sentinel, until_sentinel=False)
        elif code != "model_mismatch":
            outcome.problems.append(f"the sentinel got {code!r}: {reply}")
        if outcome.closed is None and not outcome.problems:
            problem = await self.idle_check()
            if problem:
                outcome.problems.append(problem)
        return outcome

    async def _read(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        outcome: Outcome,
        sentinel: str,
        *,
        until_sentinel: bool,
    ) -> dict[str, Any] | None:
        """Frames into `outcome.answer` until the sentinel's error (returned) or a terminal."""
        while True:
            try:
                msg = await ws.receive(timeout=self.timeout)
            except TimeoutError:
                waited = "error for the sentinel" if until_sentinel else "terminal event"
                outcome.problems.append(f"no {waited} within {self.timeout:g} s")
                return None
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    outcome.problems.append("the gateway sent a binary frame")
                    continue
                outcome.closed = ws.close_code
                if outcome.closed is not None and outcome.closed >= 1000:
                    problem = await self.gone_check()
                    if problem:
                        outcome.problems.append(problem)
                return None
            try:
                event = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                outcome.problems.append(f"the gateway sent a frame that is not JSON: {msg.data!r}")
                continue
            if not isinstance(event, dict):
                outcome.problems.append(f"the gateway sent a frame that is not an object: {event}")
                continue
            if event.get("stream_id") == sentinel:
                if until_sentinel and event.get("type") == "error":
                    return event
                outcome.problems.append(f"a stray sentinel frame: {event}")
                continue
            outcome.answer.append(event)
            if not until_sentinel and event.get("type") in TERMINAL:
                return None

    async def valid_turn(self, text: str = "still here") -> list[str]:
        """A plain turn on the current socket; the problems, empty when it streamed as usual."""
        ws = await self._socket()
        body = {"type": "response.create", "model": MODEL, "input": text}
        await ws.send_str(orjson.dumps(body).decode())
        events: list[dict[str, Any]] = []
        while True:
            try:
                msg = await ws.receive(timeout=self.timeout)
            except TimeoutError:
                return [f"a valid turn got no terminal event in {self.timeout:g} s: {events}"]
            if msg.type is not aiohttp.WSMsgType.TEXT:
                return [f"a valid turn got {msg.type.name} (close code {ws.close_code})"]
            events.append(orjson.loads(msg.data))
            if events[-1].get("type") in TERMINAL:
                break
        got = "".join(e.get("delta", "") for e in events if e.get("type", "").endswith(".delta"))
        if events[-1]["type"] != "response.completed" or got != f"echo: {text}":
            return [f"a valid turn ended with {events[-1]} (text {got!r})"]
        return []


class Watch:
    """What must never happen while fuzzing: an exception reaching the event loop (a task that
    died, a callback that raised) or an ERROR log line / traceback from any logger."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None
        self._handler = _Recorder(self.faults)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        logging.getLogger().addHandler(self._handler)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self._handler)
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.faults.append(f"event loop: {context.get('message')} {context.get('exception')!r}")

    def take(self, collect: bool = False) -> list[str]:
        """The faults seen since the last call; `collect` first frees dead tasks, so a task that
        died with an exception nobody awaited is reported too."""
        if collect:
            gc.collect()
        faults = list(self.faults)
        self.faults.clear()
        return faults


class _Recorder(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(SIMULATOR_LOGGER):
            return  # the upstream stand-in's own trouble; what the gateway made of it is judged
        if record.levelno >= logging.ERROR or record.exc_info:
            exc = f" {record.exc_info[1]!r}" if record.exc_info else ""
            self.sink.append(f"log {record.name} {record.levelname}: {record.getMessage()}{exc}")


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"GATEWAY_MAX_FRAME_BYTES": LIMIT}


def node_checks(gateway: Gateway) -> tuple[Check, Check]:
    """The node's side of a probe: the socket's session is idle again / has gone after a close."""

    async def idle() -> str | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while True:
            sessions = gateway.sessions
            busy = [s for s in sessions if s.state is not State.IDLE or s.turn is not None]
            if len(sessions) == 1 and not busy:
                return None
            if loop.time() > end:
                shown = [(s.state.value, s.turn is not None) for s in sessions]
                return f"the node's sessions are not one idle session: {shown}"
            await asyncio.sleep(0.01)

    async def gone() -> str | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while gateway.node.sessions:
            if loop.time() > end:
                return f"{len(gateway.node.sessions)} session(s) left after the socket closed"
            await asyncio.sleep(0.01)
        return None

    return idle, gone


@pytest.fixture
async def watch() -> AsyncIterator[Watch]:
    found = Watch()
    found.install(asyncio.get_running_loop())
    try:
        yield found
    finally:
        found.uninstall()


@pytest.fixture
async def prober(gateway: Gateway, tenant: Tenant, watch: Watch) -> AsyncIterator[Prober]:
    idle, gone = node_checks(gateway)
    probe = Prober(gateway.url("/v1/responses"), tenant.key, idle_check=idle, gone_check=gone)
    yield probe
    await probe.close()
    # A task that died is reported when it is freed: collect it now, while `watch` still holds
    # the loop's exception handler. Left to a later collection, asyncio's default handler formats
    # its traceback, which on CPython 3.11.7 can hit the `ast` recursion-depth bug (gh-106905)
    # and leave the thread's recursion counter off: a later failure report then crashes pytest
    # (INTERNALERROR "AST constructor recursion depth mismatch").
    await asyncio.sleep(0.05)
    assert not watch.take(collect=True)


FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no example database: a failure prints the blob that reproduces it
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


async def check_all(prober: Prober, watch: Watch, batch: list[Frame]) -> list[str]:
    """Judge each frame of `batch`, then a valid turn on the same socket; the problems."""
    problems: list[str] = []
    for frame in batch:
        outcome = await prober.probe(frame)
        found = judge(frame, outcome, LIMIT)
        problems += [f"{frame!r} -> {outcome.kind}: {p}" for p in found]
        if problems:
            break
    else:
        problems += [f"after the batch: {p}" for p in await prober.valid_turn()]
    return problems + watch.take()


@settings(FUZZ, max_examples=80)
@given(batch=st.lists(frames(), min_size=1, max_size=6))
async def test_every_frame_gets_one_answer_and_the_socket_stays_usable(
    prober: Prober, watch: Watch, batch: list[Frame]
) -> None:
    problems = await check_all(prober, watch, batch)
    assert not problems, "\n".join(problems)


@settings(FUZZ, max_examples=12)
@given(frame=oversized_frames())
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "deflate"])
async def test_oversized_frames_close_1009_then_a_new_socket_works(
    prober: Prober, watch: Watch, frame: Frame, compress: bool
) -> None:
    prober.compress = compress
    problems = await check_all(prober, watch, [frame])
    assert not problems, "\n".join(problems)


@settings(FUZZ, max_examples=25)
@given(data=st.binary(min_size=1, max_size=64).filter(lambda b: _invalid_utf8(b)))
async def test_invalid_utf8_closes_1007_or_is_refused(
    prober: Prober, watch: Watch, data: bytes
) -> None:
    frame = Frame(data, note="invalid utf-8")
    outcome = await prober.probe(frame)
    assert not judge(frame, outcome, LIMIT), (frame, outcome)
    assert outcome.closed == 1007 or outcome.kind == "refused invalid_response_create", outcome
    assert not await prober.valid_turn()
    assert not watch.take()


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(FUZZ, max_examples=40)
@given(value=valid_creates())
async def test_valid_creates_are_accepted(prober: Prober, watch: Watch, value: Any) -> None:
    frame = text_frame(value, "valid")
    outcome = await prober.probe(frame)
    assert not judge(frame, outcome, LIMIT), (frame, outcome)
    assert outcome.accepted, (frame, outcome)
    assert not watch.take()


@settings(FUZZ, max_examples=60)
@given(case=wrong_field_creates())
async def test_a_wrong_known_field_is_named_in_param(
    prober: Prober, watch: Watch, case: tuple[str, dict[str, Any]]
) -> None:
    name, value = case
    frame = text_frame(value, f"wrong field: {name}")
    outcome = await prober.probe(frame)
    assert not judge(frame, outcome, LIMIT), (frame, outcome)
    assert outcome.kind == "refused invalid_response_create", (frame, outcome)
    assert outcome.answer[0]["error"]["param"] == name, (frame, outcome)
    assert not watch.take()


async def test_one_byte_over_the_limit_closes_1009(prober: Prober, watch: Watch) -> None:
    below = _padded_turn(LIMIT - 1)
    outcome = await prober.probe(below)
    assert outcome.accepted and not judge(below, outcome, LIMIT), outcome
    over = _padded_turn(LIMIT + 1)
    outcome = await prober.probe(over)
    assert outcome.closed == 1009 and not judge(over, outcome, LIMIT), outcome
    assert not await prober.valid_turn()
    assert not watch.take()


def _padded_turn(size: int) -> Frame:
    head = {"type": "response.create", "model": MODEL, "input": ""}
    head["input"] = "x" * (size - len(encode(head)))
    return Frame(encode(head), note=f"padded: {size}")


# -- regressions: what the fuzzer found (fixed in 516e4b0 and b5a7cc4) ----------------------------


@pytest.mark.parametrize("where", ["input", "tools", "x_unknown"])
async def test_a_deep_field_in_an_accepted_turn_gets_an_error_and_frees_the_socket(
    prober: Prober, watch: Watch, where: str
) -> None:
    value = _deep(DUMPS_DEPTH_LIMIT + 46, "[")
    head = json.dumps({"type": "response.create", "model": MODEL})[:-1]
    frame = Frame(f'{head}, "{where}": {value}}}'.encode(), note="deep: 300")
    outcome = await prober.probe(frame)
    assert not judge(frame, outcome, LIMIT), (frame, outcome)
    assert not await prober.valid_turn()


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
async def test_a_deep_stream_id_on_a_refused_frame_gets_an_error_frame(
    prober: Prober, watch: Watch, nested: bool
) -> None:
    deep = _deep(DUMPS_DEPTH_LIMIT + 46, "[")
    if nested:
        text = f'{{"type":"response.create","response":{{"model":"x","stream_id":{deep}}}}}'
    else:
        text = f'{{"type":"session.update","stream_id":{deep}}}'
    frame = Frame(text.encode(), note="deep stream_id")
    outcome = await prober.probe(frame)
    assert not judge(frame, outcome, LIMIT), (frame, outcome)
    assert outcome.kind == "refused invalid_response_create", outcome
    assert not watch.take()


async def test_a_frame_of_exactly_the_limit_passes(prober: Prober, watch: Watch) -> None:
    at_limit = _padded_turn(LIMIT)
    outcome = await prober.probe(at_limit)
    assert outcome.accepted and not judge(at_limit, outcome, LIMIT), outcome


async def _ledger_rows(gateway: Gateway, database_url: str, sql: str, *args: Any) -> list[Any]:
    assert await gateway.node.ledger.flushed(10)
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "fields",
    [{"model": "openai/gpt-\u0000x"}, {"previous_response_id": "resp_\u0000"}],
    ids=["model", "previous_response_id"],
)
async def test_a_nul_in_a_client_string_still_gets_its_ledger_row(
    prober: Prober,
    watch: Watch,
    gateway: Gateway,
    tenant: Tenant,
    database_url: str,
    fields: dict[str, str],
) -> None:
    body = {"type": "response.create", "model": MODEL, "input": "hi", **fields}
    outcome = await prober.probe(text_frame(body, "nul"))
    assert outcome.answer and outcome.answer[-1]["type"] == "error", outcome
    rows = await _ledger_rows(
        gateway,
        database_url,
        "SELECT error_code FROM turns WHERE key_id = $1 ORDER BY received_at",
        tenant.key_id,
    )
    # The NUL frame's own row comes first (the prober's sentinel turn follows it): a model with
    # a control character is refused at check 3; a NUL previous_response_id goes upstream.
    expected = "invalid_response_create" if "model" in fields else None
    assert rows and rows[0]["error_code"] == expected, rows
    assert not watch.take()


async def test_a_nul_in_the_query_model_still_gets_its_socket_row(
    gateway: Gateway, tenant: Tenant, watch: Watch, database_url: str
) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    async with aiohttp.ClientSession() as http:
        url = gateway.url("/v1/responses") + "?model=openai/gpt-%00"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers=headers)
    assert refused.value.status == 400  # a control character is not a model name
    assert not watch.take()


@pytest.mark.parametrize(
    "frame",
    [
        Frame(b"x" * (LIMIT + 1), binary=True, note="oversized: binary"),
        # Found by scripts/fuzz.py: aiohttp decoded this one before the size was judged (1007).
        Frame(b"\xff" + b"x" * LIMIT, note="oversized: invalid utf-8"),
    ],
    ids=["binary", "invalid-utf-8"],
)
async def test_a_compressed_frame_one_byte_over_the_limit_closes_1009(
    prober: Prober, watch: Watch, frame: Frame
) -> None:
    prober.compress = True
    outcome = await prober.probe(frame)
    assert outcome.closed == 1009, outcome
    assert not await prober.valid_turn()
    assert not watch.take()
