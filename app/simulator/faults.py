"""The closed sets of faults the simulator can reproduce (UPSTREAM.md, "Known faults").

Every fault has one name, used alike by the command line, `metadata.sim_fault`, the control API
and the docs. This module is the bottom of the package: it imports nothing from it.
"""

from __future__ import annotations

from typing import Final

# Faults of one WebSocket turn (`metadata.sim_fault`, `--fault`, `POST /_sim/faults {"turn": …}`).
DROP: Final = "drop"  # after a few events the TCP connection is cut, no close frame (1006)
CLOSE_1011: Final = "close_1011"  # after a few events, close 1011 "internal error"
HANG: Final = "hang"  # after a few events, silence until the client goes away
SILENT_CLOSE: Final = "silent_close"  # close 1000 with an empty reason and no events at all
LARGE: Final = "large"  # a `response.completed` frame of `sim_large_bytes` bytes
CONNECTION_LIMIT: Final = "connection_limit"  # the 60-minute limit, reached now
ERROR_NO_STATUS: Final = "error_no_status"  # an `error` frame without `status`
RESPONSE_FAILED: Final = "response_failed"  # `response.failed` after a few events
FORGET: Final = "forget"  # the connection cache lost the previous response (not found)
INCOMPLETE: Final = "incomplete"  # the text stops halfway: `response.incomplete`
NONE: Final = "none"  # in metadata: no fault on this turn, whatever the run-wide switches say

TURN_FAULTS: Final = (
    DROP,
    CLOSE_1011,
    HANG,
    SILENT_CLOSE,
    LARGE,
    CONNECTION_LIMIT,
    ERROR_NO_STATUS,
    RESPONSE_FAILED,
    FORGET,
    INCOMPLETE,
)

# Faults that strike after `sim_fault_after` events of a response, cutting it short.
MID_RESPONSE_FAULTS: Final = frozenset({DROP, CLOSE_1011, HANG, ERROR_NO_STATUS, RESPONSE_FAILED})

# What `--fault-rate` draws from: the faults a long-running client meets in the wild.
RANDOM_FAULTS: Final = (DROP, CLOSE_1011, HANG, RESPONSE_FAILED)

# Faults of one WebSocket handshake (`--handshake-fault`, `POST /_sim/faults {"handshake": …}`).
HANDSHAKE_HANG: Final = "hang"  # accept the TCP connection, never answer the upgrade
HANDSHAKE_FAULTS: Final = ("401", "429", "500", "503", HANDSHAKE_HANG)

# Faults of one HTTP `POST /v1/responses` (`metadata.sim_http_fault`). WebSocket faults never
# apply over HTTP: the gateway's HTTP fallback must be able to serve a turn whose WebSocket
# attempt was sabotaged with the same metadata.
HTTP_STATUS_401: Final = "status_401"  # as if the key were wrong: OpenAI's 401, key quoted
HTTP_STATUS_429: Final = "status_429"
HTTP_STATUS_500: Final = "status_500"
HTTP_FAULTS: Final = (
    HTTP_STATUS_401,
    HTTP_STATUS_429,
    HTTP_STATUS_500,
    DROP,
    HANG,
    RESPONSE_FAILED,
    INCOMPLETE,
)


def check_name(value: str, allowed: tuple[str, ...], what: str) -> str:
    """Return `value` if it names a fault of `allowed`, else raise ValueError saying so."""
    if value not in allowed:
        raise ValueError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return value
