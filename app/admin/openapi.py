"""The OpenAPI 3.1 document of the admin API, served at `GET /admin/v1/openapi.json`.

Operations are described here by hand (a table, one entry per route); every schema comes from
the pydantic models of `schemas.py` and `app.models`, so a request body documented here is
exactly the one the API validates. A test checks that every registered admin route appears.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.admin.schemas import (
    DEFAULT_GRACE_SECONDS,
    ErrorBody,
    KeyCreated,
    KeyCreateRequest,
    KeyInfo,
    KeyRotateRequest,
    ModelPrice,
    PriceRequest,
    SessionInfo,
    TeamRequest,
    TeamSpend,
)
from app.models import Team

_REF = "#/components/schemas/{model}"
_SCHEMA_MODELS: list[type[BaseModel]] = [
    TeamRequest,
    KeyCreateRequest,
    KeyRotateRequest,
    PriceRequest,
    Team,
    KeyCreated,
    KeyInfo,
    ModelPrice,
    SessionInfo,
    TeamSpend,
    ErrorBody,
]
_ERRORS = {
    "400": "`invalid_request`: a malformed body or parameter; `param` names it.",
    "401": "`invalid_admin_token`: missing or wrong `Authorization: Bearer` token.",
    "404": "`not_found`: an unknown id (in the path or in `team_id`), or no such route.",
    "503": "`service_unavailable`: the key store (Redis) is unreachable.",
}


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    answer: str | None  # a schema name, `list:<name>`, or None for a free-form object
    status: int = 200
    body: str | None = None
    body_optional: bool = False
    query: tuple[tuple[str, str], ...] = ()
    errors: tuple[str, ...] = ("401", "503")
    write: bool = False


OPS: list[Op] = [
    Op(
        "POST",
        "/teams",
        "Create (201) or replace (200) a team",
        "Team",
        201,
        body="TeamRequest",
        errors=("400", "401", "503"),
        write=True,
    ),
    Op("GET", "/teams", "List teams", "list:Team"),
    Op("GET", "/teams/{team_id}", "Read a team", "Team", errors=("401", "404", "503")),
    Op(
        "GET",
        "/teams/{team_id}/spend",
        "Spend so far in the current UTC day and month, the team's and each key's: the figures "
        "the spend limits are judged on (counters missing from Redis are rebuilt from the "
        "ledger first)",
        "TeamSpend",
        errors=("401", "404", "503"),
    ),
    Op(
        "POST",
        "/teams/{team_id}/disable",
        "Disable a team: new handshakes refused, live sockets get `team_disabled` and 1008",
        "Team",
        errors=("401", "404", "503"),
        write=True,
    ),
    Op(
        "POST",
        "/teams/{team_id}/enable",
        "Enable a team",
        "Team",
        errors=("401", "404", "503"),
        write=True,
    ),
    Op(
        "POST",
        "/keys",
        "Create a key; the answer holds its secret, shown only here",
        "KeyCreated",
        201,
        body="KeyCreateRequest",
        errors=("400", "401", "404", "503"),
        write=True,
    ),
    Op(
        "GET",
        "/keys",
        "List keys (never their secrets)",
        "list:KeyInfo",
        query=(("team_id", "Only this team's keys (404 when the team is unknown)."),),
        errors=("401", "404", "503"),
    ),
    Op("GET", "/keys/{key_id}", "Read a key", "KeyInfo", errors=("401", "404", "503")),
    Op(
        "POST",
        "/keys/{key_id}/rotate",
        "Rotate: same id, a new secret and prefix; the old secret works for `grace_seconds` "
        f"(default {DEFAULT_GRACE_SECONDS}), then gets `api_key_expired`",
        "KeyCreated",
        body="KeyRotateRequest",
        body_optional=True,
        errors=("400", "401", "404", "503"),
        write=True,
    ),
    Op(
        "POST",
        "/keys/{key_id}/revoke",
        "Revoke: refused at once; live sockets get `api_key_revoked` and 1008",
        "KeyInfo",
        errors=("401", "404", "503"),
        write=True,
    ),
    Op("GET", "/models", "The model catalog (USD per million tokens)", "list:ModelPrice"),
    Op(
        "GET",
        "/models/{provider}/{model}",
        "Read a price",
        "ModelPrice",
        errors=("400", "401", "404", "503"),
    ),
    Op(
        "PUT",
        "/models/{provider}/{model}",
        "Set a price (`provider` must be `openai`; cached input defaults to input)",
        "ModelPrice",
        body="PriceRequest",
        errors=("400", "401", "503"),
        write=True,
    ),
    Op(
        "DELETE",
        "/models/{provider}/{model}",
        "Remove a price: the next turn for that model is refused",
        None,
        errors=("400", "401", "404", "503"),
        write=True,
    ),
    Op("GET", "/sessions", "Live sockets across every node", "list:SessionInfo"),
    Op("GET", "/openapi.json", "This document", None, errors=("401",)),
]


def _schema(answer: str | None) -> dict[str, Any]:
    if answer is None:
        return {"type": "object"}
    if answer.startswith("list:"):
        return {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": _REF.format(model=answer[5:])}},
            },
        }
    return {"$ref": _REF.format(model=answer)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": f"{op.method.lower()}_{_slug(op.path)}",
        "summary": op.summary,
        "security": [{"adminToken": []}],
        "responses": {
            str(op.status): {"description": "OK", "content": _json(_schema(op.answer))},
            **{code: {"$ref": f"#/components/responses/E{code}"} for code in op.errors},
        },
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_params(op.path)
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": text,
            "schema": {"type": "string"},
        }
        for name, text in op.query
    ]
    if params:
        out["parameters"] = params
    if op.body:
        out["requestBody"] = {
            "required": not op.body_optional,
            "content": _json({"$ref": _REF.format(model=op.body)}),
        }
    if op.write:
        out["description"] = (
            "Recorded in the audit ledger: actor (`X-Admin-Actor`, else `admin-token`), remote "
            "address, action, target, time."
        )
        out["parameters"] = [*params, _ACTOR_PARAM]
    return out


_ACTOR_PARAM = {
    "name": "X-Admin-Actor",
    "in": "header",
    "required": False,
    "description": "Who performs the write, for the audit ledger.",
    "schema": {"type": "string", "maxLength": 200},
}


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _slug(path: str) -> str:
    parts = [p.strip("{}").replace(".", "_") for p in path.split("/") if p]
    return "_".join(parts)


@functools.cache
def openapi_document() -> dict[str, Any]:
    """Built once per process: the models do not change at run time."""
    _, defs = models_json_schema([(m, "validation") for m in _SCHEMA_MODELS], ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPS:
        paths.setdefault("/admin/v1" + op.path, {})[op.method.lower()] = _operation(op)
    error_ref = _json({"$ref": _REF.format(model="ErrorBody")})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Gateway admin API",
            "version": "1",
            "description": "Teams, keys, prices and live sessions (CONTRACT.md §5). Every "
            'error has the shape `{"error":{"type","code","message","param"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "responses": {
                f"E{code}": {"description": text, "content": error_ref}
                for code, text in _ERRORS.items()
            },
            "securitySchemes": {
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`ADMIN_TOKEN`",
                }
            },
        },
        "security": [{"adminToken": []}],
    }
