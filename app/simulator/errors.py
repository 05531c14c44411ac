"""Every error the simulator answers, in OpenAI's shapes.

One class, `SimError`, carries an error's status, type, code, message and param; it renders as the
WebSocket error frame (`{"type":"error","status":…,"error":{…}}`) or as the HTTP error body
(`{"error":{…}}`). The factories below are the closed set of errors the simulator makes.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

Json = dict[str, Any]

# Error types, as OpenAI spells them.
INVALID_REQUEST: str = "invalid_request_error"
SERVER_ERROR: str = "server_error"


class SimError(Exception):
    """An error answering one request; `status` is the HTTP status it stands for."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        param: str | None = None,
        type_: str = INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type_

    def error_object(self) -> Json:
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}

    def ws_frame(self, stream_id: str | None = None, *, with_status: bool = True) -> Json:
        frame: Json = {"type": "error"}
        if with_status:
            frame["status"] = self.status
        frame["error"] = self.error_object()
        if stream_id is not None:
            frame["stream_id"] = stream_id
        return frame

    def http_response(self, headers: dict[str, str] | None = None) -> web.Response:
        return json_response({"error": self.error_object()}, self.status, headers)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer, serialized with orjson."""
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def invalid_json(detail: str) -> SimError:
    return SimError(400, "invalid_json", f"Invalid message: {detail}")


def unknown_event_type(value: object) -> SimError:
    return SimError(
        400,
        "unknown_event_type",
        f"Invalid value for 'type': expected 'response.create', got {value!r}.",
        "type",
    )


def missing_required(param: str) -> SimError:
    return SimError(
        400, "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def invalid_type(param: str, expected: str, got: object) -> SimError:
    return SimError(
        400,
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(got)} instead.",
        param,
    )


def out_of_range(param: str, value: float, low: float, high: float) -> SimError:
    kind = "integer" if isinstance(value, int) else "decimal"
    side, bound = ("above_max", high) if value > high else ("below_min", low)
    relation = "<=" if value > high else ">="
    return SimError(
        400,
        f"{kind}_{side}_value",
        f"Invalid '{param}': {kind} {side.replace('_', ' ')}imum value. Expected a value "
        f"{relation} {bound}, but got {value} instead.",
        param,
    )


def invalid_value(param: str, message: str) -> SimError:
    return SimError(400, "invalid_value", message, param)


def unsupported_parameter(param: str, message: str) -> SimError:
    return SimError(400, "unsupported_parameter", message, param)


def previous_response_not_found(response_id: str) -> SimError:
    return SimError(
        400,
        "previous_response_not_found",
        f"Previous response with id '{response_id}' not found.",
        "previous_response_id",
    )


def invalid_function_call_output(call_id: object) -> SimError:
    return SimError(
        400,
        "invalid_function_call_output",
        f"No tool call found for function call output with call_id {call_id}.",
        "input",
    )


def invalid_encrypted_content() -> SimError:
    return SimError(
        400,
        "invalid_encrypted_content",
        "The encrypted content of a compaction item could not be decrypted.",
        "input",
    )


def connection_limit_reached() -> SimError:
    return SimError(
        400,
        "websocket_connection_limit_reached",
        "Responses websocket connection limit reached (60 minutes). "
        "Create a new websocket connection to continue.",
    )


def simulated_server_error() -> SimError:
    return SimError(
        500,
        "server_error",
        "The server had an error while processing your request. Sorry about that! (simulated)",
        type_=SERVER_ERROR,
    )


def masked_key(key: str) -> str:
    """A key as OpenAI's 401 quotes it: its first 8 and last 4 characters, `*` in between
    ("sk-abc12***…***wxyz", as many `*` as characters hidden). A key of 12 characters or fewer
    is quoted whole (*unconfirmed*: public reports show "undefined" quoted as is)."""
    if len(key) <= 12:
        return key
    return key[:8] + "*" * (len(key) - 12) + key[-4:]


def invalid_api_key(present: bool, key: str = "") -> SimError:
    if not present:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = (
            f"Incorrect API key provided: {masked_key(key)}. "
            "You can find your API key at https://platform.openai.com/account/api-keys."
        )
    return SimError(401, "invalid_api_key", message)


def refusal(status: int, key: str = "") -> SimError:
    """An HTTP refusal (a handshake fault, `sim_http_fault: status_…`), as OpenAI words it;
    `key` is the bearer the request presented (a 401 quotes it, masked)."""
    if status == 401:
        return invalid_api_key(present=True, key=key)
    if status == 429:
        return SimError(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for requests (simulated). Please try again in 1s.",
            type_="requests",
        )
    if status == 503:
        return SimError(
            503,
            "service_unavailable",
            "The engine is currently overloaded, please try again later. (simulated)",
            type_=SERVER_ERROR,
        )
    return simulated_server_error()


def websocket_upgrade_required() -> SimError:
    return SimError(
        426,
        "websocket_upgrade_required",
        "GET /v1/responses is the WebSocket endpoint: send 'Upgrade: websocket'.",
    )


def not_found(path: str) -> SimError:
    return SimError(404, "not_found", f"Unknown path: {path}")


def method_not_allowed(method: str, path: str) -> SimError:
    return SimError(405, "method_not_allowed", f"{method} is not allowed on {path}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
