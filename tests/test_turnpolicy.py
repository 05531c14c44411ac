"""The upstream rules of CONTRACT.md §3 (app/turnpolicy.py), without a socket: each rule's
verdict, and the turns it must leave alone."""

from __future__ import annotations

import dataclasses

import pytest

from app.errors import Code
from app.memory import ConversationMemory
from app.protocol import parse_client_frame
from app.turn import Turn
from app.turnpolicy import (
    LIMIT_REACHED,
    NOT_FOUND,
    Action,
    Chain,
    Facts,
    Verdict,
    error_status,
    on_close,
    on_error,
    on_handshake_failure,
    on_terminal,
    on_unremembered_fallback,
    unchained_input,
)

CHAINED = Facts(chained=True)  # a fresh chained turn: nothing forwarded, not retried


def error(code: object, turn: Facts | None = CHAINED, **given: bool) -> Verdict:
    kwargs = {"over_websocket": True, "remembered": True, **given}
    return on_error(code, turn, **kwargs)


# -- previous_response_not_found ------------------------------------------------------------------


def test_not_found_is_retried_once_with_the_memory() -> None:
    assert error(NOT_FOUND).action is Action.RETRY
    retried = dataclasses.replace(CHAINED, retried=True)
    assert error(NOT_FOUND, retried) == Verdict(Action.FORWARD, Chain.KEEP)


def test_not_found_without_memory_goes_to_the_client_and_evicts_nothing() -> None:
    assert error(NOT_FOUND, remembered=False) == Verdict(Action.FORWARD, Chain.KEEP)


@pytest.mark.parametrize(
    ("turn", "over_websocket"),
    [
        (Facts(chained=False), True),  # nothing to continue
        (dataclasses.replace(CHAINED, input_is_list=False), True),  # `input` a string
        (dataclasses.replace(CHAINED, events=1), True),  # the client has seen events already
        (dataclasses.replace(CHAINED, http_fallback=True), False),  # no connection cache
    ],
    ids=["unchained", "input-not-array", "events-sent", "http-fallback"],
)
def test_not_found_is_not_retried_where_a_retry_cannot_be_whole(
    turn: Facts, over_websocket: bool
) -> None:
    assert error(NOT_FOUND, turn, over_websocket=over_websocket) == Verdict(Action.FORWARD)


def test_not_found_outside_a_turn_is_forwarded() -> None:
    assert error(NOT_FOUND, None) == Verdict(Action.FORWARD)


# -- what the memory forgets ----------------------------------------------------------------------


@pytest.mark.parametrize("code", ["server_error", "invalid_value", None])
def test_a_failed_continuation_evicts_the_chain(code: object) -> None:
    assert error(code) == Verdict(Action.FORWARD, Chain.FORGET, "error")


def test_a_retry_that_fails_evicts_like_a_failed_continuation() -> None:
    retried = dataclasses.replace(CHAINED, retried=True)
    assert error("server_error", retried).chain is Chain.FORGET


def test_response_failed_evicts_and_a_served_response_joins_the_chain() -> None:
    assert on_terminal("response.failed", {}) == Verdict(Action.FORWARD, Chain.FORGET, "failed")
    assert on_terminal("response.completed", {"status": "completed"}) == Verdict(
        Action.FORWARD, Chain.EXTEND, "completed"
    )
    # The status is the response's own when it has one, else the event's.
    assert on_terminal("response.incomplete", {}).status == "incomplete"
    assert on_terminal("response.completed", {"status": "incomplete"}).status == "incomplete"


def test_errors_the_gateway_makes_evict_nothing() -> None:
    made = [
        on_close(1006, "upstream connection dropped", CHAINED, fallback_enabled=True),
        on_close(1011, "", CHAINED, fallback_enabled=True),
        on_handshake_failure("upstream refused the handshake with HTTP 503"),
        on_unremembered_fallback("resp_1"),
    ]
    assert [(v.action, v.chain) for v in made] == [(Action.FAIL, Chain.KEEP)] * 4
    codes = [v.error.code if v.error else None for v in made]
    assert codes == [
        Code.UPSTREAM_WEBSOCKET_CLOSED,
        Code.UPSTREAM_WEBSOCKET_CLOSED,
        Code.UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED,
        Code.PREVIOUS_RESPONSE_NOT_FOUND,
    ]


def test_a_forgotten_chain_is_not_retried() -> None:
    """A chain served, a continuation of it failing, then a `previous_response_not_found` for
    it: the memory forgot it (as OpenAI did), so the error goes to the client."""
    memory = ConversationMemory(1 << 20)
    memory.record(None, [{"role": "user", "content": "hi"}], "resp_1", [{"type": "message"}])
    assert error(NOT_FOUND, remembered=memory.chain_for("resp_1") is not None) == Verdict(
        Action.RETRY
    )
    assert error("server_error").chain is Chain.FORGET
    memory.forget("resp_1")  # what app/upstreamlink.py does with that verdict
    assert error(NOT_FOUND, remembered=memory.chain_for("resp_1") is not None) == Verdict(
        Action.FORWARD
    )


# -- the 60-minute limit --------------------------------------------------------------------------


@pytest.mark.parametrize("turn", [CHAINED, Facts(), None], ids=["chained", "plain", "no-turn"])
def test_the_connection_limit_is_swallowed(turn: Facts | None) -> None:
    assert error(LIMIT_REACHED, turn) == Verdict(Action.SWALLOW)
    assert error(LIMIT_REACHED, turn, over_websocket=False, remembered=False).action is (
        Action.SWALLOW
    )


def test_the_next_socket_continues_the_chain_from_memory() -> None:
    chain = [{"role": "user", "content": "a"}, {"type": "message", "content": "b"}]
    own = [{"role": "user", "content": "c"}]
    assert unchained_input(chain, own) == [*chain, *own]
    assert unchained_input(chain, []) == chain
    assert unchained_input(None, own) is None  # nothing remembered: the request goes as it is
    assert unchained_input(chain, None) is None  # an `input` that is no list of items


# -- upstream closes ------------------------------------------------------------------------------

DECIMAL = Facts(decimal_sampling=True)


def test_the_silent_close_of_a_decimal_temperature_falls_back_to_http() -> None:
    assert on_close(1000, "", DECIMAL, fallback_enabled=True) == Verdict(Action.HTTP_FALLBACK)


@pytest.mark.parametrize(
    ("code", "turn", "enabled"),
    [
        (1000, Facts(), True),  # integer sampling: a close like any other
        (1011, DECIMAL, True),  # not the silent close
        (1000, dataclasses.replace(DECIMAL, events=2), True),  # events came: not silent
        (1000, dataclasses.replace(DECIMAL, http_fallback=True), True),  # served over HTTP
        (1000, DECIMAL, False),  # GATEWAY_HTTP_FALLBACK=false
    ],
    ids=["integer", "1011", "after-events", "already-http", "switched-off"],
)
def test_other_closes_in_flight_are_upstream_websocket_closed(
    code: int, turn: Facts, enabled: bool
) -> None:
    verdict = on_close(code, "", turn, fallback_enabled=enabled)
    assert verdict.action is Action.FAIL and verdict.error is not None
    assert verdict.error.code is Code.UPSTREAM_WEBSOCKET_CLOSED


def test_upstream_websocket_closed_names_the_code_and_reason() -> None:
    verdict = on_close(1011, "internal error", Facts(), fallback_enabled=True)
    assert verdict.error is not None
    frame = verdict.error.error_object()
    assert verdict.error.status == 502 and "1011" in frame["message"]
    assert "internal error" in frame["message"]
    assert frame["details"] == {
        "upstream_close_code": 1011,
        "upstream_close_reason": "internal error",
    }
    unexplained = on_close(1006, "", Facts(), fallback_enabled=True).error
    assert unexplained is not None and "no reason given" in unexplained.message


# -- an error without status ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_object", "status"),
    [
        ({"type": "invalid_request_error", "code": "invalid_value"}, 400),
        ({"type": "server_error"}, 500),
        ({"code": "whatever"}, 500),
        ({}, 500),
    ],
)
def test_an_error_without_status_gets_one(error_object: dict[str, str], status: int) -> None:
    assert error_status(error_object) == status


# -- what a turn tells the rules ------------------------------------------------------------------


def test_a_turn_states_its_facts_from_its_frame() -> None:
    chained = Turn(
        parse_client_frame(
            '{"type":"response.create","model":"openai/gpt-5","temperature":1.2,'
            '"previous_response_id":"resp_1","input":[]}'
        )
    )
    assert chained.facts() == Facts(chained=True, input_is_list=True, decimal_sampling=True)
    chained.tally.events, chained.retried = 3, True
    assert chained.facts().events == 3 and chained.facts().retried
    plain = Turn(
        parse_client_frame('{"type":"response.create","model":"openai/gpt-5","input":"hi"}')
    )
    assert plain.facts() == Facts(chained=False, input_is_list=False, decimal_sampling=False)
