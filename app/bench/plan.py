"""The sizes of a bench run, read once from the flags."""

from __future__ import annotations

import math
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
    # The phases measured beside the rounds (app/bench/phases.py); 0 or () leaves one out.
    events_per_turn: tuple[int, ...] = ()
    shape_rounds: int = 3
    shape_events: int = 54_000  # events per target per round for each turn length
    shape_max_turns: int = 3_000  # per target per round (the one-event turn's bound)
    burst: int = 0  # sockets that connect at once, each sending its first turn at once
    burst_rounds: int = 3
    workers: int = 1  # >1: a `gateway serve --workers N` beside the one-worker gateway
    sse: bool = False  # POST /v1/responses with stream: true, against a bare HTTP relay
    relay_loops: bool = False  # the per-turn-length phase on a relay of the other event loop too
    request_kb: int = 0  # the turn-length phase's requests carry an agent's instructions and tools

    @property
    def paced(self) -> Shape:
        return Shape(self.model, self.deltas, self.gap_ms)

    @property
    def saturated(self) -> Shape:
        return Shape(self.model, self.saturate_deltas, 0)

    def shape_turns(self, events: int) -> int:
        """Turns per socket of the saturated load whose turns have `events` events each."""
        total = min(self.shape_max_turns, math.ceil(self.shape_events / events))
        return max(1, math.ceil(total / self.saturate_sockets))

    @property
    def small(self) -> Shape:
        """The one turn an idle socket ran, and a first turn."""
        return Shape(self.model, 5, 0)
