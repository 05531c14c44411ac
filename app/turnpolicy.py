"""The upstream rules of CONTRACT.md §3 ("Upstream and events") as plain code.

What happened upstream goes in (an `error` event's code, a terminal event, a close, a failed
handshake), with what is known of the turn it belongs to (`Facts`) and whether the conversation
memory holds the chain the turn continued; a `Verdict` comes out: forward the event, swallow it,
retry with the memory, fall back to HTTP, or fail the turn with the gateway's own error, and what
becomes of the remembered chain. No sockets, no awaits, no metrics: app/upstreamlink.py carries
the verdicts out, and tests/test_turnpolicy.py walks every rule without a socket, the way
python-websockets keeps its protocol apart from its I/O.

The rules:
- An upstream `error` without `status` gets one (`error_status`): Codex hangs on one without.
- `websocket_connection_limit_reached` is never forwarded; the upstream socket is retired and the
  next turn opens a new one, continuing the chain from the memory (`unchained_input`).
- `previous_response_not_found` answering a chained request whose `input` is an array is retried
  once, by the gateway, unchained, with the remembered items before the request's own. With
  nothing remembered the error goes to the client, who resends the full context.
- A failed continuation (any other `error`, or `response.failed`) forgets the chain it continued:
  OpenAI evicted it. A retry that fails evicts the same way. Errors the gateway makes itself
  (`upstream_websocket_closed`, handshake failures) evict nothing.
- An upstream close while a response is in flight is `upstream_websocket_closed`, naming the code
  and reason; except OpenAI's silent close of a non-integer `temperature`/`top_p` (1000, before
  any event): that turn is served over HTTP instead.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from app.errors import Code, GatewayError

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# The only upstream events the gateway looks into; every other event is forwarded unparsed.
INSPECTED = TERMINAL | {"response.created", "error"}
LIMIT_REACHED = "websocket_connection_limit_reached"
NOT_FOUND = "previous_response_not_found"
# The close code of OpenAI's silent close (UPSTREAM.md, fault 1).
SILENT_CLOSE_CODE = 1000


class Action(enum.Enum):
    FORWARD = "forward"  # the event goes to the client (an error ends the turn it answers)
    SWALLOW = "swallow"  # never forwarded; the upstream socket is retired
    RETRY = "retry"  # sent again, once, unchained, with the remembered chain
    HTTP_FALLBACK = "http_fallback"  # the turn is served over `POST /responses` instead
    FAIL = "fail"  # the turn ends with the gateway's own `error`


class Chain(enum.Enum):
    """What becomes of the chain in memory that the request continued."""

    KEEP = "keep"
    FORGET = "forget"  # the continuation failed: OpenAI evicted what it continued
    EXTEND = "extend"  # a response was served: it joins the chain


class Verdict(NamedTuple):
    action: Action
    chain: Chain = Chain.KEEP
    status: str = "error"  # the turn's status (ledger, metrics) when the verdict ends it
    error: GatewayError | None = None  # with FAIL: what the client gets


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rules need to know of the turn an upstream event or close belongs to."""

    chained: bool = False  # the request named a `previous_response_id`
    input_is_list: bool = True  # its `input` is an array (a retry puts the memory before it)
    events: int = 0  # events of the turn the client has had already
    retried: bool = False  # the gateway retried it once already
    http_fallback: bool = False  # the HTTP fallback serves it
    decimal_sampling: bool = False  # a non-integer JSON number in `temperature` or `top_p`


SWALLOW = Verdict(Action.SWALLOW)
RETRY = Verdict(Action.RETRY)
HTTP_FALLBACK = Verdict(Action.HTTP_FALLBACK)


def on_error(
    code: object, turn: Facts | None, *, over_websocket: bool, remembered: bool
) -> Verdict:
    """An upstream `error` event. `turn`: the turn in flight, if any; `over_websocket`: it came
    on an upstream WebSocket (the HTTP fallback has no connection cache to retry on);
    `remembered`: the memory holds the chain the turn's request continued."""
    if code == LIMIT_REACHED:
        return SWALLOW
    if turn is None:
        return Verdict(Action.FORWARD)
    if code == NOT_FOUND:
        if over_websocket and may_retry(turn, remembered=remembered):
            return RETRY
        return Verdict(Action.FORWARD)  # nothing to retry with: the client resends the context
    return Verdict(Action.FORWARD, Chain.FORGET)


def may_retry(turn: Facts, *, remembered: bool) -> bool:
    """A `previous_response_not_found` is retried once, before the client has seen anything."""
    return (
        turn.chained and turn.input_is_list and not turn.events and not turn.retried and remembered
    )


def on_terminal(kind: str, response: dict[str, Any]) -> Verdict:
    """`response.completed`, `.incomplete` or `.failed` (`response`: the event's response)."""
    status = str(response.get("status") or kind.removeprefix("response."))
    chain = Chain.FORGET if kind == "response.failed" else Chain.EXTEND
    return Verdict(Action.FORWARD, chain, status)


def on_close(code: int, reason: str, turn: Facts, *, fallback_enabled: bool) -> Verdict:
    """The upstream socket ended (a close frame, a drop, silence) with `turn` in flight on it."""
    if (
        code == SILENT_CLOSE_CODE
        and not turn.events
        and not turn.http_fallback
        and turn.decimal_sampling
        and fallback_enabled
    ):
        return HTTP_FALLBACK
    return Verdict(Action.FAIL, error=closed_error(code, reason))


def on_handshake_failure(detail: str) -> Verdict:
    return Verdict(
        Action.FAIL,
        error=GatewayError(
            Code.UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED,
            f"Could not open the upstream WebSocket to OpenAI: {detail}.",
        ),
    )


def credential_refused() -> GatewayError:
    """OpenAI answered an HTTP request (the POST relay, the session's HTTP fallback) with 401:
    it refused the operator's upstream credential, not the customer's key, which the gateway
    accepted. A 502, as the same refusal of the upstream WebSocket's handshake is: passing the
    401 on would tell the customer's client that its own key is wrong."""
    return GatewayError(
        Code.UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED,
        "OpenAI refused this gateway's upstream credential (HTTP 401); your own key was "
        "accepted. The gateway's operator has to fix the credential.",
    )


def on_unremembered_fallback(previous_response_id: str) -> Verdict:
    """The HTTP fallback of a chained turn whose chain the memory does not hold: no guessing."""
    return Verdict(
        Action.FAIL,
        error=GatewayError(
            Code.PREVIOUS_RESPONSE_NOT_FOUND,
            f"Previous response with id '{previous_response_id}' not found.",
            param="previous_response_id",
        ),
    )


def unchained_input(chain: list[Any] | None, own: list[Any] | None) -> list[Any] | None:
    """The `input` that carries a chain without `previous_response_id`: the remembered items,
    then the request's own. None when the memory holds no such chain or the request's `input`
    is no list of items."""
    if chain is None or own is None:
        return None
    return [*chain, *own]


def error_status(error: dict[str, Any]) -> int:
    """The status an upstream `error` without one gets."""
    return 400 if error.get("type") == "invalid_request_error" else 500


def closed_error(code: int, reason: str) -> GatewayError:
    shown = reason or "no reason given"
    return GatewayError(
        Code.UPSTREAM_WEBSOCKET_CLOSED,
        f"The upstream WebSocket closed with code {code} ({shown}) mid-response.",
        details={"upstream_close_code": code, "upstream_close_reason": reason},
    )
