"""Token usage from a Response object, and what it adds to the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from app import metrics
from app.models import Price

Tokens = tuple[int, int, int, int]  # input, cached input, output, reasoning


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_figures(usage: object) -> Tokens | None:
    """Clamped: upstream usage can be odd (cached above input, negatives)."""
    if not isinstance(usage, dict):
        return None
    details_in = usage.get("input_tokens_details")
    details_out = usage.get("output_tokens_details")
    input_tokens = max(_int(usage.get("input_tokens")), 0)
    cached = _int(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0
    reasoning = _int(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0
    return (
        input_tokens,
        min(max(cached, 0), input_tokens),
        max(_int(usage.get("output_tokens")), 0),
        max(reasoning, 0),
    )


_KINDS = ("input", "cached_input", "output", "reasoning")  # the `kind` label, in `Tokens` order


def count_usage(model: str, team: str, tokens: Tokens, cost: Decimal) -> None:
    for kind, value in zip(_KINDS, tokens, strict=True):
        if value:
            metrics.add(metrics.tokens(model, kind), value)
    if cost > 0:
        metrics.add(metrics.cost(team), cost)  # a Decimal, made a float when folded in


def charge(
    catalog: Mapping[str, Price], model: str | None, team: str, usage: object
) -> dict[str, Any]:
    """A finished response's usage and cost, counted in the metrics; the ledger row's fields."""
    tokens = usage_figures(usage)
    if tokens is None:
        return {}
    fields: dict[str, Any] = dict(
        zip(
            ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"),
            tokens,
            strict=True,
        )
    )
    price = catalog.get(model) if model else None
    if price is not None and model:
        cost = price.cost(tokens[0], tokens[1], tokens[2])
        count_usage(model, team, tokens, cost)
        fields["cost_usd"] = cost
    return fields
