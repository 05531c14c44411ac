"""Records kept in Redis: teams, keys, prices. Pydantic models, validated on the way in and out."""

from __future__ import annotations

import fnmatch
import functools
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CREDENTIAL = "OPENAI_API_KEY"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Limits(BaseModel):
    """CONTRACT.md §4; 0 is unlimited. USD amounts are kept to the micro-dollar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sockets_per_key: int = Field(default=0, ge=0)
    sockets_per_team: int = Field(default=0, ge=0)
    responses_per_minute_per_key: int = Field(default=0, ge=0)
    tokens_per_minute_per_key: int = Field(default=0, ge=0)
    usd_per_day_per_key: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    usd_per_day_per_team: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    usd_per_month_per_team: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @field_validator(
        "usd_per_day_per_key", "usd_per_day_per_team", "usd_per_month_per_team", mode="before"
    )
    @classmethod
    def _usd(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if isinstance(value, int | float) and value >= 0:
            return round(float(value), 6)
        return value

    @property
    def spend_limited(self) -> bool:
        """Whether a turn's judgement needs the spend or token counters (not only the window)."""
        return bool(
            self.tokens_per_minute_per_key
            or self.usd_per_day_per_key
            or self.usd_per_day_per_team
            or self.usd_per_month_per_team
        )

    @property
    def usd_limited(self) -> bool:
        """Whether any spend limit is set: only then are the team's spend counters kept."""
        return bool(
            self.usd_per_day_per_key or self.usd_per_day_per_team or self.usd_per_month_per_team
        )


@functools.lru_cache(maxsize=4096)
def _allowed(patterns: tuple[str, ...], model: str) -> bool:
    """`Team.allows`, remembered: a team's patterns and its models are few, and every turn asks."""
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)


class Team(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    name: str = ""
    active: bool = True
    allowed_models: list[str] = Field(default_factory=list)
    upstream_credential: str = Field(
        default=DEFAULT_CREDENTIAL,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )
    limits: Limits = Field(default_factory=Limits)

    def allows(self, model: str) -> bool:
        return _allowed(tuple(self.allowed_models), model)


class OldSecret(BaseModel):
    model_config = ConfigDict(frozen=True)

    hash: str
    until: datetime


class ApiKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    team_id: str
    name: str = ""
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    secret_hash: str
    old_secrets: list[OldSecret] = Field(default_factory=list)

    def public(self) -> dict[str, object]:
        """What admin listings show: never the secret or its hash."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "team_id": self.team_id,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked": self.revoked_at is not None,
        }


_MILLION = Decimal(1_000_000)


# Price -> its prices as integers at the smallest exponent among them, and that exponent: see
# `Price.cost`. Keyed by the object (a copy with other prices is another object), which the
# entry keeps alive, so its id is not reused while it is here.
_SCALED: dict[int, tuple[Price, tuple[int, int, int, int]]] = {}


class Price(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_per_mtok: Decimal = Field(ge=0)

    @field_validator("input_per_mtok", "cached_input_per_mtok", "output_per_mtok", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return value

    @property
    def cached(self) -> Decimal:
        return (
            self.input_per_mtok
            if self.cached_input_per_mtok is None
            else self.cached_input_per_mtok
        )

    def _scaled(self) -> tuple[int, int, int, int]:
        """The prices as integers at the smallest exponent among them, and that exponent: `cost`
        sums integers, then makes one Decimal of the same value and exponent as the sum of
        Decimal products would have (six Decimal operations a turn cost 3 us). Made once per
        Price object (`_SCALED`)."""
        found = _SCALED.get(id(self))
        if found is not None:
            return found[1]
        prices = (self.input_per_mtok, self.cached, self.output_per_mtok)
        exponent = min(int(p.as_tuple().exponent) for p in prices)
        scaled = [int(p.scaleb(-exponent)) for p in prices]
        if len(_SCALED) >= 1024:
            _SCALED.clear()
        _SCALED[id(self)] = (self, (scaled[0], scaled[1], scaled[2], exponent))
        return _SCALED[id(self)][1]

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> Decimal:
        """CONTRACT.md §6; usage can be odd upstream, so figures are clamped first."""
        input_tokens = max(input_tokens, 0)
        cached_tokens = min(max(cached_tokens, 0), input_tokens)
        output_tokens = max(output_tokens, 0)
        per_input, per_cached, per_output, exponent = self._scaled()
        total = (
            (input_tokens - cached_tokens) * per_input
            + cached_tokens * per_cached
            + output_tokens * per_output
        )
        return Decimal(total).scaleb(exponent) / _MILLION
