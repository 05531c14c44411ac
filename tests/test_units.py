"""Pure pieces, no sockets: the error table, frame checks, conversation memory, SSE."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.errors import SPECS, Code, GatewayError, error_type_for
from app.memory import ConversationMemory, MemoryBudget
from app.protocol import Ignored, parse_client_frame
from app.upstreamlink import event_type, with_stream_id

CONTRACT_TABLE = {
    "invalid_response_create": (400, None),
    "openai_routing_failed": (403, None),
    "response_already_in_flight": (409, None),
    "model_mismatch": (400, None),
    "rate_limit_exceeded": (429, None),
    "upstream_websocket_handshake_failed": (502, None),
    "upstream_websocket_closed": (502, None),
    "previous_response_not_found": (400, None),
    "api_key_revoked": (401, 1008),
    "api_key_expired": (401, 1008),
    "team_disabled": (403, 1008),
    "server_shutting_down": (503, 1001),
}


@pytest.mark.parametrize(("code", "expected"), CONTRACT_TABLE.items())
def test_error_table_matches_the_contract(code: str, expected: tuple[int, int | None]) -> None:
    err = GatewayError(Code(code))
    assert (err.status, err.spec.close_code) == expected
    frame = orjson.loads(err.ws_frame("lane"))
    assert frame == {
        "type": "error",
        "status": expected[0],
        "stream_id": "lane",
        "error": {
            "type": error_type_for(expected[0]),
            "code": code,
            "message": err.message,
            "param": None,
        },
    }


@pytest.mark.parametrize("code", list(Code))
def test_every_code_has_a_spec_and_an_http_body(code: Code) -> None:
    err = GatewayError(code, param="p")
    body = orjson.loads(err.http_body())
    assert body["error"]["code"] == code.value
    assert body["error"]["param"] == "p"
    assert body["error"]["type"] == (SPECS[code].type or error_type_for(SPECS[code].status))
    assert "stream_id" not in orjson.loads(err.ws_frame())


def test_insufficient_quota_has_openais_own_type() -> None:
    body = orjson.loads(GatewayError(Code.INSUFFICIENT_QUOTA).http_body())
    assert (body["error"]["type"], body["error"]["code"]) == ("insufficient_quota",) * 2
    assert SPECS[Code.INSUFFICIENT_QUOTA].status == 429


def test_error_types_follow_status() -> None:
    assert [error_type_for(s) for s in (400, 409, 401, 403, 429, 500, 502, 503)] == [
        "invalid_request_error",
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "rate_limit_error",
        "server_error",
        "server_error",
        "server_error",
    ]


def test_response_processed_is_ignored() -> None:
    with pytest.raises(Ignored):
        parse_client_frame('{"type":"response.processed"}')


def test_null_known_fields_are_absent_unknown_nulls_kept() -> None:
    frame = parse_client_frame(
        '{"type":"response.create","model":"openai/m","instructions":null,"x_future":null}'
    )
    body = frame.upstream_body()
    assert "instructions" not in body
    assert body["x_future"] is None
    assert body["model"] == "m"


@pytest.mark.parametrize(
    ("value", "decimal"), [("1.2", True), ("1.0", True), ("1", False), ("0", False)]
)
def test_decimal_sampling_is_detected(value: str, decimal: bool) -> None:
    frame = parse_client_frame(
        '{"type":"response.create","model":"openai/m","temperature":' + value + "}"
    )
    assert frame.has_decimal_sampling is decimal
    assert orjson.dumps(frame.upstream_body()["temperature"]).decode() == value


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"type":"response.output_text.delta","delta":"x"}', "response.output_text.delta"),
        ('{"sequence_number":1,"type":"error"}', "error"),
        ('{ "type" : "response.completed"}', "response.completed"),
        ("not json", None),
        ("[]", None),
    ],
)
def test_event_type(text: str, kind: str | None) -> None:
    assert event_type(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"response.created","response":{"id":"r","output":[]}}',
        '{ "type" : "response.output_text.delta", "delta": "}" }\n',
        "{}",
        " { } ",
    ],
)
@pytest.mark.parametrize("stream_id", ["lane", 7, {"a": [1]}])
def test_with_stream_id_adds_the_lane_at_the_top_level(text: str, stream_id: Any) -> None:
    stamped = with_stream_id(text, orjson.dumps(stream_id).decode())
    assert orjson.loads(stamped) == {**orjson.loads(text), "stream_id": stream_id}
    if text.startswith('{"type":"'):
        assert event_type(stamped) == event_type(text)  # its type still read without parsing


@pytest.mark.parametrize("text", ["not json", "[1]", '"s"', ""])
def test_with_stream_id_leaves_what_is_no_object(text: str) -> None:
    assert with_stream_id(text, '"lane"') == text


def _msg(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_memory_follows_one_chain() -> None:
    memory = ConversationMemory(10_000)
    memory.record(None, [_msg("a")], "r1", [{"type": "message", "role": "assistant"}])
    memory.record("r1", [_msg("b")], "r2", [])
    assert memory.chain_for("r1") is None  # only the chain's end is remembered
    chain = memory.chain_for("r2")
    assert chain is not None and [i.get("content") for i in chain] == ["a", None, "b"]
    memory.record("r-elsewhere", [_msg("c")], "r3", [])
    assert memory.chain_for("r3") is None and memory.size == 0


def test_memory_holds_json_not_the_turn_s_objects() -> None:
    """The chain is kept as text: what it replays equals what was recorded, whatever later
    happens to the turn's parsed objects (an idle socket keeps a few hundred bytes, not them)."""
    memory = ConversationMemory(10_000)
    text = {"type": "output_text", "text": "é\u2028", "n": 1.5}
    content: list[Any] = [text]
    output: list[Any] = [{"type": "message", "content": content}]
    memory.record(None, [_msg("a")], "r1", output)
    memory.record("r1", [], "r2", [])  # an empty extension adds nothing
    memory.record("r2", [_msg("b")], "r3", [{"type": "reasoning", "summary": []}])
    expected = [
        _msg("a"),
        *output,
        _msg("b"),
        {"type": "reasoning", "summary": []},
    ]
    expected = orjson.loads(orjson.dumps(expected))  # a copy, before the originals change
    turns = [[_msg("a"), *output], [], [_msg("b"), {"type": "reasoning", "summary": []}]]
    assert memory.size == sum(len(orjson.dumps(items)) for items in turns)
    content.clear()
    chain = memory.chain_for("r3")
    assert chain is not None and chain == expected
    chain.append("x")  # each call parses anew: a caller's change is its own
    assert memory.chain_for("r3") == expected


def test_memory_forgets_a_failed_continuation() -> None:
    memory = ConversationMemory(10_000)
    memory.record(None, [_msg("a")], "r1", [])
    memory.forget("r0")
    assert memory.chain_for("r1") is not None
    memory.forget("r1")
    assert memory.chain_for("r1") is None


def test_memory_bound_per_socket() -> None:
    memory = ConversationMemory(100)
    memory.record(None, [_msg("a")], "r1", [])
    memory.record("r1", [_msg("x" * 200)], "r2", [])
    assert memory.chain_for("r2") is None
    assert memory.was_dropped("r2")


def test_memory_bound_per_node_drops_least_recently_extended() -> None:
    budget = MemoryBudget(200)
    first, second = ConversationMemory(1000, budget), ConversationMemory(1000, budget)
    first.record(None, [_msg("a" * 60)], "a1", [])
    second.record(None, [_msg("b" * 60)], "b1", [])
    first.record("a1", [_msg("a" * 60)], "a2", [])  # over 200 bytes: `second` is the oldest
    assert second.chain_for("b1") is None and second.was_dropped("b1")
    assert first.chain_for("a2") is not None
    assert budget.used == first.size
