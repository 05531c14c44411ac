"""The simulator's pure parts, without sockets: generation rules, options, command-line flags."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from app.simulator import SimulatorOptions, add_simulate_arguments, options_from_args
from app.simulator.errors import SimError
from app.simulator.generate import (
    Shaping,
    build_turn,
    decode_compaction,
    encode_compaction,
    is_reasoning_model,
    text_deltas,
)
from app.simulator.request import create_fields, has_decimal_sampling, parse_create


def counter_ids() -> Callable[[str], str]:
    numbers = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(numbers):04d}"


def request(**fields: Any) -> Any:
    fields.setdefault("model", "gpt-test")
    fields.setdefault("input", "hello world")
    return parse_create(create_fields({"type": "response.create", **fields}), websocket=True)


@pytest.mark.parametrize(
    ("text", "forced", "expected_text", "deltas"),
    [
        ("echo: a  b", None, "echo: a  b", ["echo: ", "a  ", "b"]),
        ("  lead", None, "  lead", ["  lead"]),
        ("echo: x", 3, "echo: x echo:", ["echo: ", "x ", "echo:"]),
        ("echo: a b c", 2, "echo: a", ["echo: ", "a"]),
        ("echo: one", 1, "echo:", ["echo:"]),
    ],
)
def test_text_deltas(text: str, forced: int | None, expected_text: str, deltas: list[str]) -> None:
    assert text_deltas(text, forced) == (expected_text, deltas)
    assert "".join(deltas) == expected_text


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [("o3", True), ("o4-mini", True), ("gpt-5.1", True), ("x-reasoner", True), ("gpt-4o", False)],
)
def test_reasoning_models(model: str, reasoning: bool) -> None:
    assert is_reasoning_model(model) is reasoning


def test_a_turn_is_deterministic_given_ids_and_time() -> None:
    first = build_turn(request(), None, now=1_800_000_000, ids=counter_ids())
    second = build_turn(request(), None, now=1_800_000_000, ids=counter_ids())
    assert first.events == second.events
    assert first.response_id == "resp_0001"
    assert first.chain.words == 2 + 3
    assert first.final["usage"]["total_tokens"] == 2 + 3


def test_a_continuation_s_function_call_output_must_answer_a_call_of_its_chain() -> None:
    output = {"type": "function_call_output", "call_id": "call_1", "output": "x"}
    prev = build_turn(request(), None, now=0).chain
    with pytest.raises(SimError) as refused:
        build_turn(request(input=[output]), prev, now=0)
    assert refused.value.code == "invalid_function_call_output"
    call = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}
    turn = build_turn(request(input=[call, output]), prev, now=0)
    assert turn.final["output"][0]["content"][0]["text"] == "tool said: x"
    # Unchained, the output is taken as it comes.
    turn = build_turn(request(input=[output]), None, now=0)
    assert turn.final["output"][0]["content"][0]["text"] == "tool said: x"


def test_large_padding_reaches_the_size() -> None:
    turn = build_turn(request(), None, now=0, shaping=Shaping(large_bytes=100_000))
    size = len(orjson.dumps(turn.events[-1]))
    assert 100_000 - 64 < size <= 100_000


def test_compaction_round_trip() -> None:
    items = [{"type": "message", "role": "assistant", "content": "hidden"}]
    assert decode_compaction(encode_compaction(items)) == items
    for forged in ("garbage", "simcmp1.!!!", "simcmp1.bnVsbA==", 5):
        with pytest.raises(SimError):
            decode_compaction(forged)


@pytest.mark.parametrize(
    ("fields", "decimal"),
    [
        ({"temperature": 1.2}, True),
        ({"temperature": 1.0}, True),
        ({"top_p": 0.5}, True),
        ({"temperature": 1, "top_p": 0}, False),
        ({"temperature": "1.2"}, False),
        ({"temperature": None}, False),
    ],
)
def test_decimal_sampling_detection(fields: dict[str, Any], decimal: bool) -> None:
    assert has_decimal_sampling(create_fields(fields)) is decimal


@pytest.mark.parametrize(
    "bad",
    [
        {"fault": "nope"},
        {"handshake_fault": "418"},
        {"fault_rate": 1.5},
        {"deltas": 0},
        {"max_connection_seconds": 0},
        {"delay_ms": -1},
    ],
)
def test_options_refuse_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimulatorOptions(**bad)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_simulate_arguments(p)
    return p


def test_flags_default_to_the_options_defaults() -> None:
    assert options_from_args(parser().parse_args([])) == SimulatorOptions()


def test_every_flag() -> None:
    args = parser().parse_args(
        [
            "--api-key=sk-x",
            "--no-decimal-close",
            "--fault=drop",
            "--fault-rate=0.25",
            "--seed=3",
            "--fault-after=1",
            "--handshake-fault=hang",
            "--handshake-delay-ms=40",
            "--delay-ms=5",
            "--deltas=7",
            "--large-bytes=1000",
            "--max-connection-seconds=1.5",
            "--max-message-bytes=2048",
            "--no-sent-at",
            "--request-log-limit=10",
            "--store-limit=20",
        ]
    )
    assert options_from_args(args) == SimulatorOptions(
        api_key="sk-x",
        decimal_close=False,
        fault="drop",
        fault_rate=0.25,
        seed=3,
        fault_after=1,
        handshake_fault="hang",
        handshake_delay_ms=40,
        delay_ms=5,
        deltas=7,
        large_bytes=1000,
        max_connection_seconds=1.5,
        max_message_bytes=2048,
        sent_at=False,
        request_log_limit=10,
        store_limit=20,
    )


@pytest.mark.parametrize(
    "argv", [["--fault-rate=2"], ["--fault=bogus"], ["--deltas=0"], ["--max-connection-seconds=0"]]
)
def test_bad_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
