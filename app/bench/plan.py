"""The sizes of a bench run, read once from the flags."""

from __future__ import annotations

from dataclasses import dataclass

from app.bench.load import Shape


@dataclass(frozen=True)
class Plan:
    """Sockets, turns and deltas of each phase."""

    model: str
    sockets: int
    turns: int
    deltas: int
    gap_ms: float
    concurrency: int
    handshakes: int
    idle_sockets: int
    timeout: float
    rounds: int
    saturate_sockets: int
    saturate_turns: int
    saturate_deltas: int
    handshake_delay_ms: float
    first_turns: int
    first_turn_pause_ms: float
    pool_warmup_s: float

    @property
    def paced(self) -> Shape:
        return Shape(self.model, self.deltas, self.gap_ms)

    @property
    def saturated(self) -> Shape:
        return Shape(self.model, self.saturate_deltas, 0)

    @property
    def small(self) -> Shape:
        """The one turn an idle socket ran, and a first turn."""
        return Shape(self.model, 5, 0)
