"""Run-time switches of the simulator, read once into a frozen object."""

from __future__ import annotations

from dataclasses import dataclass

from app.simulator.faults import HANDSHAKE_FAULTS, TURN_FAULTS, check_name

MIB = 1024 * 1024


@dataclass(frozen=True)
class SimulatorOptions:
    """Every switch has a default that behaves like OpenAI (the decimal close included)."""

    api_key: str | None = None
    """When set, the bearer token every request must carry; otherwise any non-empty one."""

    decimal_close: bool = True
    """Fault 1: a non-integer JSON number in `temperature`/`top_p` closes the socket (1000)."""

    fault: str | None = None
    """A per-turn fault applied to every WebSocket turn (one of `faults.TURN_FAULTS`)."""

    fault_rate: float = 0.0
    """Probability (0..1) that a WebSocket turn gets a random fault of `faults.RANDOM_FAULTS`."""

    seed: int | None = None
    """Seed of the random faults, so a soak run can be replayed."""

    fault_after: int = 3
    """How many events a mid-response fault lets through first (`metadata.sim_fault_after`)."""

    handshake_fault: str | None = None
    """A refusal for every WebSocket handshake (one of `faults.HANDSHAKE_FAULTS`)."""

    handshake_delay_ms: float = 0.0
    """A pause before answering every WebSocket handshake (models TLS and distance)."""

    delay_ms: float = 0.0
    """The pause before each delta event (`metadata.sim_delay_ms` overrides it)."""

    deltas: int | None = None
    """Force this many text deltas per response (`metadata.sim_deltas` overrides it)."""

    large_bytes: int = 6 * MIB
    """Size of the `response.completed` frame of the `large` fault (`metadata.sim_large_bytes`)."""

    max_connection_seconds: float = 3600.0
    """Age at which a socket gets `websocket_connection_limit_reached` and is closed."""

    max_message_bytes: int = 64 * MIB
    """Largest WebSocket message or HTTP body accepted."""

    sent_at: bool = True
    """Stamp every event with `sim_sent_at` (unix time of sending) for latency measurements."""

    request_log_limit: int = 10_000
    """How many entries `GET /_sim/requests` keeps (the oldest go first)."""

    store_limit: int = 10_000
    """How many `store: true` responses are kept for chaining (the oldest go first)."""

    def __post_init__(self) -> None:
        if self.fault is not None:
            check_name(self.fault, TURN_FAULTS, "fault")
        if self.handshake_fault is not None:
            check_name(self.handshake_fault, HANDSHAKE_FAULTS, "handshake_fault")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate: expected a number in 0..1, got {self.fault_rate}")
        if self.deltas is not None and self.deltas < 1:
            raise ValueError(f"deltas: expected a positive integer, got {self.deltas}")
        for name in ("fault_after", "handshake_delay_ms", "delay_ms", "large_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        for name in ("max_connection_seconds", "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        for name in ("request_log_limit", "store_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
