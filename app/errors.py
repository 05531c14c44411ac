"""The gateway's closed set of error codes (CONTRACT.md §3, §4, §5) and their wire shapes.

Every refusal is a `GatewayError`: it knows its code, HTTP-like status, OpenAI error type, and
whether (and with which close code) it ends the socket. One function turns it into a WebSocket
error frame, another into an HTTP response body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson


def error_type_for(status: int) -> str:
    """`error.type` follows the status (CONTRACT.md §3)."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


@dataclass(frozen=True)
class Spec:
    status: int
    message: str
    close_code: int | None = None  # a WebSocket close right after the error frame
    type: str | None = None  # `error.type` when the status does not decide it


class Code(enum.StrEnum):
    # Per-frame refusals on a live socket.
    INVALID_RESPONSE_CREATE = "invalid_response_create"
    OPENAI_ROUTING_FAILED = "openai_routing_failed"
    RESPONSE_ALREADY_IN_FLIGHT = "response_already_in_flight"
    MODEL_MISMATCH = "model_mismatch"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED = "upstream_websocket_handshake_failed"
    UPSTREAM_WEBSOCKET_CLOSED = "upstream_websocket_closed"
    PREVIOUS_RESPONSE_NOT_FOUND = "previous_response_not_found"
    # Errors that end the socket.
    API_KEY_REVOKED = "api_key_revoked"
    API_KEY_EXPIRED = "api_key_expired"
    TEAM_DISABLED = "team_disabled"
    SERVER_SHUTTING_DOWN = "server_shutting_down"
    INTERNAL_ERROR = "internal_error"
    # Handshake and HTTP-only refusals.
    WEBSOCKET_UPGRADE_REQUIRED = "websocket_upgrade_required"
    INVALID_API_KEY = "invalid_api_key"
    SERVICE_UNAVAILABLE = "service_unavailable"
    SERVER_OVERLOADED = "server_overloaded"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_REQUEST = "invalid_request"
    INVALID_ADMIN_TOKEN = "invalid_admin_token"
    ADMIN_TLS_REQUIRED = "admin_tls_required"


SPECS: dict[Code, Spec] = {
    Code.INVALID_RESPONSE_CREATE: Spec(400, "Invalid response.create message."),
    Code.OPENAI_ROUTING_FAILED: Spec(403, "This request cannot be routed to OpenAI."),
    Code.RESPONSE_ALREADY_IN_FLIGHT: Spec(
        409, "A response is already in flight on this socket; wait for it to finish."
    ),
    Code.MODEL_MISMATCH: Spec(400, "This socket is locked to another model."),
    Code.RATE_LIMIT_EXCEEDED: Spec(429, "Rate limit exceeded: too many responses per minute."),
    # OpenAI's own code and type for an exhausted quota: Codex and openai-python stop on it
    # instead of retrying.
    Code.INSUFFICIENT_QUOTA: Spec(
        429, "Spend limit reached for this period.", type="insufficient_quota"
    ),
    Code.UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED: Spec(
        502, "Could not open the upstream WebSocket to OpenAI."
    ),
    Code.UPSTREAM_WEBSOCKET_CLOSED: Spec(502, "The upstream WebSocket closed mid-response."),
    Code.PREVIOUS_RESPONSE_NOT_FOUND: Spec(400, "Previous response not found."),
    Code.API_KEY_REVOKED: Spec(401, "This API key has been revoked.", close_code=1008),
    Code.API_KEY_EXPIRED: Spec(401, "This API key has expired.", close_code=1008),
    Code.TEAM_DISABLED: Spec(403, "This team is disabled.", close_code=1008),
    Code.SERVER_SHUTTING_DOWN: Spec(
        503, "This gateway node is shutting down; reconnect.", close_code=1001
    ),
    Code.INTERNAL_ERROR: Spec(500, "Internal gateway error.", close_code=1011),
    Code.WEBSOCKET_UPGRADE_REQUIRED: Spec(
        426, "This endpoint speaks WebSocket: send Upgrade: websocket."
    ),
    Code.INVALID_API_KEY: Spec(401, "Missing or unknown API key."),
    Code.SERVICE_UNAVAILABLE: Spec(503, "The gateway's key store is unavailable; retry."),
    Code.SERVER_OVERLOADED: Spec(503, "This gateway node is full; retry."),
    Code.TOO_MANY_CONNECTIONS: Spec(429, "Too many open sockets for this key or team."),
    Code.NOT_FOUND: Spec(404, "Not found."),
    Code.METHOD_NOT_ALLOWED: Spec(405, "Method not allowed."),
    Code.INVALID_REQUEST: Spec(400, "Invalid request."),
    Code.INVALID_ADMIN_TOKEN: Spec(401, "Missing or invalid admin token."),
    Code.ADMIN_TLS_REQUIRED: Spec(
        403,
        "The admin API is served only over HTTPS through the TLS proxy "
        "(X-Forwarded-Proto: https or Forwarded: proto=https).",
    ),
}


class GatewayError(Exception):
    """A refusal with a code from the closed set; `message` overrides the default text.

    `headers` go on the HTTP answer (`Retry-After`); a WebSocket frame has none.
    """

    def __init__(
        self,
        code: Code,
        message: str | None = None,
        *,
        param: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.headers = headers
        self.spec = SPECS[code]
        self.message = message or self.spec.message
        self.param = param
        self.details = details
        super().__init__(f"{code}: {self.message}")

    @property
    def status(self) -> int:
        return self.spec.status

    def error_object(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.spec.type or error_type_for(self.status),
            "code": str(self.code),
            "message": self.message,
            "param": self.param,
        }
        if self.details is not None:
            body["details"] = self.details
        return body

    def ws_frame(self, stream_id: Any = None) -> str:
        frame: dict[str, Any] = {"type": "error", "status": self.status}
        if stream_id is not None:
            frame["stream_id"] = stream_id
        frame["error"] = self.error_object()
        return orjson.dumps(frame).decode()

    def http_body(self) -> bytes:
        return orjson.dumps({"error": self.error_object()})


def not_found(kind: str, ident: str, param: str | None = None) -> GatewayError:
    """404 `not_found` for an unknown id (in the path, or in the body's field `param`)."""
    return GatewayError(Code.NOT_FOUND, f"No {kind} with id {ident!r}.", param=param)
