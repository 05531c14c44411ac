"""Token usage from a Response object, and what it adds to the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from app import metrics
from app.ledger.rows import TurnRecord
from app.models import Price

Tokens = tuple[int, int, int, int]  # input, cached input, output, reasoning


def _int(value: object) -> int:
    return value if type(value) is int else 0  # not a bool, nor an int subclass


def usage_figures(usage: object) -> Tokens | None:
    """Clamped: upstream usage can be odd (cached above input, negatives)."""
    if type(usage) is not dict:
        return None
    details_in = usage.get("input_tokens_details")
    details_out = usage.get("output_tokens_details")
    input_tokens = _int(usage.get("input_tokens"))
    if input_tokens < 0:
        input_tokens = 0
    output_tokens = _int(usage.get("output_tokens"))
    cached = _int(details_in.get("cached_tokens")) if type(details_in) is dict else 0
    reasoning = _int(details_out.get("reasoning_tokens")) if type(details_out) is dict else 0
    return (
        input_tokens,
        0 if cached < 0 else cached if cached < input_tokens else input_tokens,
        0 if output_tokens < 0 else output_tokens,
        0 if reasoning < 0 else reasoning,
    )


def count_usage(model: str, team: str, tokens: Tokens, cost: Decimal) -> None:
    for counter, value in zip(metrics.tokens(model), tokens, strict=True):
        if value:
            metrics.add(counter, value)
    if cost > 0:
        metrics.add(metrics.cost(team), cost)  # a Decimal, made a float when folded in


def charge(catalog: Mapping[str, Price], row: TurnRecord, usage: object) -> None:
    """A finished response's usage and cost, counted in the metrics and set on its ledger row
    (which names the model and the team)."""
    tokens = usage_figures(usage)
    if tokens is None:
        return
    row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens = tokens
    model = row.model
    price = catalog.get(model) if model else None
    if price is not None and model:
        cost = price.cost(tokens[0], tokens[1], tokens[2])
        count_usage(model, row.team_id, tokens, cost)
        row.cost_usd = cost
