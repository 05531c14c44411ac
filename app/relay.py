"""`POST /v1/responses` and `POST /v1/responses/compact` (CONTRACT.md §3.1).

The same key, checks 3-5 and 8, `store` forced false, `background` removed, the same ledger and
metrics as the socket; `stream`/`stream_options` kept (SSE when `stream: true`). No connection
cache exists over HTTP, so there is no retry.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp import web

from app import metrics, sse, turnpolicy
from app.auth.principal import Principal
from app.errors import Code, GatewayError
from app.http import error_response
from app.ledger.rows import TurnRecord
from app.node import NODE, Node
from app.protocol import PROVIDER_PREFIX, check_fields, check_model, parse_json_object
from app.routing import check_route
from app.turnpolicy import TERMINAL
from app.upstream import UNREACHABLE, HttpReply, UpstreamUnreachable, post_http
from app.usage import charge

Transport = Literal["http", "compact"]
# What the stream is read for: the terminal event and errors (`sse.Sieve` skips the rest unread).
# Each name holds one of these: completed and incomplete "complete", failed "failed".
_AWAITED = (b"complete", b"failed", b"error")


class HttpTurn:
    """One POST: checks, the upstream call, the ledger row."""

    def __init__(self, node: Node, principal: Principal, transport: Transport) -> None:
        self.node = node
        self.principal = principal
        self.transport = transport
        self.received_at = datetime.now(UTC)
        self.started = time.perf_counter()
        self.first_byte: float | None = None
        self.model: str | None = None
        self.previous_response_id: str | None = None

    def record(
        self,
        *,
        error_code: str | None = None,
        status: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> None:
        accepted = error_code is None or status is not None
        duration = time.perf_counter() - self.started
        if accepted and self.model and status:
            metrics.add(metrics.responses(self.model, status))
            metrics.DURATION_TALLY.observe(duration)
        ttfe = None if self.first_byte is None else self.first_byte - self.started
        row = TurnRecord(
            socket_id=None,
            node=self.node.id,
            key_id=self.principal.key_id,
            key_prefix=self.principal.key_prefix,
            team_id=self.principal.team_id,
            transport=self.transport,
            model=self.model,
            received_at=self.received_at,
            accepted=accepted,
            error_code=error_code,
            response_id=_str(response.get("id")) if response else None,
            status=status,
            previous_response_id=self.previous_response_id,
            ttfe_ms=None if ttfe is None else ttfe * 1000,
            duration_ms=duration * 1000,
        )
        if response:
            charge(self.node.view.view.catalog, row, response.get("usage"))
        self.node.ledger.record(row)
        if accepted:
            team = self.node.view.view.teams.get(row.team_id)
            self.node.spend.count(row, team.limits if team else None)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


async def _read_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise GatewayError(
            Code.INVALID_RESPONSE_CREATE, "The request body is larger than the gateway accepts."
        ) from None
    return parse_json_object(raw)


async def _checked(
    node: Node, request: web.Request, transport: Transport
) -> tuple[HttpTurn, dict[str, Any]]:
    """Auth, then checks 3-5 and 8; the body to send upstream."""
    try:
        principal, _key, team = await node.auth.authenticate(request)
    except GatewayError as err:
        metrics.count_error(err.code)  # 401/403/429/503: no turn yet, so no ledger row
        raise
    turn = HttpTurn(node, principal, transport)
    try:
        fields = await _read_body(request)
        if fields.get("type") == "response.create":
            del fields["type"]
        for key in [k for k, v in fields.items() if v is None]:
            del fields[key]
        turn.model = check_model(fields.get("model"))
        check_fields(fields)
        check_route(node, team, turn.model)
        await node.spend.check(principal, team)
    except GatewayError as err:
        metrics.count_error(err.code)
        turn.record(error_code=str(err.code))
        raise
    turn.previous_response_id = _str(fields.get("previous_response_id"))
    fields.pop("background", None)
    fields["store"] = False
    fields["model"] = turn.model[len(PROVIDER_PREFIX) :]
    if transport == "compact":
        for key in ("store", "stream", "stream_options"):
            fields.pop(key, None)
    return turn, fields


def _credential(node: Node, turn: HttpTurn) -> str:
    team = node.view.view.teams.get(turn.principal.team_id)
    return (node.credential(team.upstream_credential) if team else None) or ""


async def post_responses(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "http", "/responses")


async def post_compact(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "compact", "/responses/compact")


async def _relay(request: web.Request, transport: Transport, path: str) -> web.StreamResponse:
    node = request.app[NODE]
    if node.draining:
        metrics.count_error(Code.SERVER_SHUTTING_DOWN)
        return error_response(GatewayError(Code.SERVER_SHUTTING_DOWN), {"Retry-After": "1"})
    turn, body = await _checked(node, request, transport)
    try:
        async with post_http(
            node.upstream_http,
            node.settings.openai_base_url + path,
            _credential(node, turn),
            body,
            connect=node.settings.upstream_handshake_seconds,
            sock_read=node.settings.upstream_idle_seconds,
        ) as upstream:
            if body.get("stream") is True and upstream.status < 400:
                return await _relay_sse(request, turn, upstream)
            return await _relay_json(turn, upstream, transport)
    except (UpstreamUnreachable, OSError) as exc:  # OSError: the client's socket, in _relay_sse
        reason = exc.reason if isinstance(exc, UpstreamUnreachable) else type(exc).__name__
        err = GatewayError(
            Code.UPSTREAM_WEBSOCKET_HANDSHAKE_FAILED,
            f"Could not reach OpenAI over HTTP ({reason}).",
        )
        metrics.count_error(err.code)
        turn.record(error_code=str(err.code), status="error")
        return error_response(err)


async def _relay_json(turn: HttpTurn, upstream: HttpReply, transport: Transport) -> web.Response:
    raw = await upstream.body()  # an error's redacted (OpenAI's 401 quotes the operator's key)
    turn.first_byte = time.perf_counter()
    # As the ledger's ttfe: the whole body at once.
    metrics.TTFE_TALLY.observe(turn.first_byte - turn.started)
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        value = None
    response = value if isinstance(value, dict) else None
    if upstream.status == 401:
        err = turnpolicy.credential_refused()
        metrics.count_error(err.code)
        turn.record(error_code=str(err.code), status="error")
        return error_response(err)
    if upstream.status >= 400:
        error = response.get("error") if response else None
        code = _str(error.get("code")) if isinstance(error, dict) else None
        metrics.count_error(code or "upstream_error")
        turn.record(error_code=code or f"http_{upstream.status}", status="error")
    else:
        status = "completed" if transport == "compact" else _str((response or {}).get("status"))
        turn.record(status=status or "completed", response=response)
    return web.Response(
        status=upstream.status,
        body=raw,
        content_type=upstream.content_type or "application/json",
    )


async def _relay_sse(
    request: web.Request, turn: HttpTurn, upstream: HttpReply
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=upstream.status,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
    )
    await resp.prepare(request)
    final: dict[str, Any] | None = None
    status: str | None = None
    left = False
    sieve = sse.Sieve(TERMINAL, _AWAITED)
    try:
        # The stream goes out as it came, chunk by chunk (one write each, several events in
        # one, the upstream's own bytes: unchanged, as CONTRACT.md §3 has every event); its
        # events are read for the first event's time and the terminal event (the sieve
        # decodes only those).
        async for chunk in upstream.chunks():
            batch = sieve.feed(chunk)
            if batch:
                if turn.first_byte is None:
                    turn.first_byte = time.perf_counter()
                    metrics.TTFE_TALLY.observe(turn.first_byte - turn.started)
                status, final = _read(batch, status, final)
            try:
                await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                left = True  # the client left
                break
        else:
            await resp.write_eof()
    except UNREACHABLE:
        # The upstream stream broke (recorded as an error below), or the client left as it
        # ended (aiohttp's ClientConnectionResetError from write_eof).
        pass
    status, final = _read(sieve.finish(), status, final)  # what came but was not searched yet
    turn.record(status="cancelled" if left else status or "error", response=final)
    return resp


def _read(
    batch: list[sse.Event], status: str | None, final: dict[str, Any] | None
) -> tuple[str | None, dict[str, Any] | None]:
    for event in batch:
        name = None if event.event == "message" else event.event
        if name is None or name in TERMINAL or name == "error":
            status, final = _terminal(event.data, status, final)
    return status, final


def _terminal(
    data: str, status: str | None, final: dict[str, Any] | None
) -> tuple[str | None, dict[str, Any] | None]:
    parsed = _parse(data)
    kind = _str(parsed.get("type")) if parsed else None
    if parsed is None or kind is None:
        return status, final
    if kind in TERMINAL:
        found = parsed.get("response")
        final = found if isinstance(found, dict) else None
        return (_str(final.get("status")) if final else None) or kind[9:], final
    if kind == "error":
        return "error", final
    return status, final


def _parse(data: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except (orjson.JSONDecodeError, RecursionError, ValueError):
        return None
    return value if isinstance(value, dict) else None
