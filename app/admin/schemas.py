"""Admin request bodies and the shapes the admin API answers with.

Request bodies are validated strictly from JSON (`"5"` is not an int, `1.0` is not an int), and
unknown fields are refused, so a typo in a limit's name is a 400 naming it rather than a team
silently left unlimited. A validation failure becomes one `invalid_request` whose `param` names
the first offending field in the dotted form OpenAI uses (`limits.sockets_per_kee`,
`allowed_models[0]`).

The answer models exist for the OpenAPI document and to fix each field's JSON form (times RFC
3339, prices as numbers); secrets and their hashes have no field in any of them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic import ValidationError as PydanticValidationError

from app.auth.principal import secret_status
from app.errors import Code, GatewayError
from app.models import DEFAULT_CREDENTIAL, ApiKey, Limits, Price, Team, utcnow

ID_PATTERN = r"^[A-Za-z0-9._-]+$"
CREDENTIAL_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
MODEL_PATTERN = r"^[A-Za-z0-9._:-]+$"
PROVIDER = "openai"
DEFAULT_GRACE_SECONDS = 86_400
# Ten years: beyond it a grace period is a mistake, and datetime arithmetic stays in range.
MAX_GRACE_SECONDS = 10 * 365 * 86_400

TeamId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
ModelPattern = Annotated[str, StringConstraints(min_length=1, max_length=200)]

_M = TypeVar("_M", bound=BaseModel)


# -- requests -----------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TeamRequest(_Request):
    """`POST /admin/v1/teams`: create or replace a team."""

    id: TeamId
    name: str | None = Field(default=None, max_length=200, description="Defaults to the id.")
    allowed_models: list[ModelPattern] = Field(
        description="Patterns such as `openai/gpt-5*` (fnmatch, case-sensitive)."
    )
    upstream_credential: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=CREDENTIAL_PATTERN,
        description="NAME of the environment variable holding the upstream key "
        f"(default `{DEFAULT_CREDENTIAL}`); its value is never stored.",
    )
    limits: Limits | None = Field(default=None, description="Missing or 0: unlimited.")
    active: bool | None = Field(
        default=None, description="Omitted: a new team is active, a replaced one keeps its state."
    )

    def to_team(self, current: Team | None) -> Team:
        active = self.active
        if active is None:
            active = current.active if current is not None else True
        return Team(
            id=self.id,
            name=self.id if self.name is None else self.name,
            active=active,
            allowed_models=list(self.allowed_models),
            upstream_credential=self.upstream_credential or DEFAULT_CREDENTIAL,
            limits=self.limits or Limits(),
        )


class KeyCreateRequest(_Request):
    """`POST /admin/v1/keys`."""

    team_id: TeamId
    name: str = Field(default="", max_length=200)
    expires_at: AwareDatetime | None = Field(
        default=None, description="RFC 3339 with an offset; must be in the future."
    )

    def check_expiry(self) -> None:
        if self.expires_at is not None and self.expires_at <= utcnow():
            raise GatewayError(
                Code.INVALID_REQUEST, "expires_at must be in the future.", param="expires_at"
            )


class KeyRotateRequest(_Request):
    """`POST /admin/v1/keys/{id}/rotate`; an empty body takes the default grace."""

    grace_seconds: int = Field(
        default=DEFAULT_GRACE_SECONDS,
        ge=0,
        le=MAX_GRACE_SECONDS,
        description="How long the old secret keeps working; 0 ends it at once.",
    )


class PriceRequest(_Request):
    """`PUT /admin/v1/models/{provider}/{model}`: USD per million tokens."""

    # JSON numbers only: strict mode refuses a string or a bool.
    input_per_mtok: float = Field(ge=0, allow_inf_nan=False)
    cached_input_per_mtok: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Defaults to input_per_mtok."
    )
    output_per_mtok: float = Field(ge=0, allow_inf_nan=False)


def model_name(provider: str, model: str) -> str:
    """The catalog name `openai/<model>` of a path's provider and model, or a 400."""
    if provider != PROVIDER:
        raise GatewayError(
            Code.INVALID_REQUEST,
            f"Expected provider {PROVIDER!r}, got {provider!r}.",
            param="provider",
        )
    check_model(model)
    return f"{PROVIDER}/{model}"


def check_model(model: str) -> None:
    if not re.fullmatch(MODEL_PATTERN, model) or len(model) > 200:
        raise GatewayError(
            Code.INVALID_REQUEST,
            f"Expected a model name of letters, digits and ._:-, got {model!r}.",
            param="model",
        )


# -- parsing ------------------------------------------------------------------------------------


def param_of(loc: tuple[int | str, ...]) -> str | None:
    """`("limits", "x")` → `limits.x`, `("allowed_models", 0)` → `allowed_models[0]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or None


def invalid(exc: PydanticValidationError) -> GatewayError:
    """The `invalid_request` for the first error of a validation failure."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    param = param_of(loc)
    if err["type"] == "json_invalid":
        return GatewayError(Code.INVALID_REQUEST, "Expected a JSON object as the request body.")
    if err["type"] == "extra_forbidden":
        message = f"Unknown field {param!r}."
    elif err["type"] == "missing":
        message = f"Missing required field {param!r}."
    elif param is None:
        message = f"Expected a JSON object as the request body: {err['msg']}."
    else:
        message = f"{param}: {err['msg']}."
    return GatewayError(Code.INVALID_REQUEST, message, param=param)


def parse_json(model: type[_M], raw: bytes) -> _M:
    """A request body (bytes of JSON) as `model`, or a 400 naming the field."""
    try:
        return model.model_validate_json(raw, strict=True)
    except PydanticValidationError as exc:
        raise invalid(exc) from None


def parse_obj(model: type[_M], value: dict[str, Any]) -> _M:
    """The same from Python values (the shell builds these from its arguments)."""
    try:
        return model.model_validate(value, strict=False)
    except PydanticValidationError as exc:
        raise invalid(exc) from None


def to_price(body: PriceRequest) -> Price:
    return Price.model_validate(
        {
            "input_per_mtok": str(body.input_per_mtok),
            "cached_input_per_mtok": None
            if body.cached_input_per_mtok is None
            else str(body.cached_input_per_mtok),
            "output_per_mtok": str(body.output_per_mtok),
        }
    )


# -- answers ------------------------------------------------------------------------------------


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True)


class KeyCreated(_Answer):
    """The only answer that holds a key's secret: at creation and at rotation."""

    id: str
    key: str = Field(description="The secret; shown once, never stored (only its SHA-256).")
    prefix: str
    team_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey, secret: str) -> KeyCreated:
        return cls(
            id=key.id,
            key=secret,
            prefix=key.prefix,
            team_id=key.team_id,
            name=key.name,
            created_at=key.created_at,
            expires_at=key.expires_at,
        )


class KeyInfo(_Answer):
    """A key in listings: never its secret or hash."""

    id: str
    prefix: str
    team_id: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked: bool
    revoked_at: datetime | None
    status: Literal["active", "revoked", "expired"]
    grace_until: datetime | None = Field(
        description="While an old secret still works after a rotation: when it stops."
    )

    @classmethod
    def of(cls, key: ApiKey) -> KeyInfo:
        now = utcnow()
        code = secret_status(key, key.secret_hash, now)
        status: Literal["active", "revoked", "expired"] = (
            "revoked"
            if code is Code.API_KEY_REVOKED
            else "expired"
            if code is Code.API_KEY_EXPIRED
            else "active"
        )
        graces = [o.until for o in key.old_secrets if o.until > now]
        return cls(
            id=key.id,
            prefix=key.prefix,
            team_id=key.team_id,
            name=key.name,
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked=key.revoked_at is not None,
            revoked_at=key.revoked_at,
            status=status,
            grace_until=max(graces) if graces and status == "active" else None,
        )


class ModelPrice(_Answer):
    """A catalog entry: USD per million tokens."""

    id: str = Field(description="`openai/<model>`")
    object: Literal["model"] = "model"
    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float

    @classmethod
    def of(cls, name: str, price: Price) -> ModelPrice:
        return cls(
            id=name,
            input_per_mtok=float(price.input_per_mtok),
            cached_input_per_mtok=float(price.cached),
            output_per_mtok=float(price.output_per_mtok),
        )


class SessionInfo(_Answer):
    """A live socket on some node (`GET /admin/v1/sessions`)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str
    node: str
    key_prefix: str
    team_id: str
    model: str | None
    opened_at: datetime
    turns: int


class SpendPeriod(_Answer):
    start: datetime
    end: datetime
    usd: float = Field(description="Spend so far in the period, USD to the micro-dollar.")
    limit: float | None = Field(description="The limit in USD; null when unlimited.")


class KeySpend(_Answer):
    id: str
    prefix: str
    day: SpendPeriod


class TeamSpend(_Answer):
    """`GET /admin/v1/teams/{id}/spend`."""

    object: Literal["team.spend"]
    team_id: str
    day: SpendPeriod
    month: SpendPeriod
    keys: list[KeySpend]


class ErrorObject(_Answer):
    type: str
    code: str
    message: str
    param: str | None


class ErrorBody(_Answer):
    error: ErrorObject
