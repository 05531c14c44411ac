"""Figures, their labels and units, the comparison table and the issue's targets."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Labels of every figure, as printed (tests look for them).
HANDSHAKES = "handshakes per second"
TTFE_P50 = "time to first event p50"
TTFE_P99 = "time to first event p99"
LATENCY_P50 = "per-event added latency p50"
LATENCY_P99 = "per-event added latency p99"
EVENTS = "events per second"
CPU = "CPU-seconds per 1,000 events"
RSS = "RSS per idle socket"
FIRST_TURN_P50 = "first-turn time to first event p50"
FIRST_TURN_P99 = "first-turn time to first event p99"
SIM_CPU = "  simulator CPU-s per 1,000 events"
CLIENT_CPU = "  bench client CPU-s per 1,000 events"
ERRORS = "error events"

KIB = 1024  # RSS per socket is in KiB (VmRSS is in KiB too)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


@dataclass
class Figures:
    """What one target measured; None where it was not measured (or cannot be)."""

    handshakes_per_s: float | None = None
    ttfe_p50: float | None = None  # seconds
    ttfe_p99: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None
    events_per_s: float | None = None
    paced_events_per_s: float | None = None
    paced_cpu_per_1k: float | None = None
    cpu_per_1k: float | None = None  # CPU seconds of the target's process per 1,000 events
    sim_cpu_per_1k: float | None = None
    client_cpu_per_1k: float | None = None
    rss_per_socket: float | None = None  # bytes
    first_turn_p50: float | None = None
    first_turn_p99: float | None = None
    errors: int = 0
    first_error: str | None = None
    notes: list[str] = field(default_factory=list)


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f} s"


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / KIB:.1f} KiB"


Row = tuple[str, Callable[[Figures], float | None], Callable[[float | None], str]]


def compare_rows(paced: str, first_turn: str) -> list[Row]:
    return [
        (HANDSHAKES, lambda f: f.handshakes_per_s, _rate),
        (f"saturated {EVENTS}", lambda f: f.events_per_s, _rate),
        (f"{CPU} (saturated)", lambda f: f.cpu_per_1k, _cpu),
        (SIM_CPU, lambda f: f.sim_cpu_per_1k, _cpu),
        (CLIENT_CPU, lambda f: f.client_cpu_per_1k, _cpu),
        (f"{TTFE_P50} ({paced})", lambda f: f.ttfe_p50, ms),
        (f"{TTFE_P99} ({paced})", lambda f: f.ttfe_p99, ms),
        (f"{LATENCY_P50} ({paced})", lambda f: f.latency_p50, ms),
        (f"{LATENCY_P99} ({paced})", lambda f: f.latency_p99, ms),
        (f"paced {EVENTS}", lambda f: f.paced_events_per_s, _rate),
        (f"{CPU} (paced)", lambda f: f.paced_cpu_per_1k, _cpu),
        (RSS, lambda f: f.rss_per_socket, _kib),
        (f"{FIRST_TURN_P50} ({first_turn})", lambda f: f.first_turn_p50, ms),
        (f"{FIRST_TURN_P99} ({first_turn})", lambda f: f.first_turn_p99, ms),
        (ERRORS, lambda f: float(f.errors), lambda v: "-" if v is None else f"{v:.0f}"),
    ]


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def table(figures: dict[str, Figures], rows: list[Row]) -> list[str]:
    """Rows of figures, one column per target, then gateway/relay."""
    names = list(figures)
    width = max(len(label) for label, _, _ in rows) + 2
    head = f"{'figure':<{width}}" + "".join(f"{n:>14}" for n in names) + f"{'gateway/relay':>15}"
    lines = [head, "-" * len(head)]
    for label, get, fmt in rows:
        values = [get(figures[n]) for n in names]
        cells = "".join(f"{fmt(v):>14}" for v in values)
        r = ratio(get(figures["gateway"]), get(figures["relay"])) if "relay" in figures else None
        shown = "-" if r is None or label == ERRORS else f"{r:.2f}x"
        lines.append(f"{label:<{width}}{cells}{shown:>15}")
    return lines


@dataclass(frozen=True)
class Verdict:
    passed: bool | None  # None: not measured
    line: str


def verdict(passed: bool | None, text: str) -> Verdict:
    mark = {True: "PASS", False: "FAIL", None: "N/A "}[passed]
    return Verdict(passed, f"{mark}  {text}")


def targets(f: dict[str, Figures], paced: str, handshake_ms: float) -> list[Verdict]:
    """The speed targets of the rounds, each as a PASS/FAIL line (the other phases' targets:
    app/bench/phases.py)."""
    gw, relay, direct = f["gateway"], f["relay"], f["direct"]
    out: list[Verdict] = []

    def check(value: float | None, ok: Callable[[float], bool], text: str) -> None:
        if value is None:
            name = text.partition(",")[0].partition(" = ")[0]
            out.append(verdict(None, f"{name}: not measured (a phase skipped, or too small)"))
        else:
            out.append(verdict(ok(value), text.format(value)))

    check(
        ratio(gw.events_per_s, relay.events_per_s),
        lambda v: v >= 0.8,
        "saturated events per second, gateway/relay = {:.2f} (target >= 0.8)",
    )
    check(
        ratio(gw.cpu_per_1k, relay.cpu_per_1k),
        lambda v: v <= 1.3,
        "CPU per 1,000 forwarded events, gateway/relay = {:.2f} (target <= 1.3)",
    )
    check(
        ratio(gw.latency_p99, relay.latency_p99),
        lambda v: v <= 1.3,
        f"per-event added latency p99 at {paced}, gateway/relay = {{:.2f}} (target <= 1.3)",
    )
    check(
        None if gw.rss_per_socket is None else gw.rss_per_socket / KIB,
        lambda v: v <= 36,
        "RSS per idle session through the gateway = {:.1f} KiB (target <= 36 KiB)",
    )
    check(
        ratio(gw.handshakes_per_s, relay.handshakes_per_s),
        lambda v: v >= 1,
        "authenticated handshakes per second on one worker, gateway/relay = {:.2f} (target >= 1)",
    )
    first = ratio(gw.first_turn_p50, direct.first_turn_p50)
    check(
        first,
        lambda v: v < 1,
        f"first-turn time to first event p50 with a {handshake_ms:g} ms upstream handshake, "
        f"gateway/direct = {{:.2f}} ({ms(gw.first_turn_p50)} vs {ms(direct.first_turn_p50)}; "
        "target < 1)",
    )
    return out
