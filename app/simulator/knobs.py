"""Per-turn switches: `metadata.sim_*` of a request over the run-wide options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.simulator import errors, faults
from app.simulator.generate import Shaping
from app.simulator.options import SimulatorOptions

MAX_DELTAS = 1_000_000
MAX_LARGE_BYTES = 512 * 1024 * 1024
_BOOL = ("true", "false")


@dataclass(frozen=True)
class TurnKnobs:
    fault: str | None
    fault_after: int
    delay_s: float
    shaping: Shaping
    terminal_only: bool = False  # `sim_terminal_only`: the response's last event alone


def turn_knobs(
    metadata: dict[str, str],
    options: SimulatorOptions,
    *,
    fault_key: str,
    allowed: tuple[str, ...],
    default_fault: Callable[[], str | None],
) -> TurnKnobs:
    """Read the `sim_*` metadata of one turn; `default_fault` is asked only if it names none.

    A malformed `sim_*` value is the client's mistake and gets an `invalid_value` error, so a test
    that misspells a fault fails loudly instead of passing without it.
    """
    named = metadata.get(fault_key)
    if named is None:
        fault = default_fault()
    elif named == faults.NONE:
        fault = None
    else:
        fault = _checked(fault_key, named, allowed)
    deltas = _number(metadata, "sim_deltas", 1, MAX_DELTAS)
    delay_ms = _number(metadata, "sim_delay_ms", 0, 3_600_000, integer=False)
    after = _number(metadata, "sim_fault_after", 0, MAX_DELTAS)
    large = _number(metadata, "sim_large_bytes", 0, MAX_LARGE_BYTES)
    terminal_only = _checked("sim_terminal_only", metadata.get("sim_terminal_only", "false"), _BOOL)
    large_bytes = None
    if fault == faults.LARGE:
        large_bytes = options.large_bytes if large is None else int(large)
    return TurnKnobs(
        fault=fault,
        fault_after=options.fault_after if after is None else int(after),
        delay_s=(options.delay_ms if delay_ms is None else delay_ms) / 1000,
        shaping=Shaping(
            deltas=options.deltas if deltas is None else int(deltas),
            large_bytes=large_bytes,
            incomplete=fault == faults.INCOMPLETE,
        ),
        terminal_only=terminal_only == "true",
    )


def _checked(key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise errors.invalid_value(
            f"metadata.{key}", f"Unknown {key} {value!r}: expected one of {', '.join(allowed)}."
        )
    return value


def _number(
    metadata: dict[str, str], key: str, low: float, high: float, *, integer: bool = True
) -> float | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise errors.invalid_value(
            f"metadata.{key}", f"Invalid {key}: expected {kind} in {low}..{high}, got {raw!r}."
        )
    return value
