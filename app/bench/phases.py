"""The phases of `gateway bench --compare` beside its rounds: turn lengths, the first-turn burst,
`--workers N`, and `POST /v1/responses` with `stream: true` (SSE).

- Turn lengths (`--events-per-turn`): a saturated load whose turns have E events each (E = 1: the
  terminal event alone, the fixed cost of a turn), on the relay (on both event loops with
  `relay_loops`) and the gateway, alternating over `shape_rounds`; CPU per forwarded event is the
  total over the rounds. At one event a turn, the gateway's fixed CPU per turn is its CPU per turn
  minus the relay's.
- Burst (`--burst N`): N new sockets at once, each sending its first turn as soon as it is open,
  on a stack whose simulator delays every handshake: time from each socket's handshake to its
  first event, direct, through the relay, through a gateway without a warm pool and through one
  whose pool holds N.
- Workers (`--workers N`): the saturated load on the one-worker gateway and on a `gateway serve
  --workers N`, alternating; then whether one scrape of the N-worker gateway's `/metrics`
  counted every response it served (one coherent view of all workers).
- SSE (`--sse`): the saturated load as streamed POSTs: direct, through a bare aiohttp HTTP relay
  (app/bench/httprelay.py), through the gateway.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from app.bench.load import (
    BenchError,
    LoadResult,
    Shape,
    Target,
    burst_first_turns,
    run_load,
    run_sse_load,
)
from app.bench.plan import Plan
from app.bench.proc import CpuMeter, wait_quiet
from app.bench.report import Verdict, median, percentile, ratio, verdict
from app.bench.stack import Stack


def say(text: str) -> None:
    """Progress, on stderr: stdout keeps the report."""
    print(f"  .. {text}", file=sys.stderr, flush=True)


def rotate(targets: Sequence[Target], by: int) -> list[Target]:
    by %= len(targets)
    return [*targets[by:], *targets[:by]]


def meter(stack: Stack, target: Target) -> CpuMeter:
    pids = {"sim": stack.sim.pid}
    if target.name != "direct" and target.pid is not None:
        pids["target"] = target.pid
    return CpuMeter(pids)


async def quiet(stack: Stack) -> None:
    if not await wait_quiet(stack.pids):
        say("the processes did not go quiet within 10 s; measuring anyway")


async def load(
    plan: Plan, stack: Stack, target: Target, shape: Shape, sockets: int, turns: int
) -> LoadResult:
    await quiet(stack)
    return await run_load(
        target,
        shape,
        sockets=sockets,
        turns=turns,
        concurrency=plan.concurrency,
        timeout=plan.timeout,
        meter=meter(stack, target),
    )


def _cpu_total(results: list[LoadResult]) -> tuple[float, int, int] | None:
    """CPU seconds of the target, events and turns, summed over the rounds."""
    if not results or any("target" not in r.cpu for r in results):
        return None
    cpu = sum(r.cpu["target"] for r in results)
    return cpu, sum(r.rec.events for r in results), sum(r.rec.turns for r in results)


# -- turn lengths -------------------------------------------------------------------------------


@dataclass
class ShapeRow:
    events: int  # a turn's events
    turns: int  # per target per round
    per_event: dict[str, float | None]  # CPU seconds per forwarded event, by target
    per_turn: dict[str, float | None]  # CPU seconds per turn, by target
    errors: int = 0


async def measure_shapes(plan: Plan, stack: Stack, targets: list[Target]) -> list[ShapeRow]:
    rows: list[ShapeRow] = []
    for events in plan.events_per_turn:
        shape = Shape.of_events(plan.model, events, plan.request_kb)
        turns = plan.shape_turns(events)
        results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
        for number in range(plan.shape_rounds):
            for target in rotate(targets, number):
                say(
                    f"{events} events a turn, round {number + 1}/{plan.shape_rounds}: {target.name}"
                )
                results[target.name].append(
                    await load(plan, stack, target, shape, plan.saturate_sockets, turns)
                )
        row = ShapeRow(events, turns * plan.saturate_sockets, {}, {})
        for name, found in results.items():
            total = _cpu_total(found)
            row.errors += sum(r.rec.errors for r in found)
            row.per_event[name] = total[0] / total[1] if total and total[1] else None
            row.per_turn[name] = total[0] / total[2] if total and total[2] else None
        rows.append(row)
    return rows


def fixed_per_turn(rows: list[ShapeRow]) -> tuple[float, float, float] | None:
    """At one event a turn: the gateway's CPU per turn less the relay's, and both."""
    row = next((r for r in rows if r.events == 1), None)
    if row is None:
        return None
    gateway, relay = row.per_turn.get("gateway"), row.per_turn.get("relay")
    if gateway is None or relay is None:
        return None
    return gateway - relay, gateway, relay


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e6:.1f} us"


def shape_lines(plan: Plan, rows: list[ShapeRow], names: list[str]) -> list[str]:
    head = f"{'events a turn':<15}{'turns':>8}" + "".join(f"{n:>16}" for n in names)
    head += f"{'gateway/relay':>15}"
    lines = [
        f"CPU per forwarded event by turn length ({plan.saturate_sockets} sockets, no pause, "
        f"{plan.shape_rounds} rounds alternating; turns per target per round)",
        head,
        "-" * len(head),
    ]
    for row in rows:
        cells = "".join(f"{_us(row.per_event.get(n)):>16}" for n in names)
        r = ratio(row.per_event.get("gateway"), row.per_event.get("relay"))
        shown = "-" if r is None else f"{r:.2f}x"
        lines.append(f"{row.events:<15}{row.turns:>8}{cells}{shown:>15}")
    fixed = fixed_per_turn(rows)
    if fixed is not None:
        lines.append(
            f"fixed CPU per accepted turn (1 event a turn): gateway {_us(fixed[1])} - relay "
            f"{_us(fixed[2])} = {_us(fixed[0])}"
        )
    errors = sum(r.errors for r in rows)
    if errors:
        lines.append(f"error events in the turn-length phase: {errors}")
    return lines


def shape_verdicts(rows: list[ShapeRow]) -> list[Verdict]:
    out: list[Verdict] = []
    for row in rows:
        if row.events < 20:
            continue
        bound = 1.0 if row.events >= 100 else 1.2
        r = ratio(row.per_event.get("gateway"), row.per_event.get("relay"))
        out.append(
            verdict(
                None if r is None else r <= bound,
                f"CPU per forwarded event at {row.events} events a turn, gateway/relay = "
                f"{'-' if r is None else f'{r:.2f}'} (target <= {bound:.1f})",
            )
        )
    fixed = fixed_per_turn(rows)
    if fixed is not None or any(r.events == 1 for r in rows):
        value = None if fixed is None else fixed[0] * 1e6
        out.append(
            verdict(
                None if value is None else value <= 100,
                f"fixed CPU per accepted turn, gateway - relay = "
                f"{'-' if value is None else f'{value:.0f}'} us (target <= 100 us)",
            )
        )
    return out


# -- the first-turn burst -----------------------------------------------------------------------


@dataclass
class Burst:
    count: int
    handshake_ms: float
    p50: dict[str, float | None] = field(default_factory=dict)
    p99: dict[str, float | None] = field(default_factory=dict)


async def measure_burst(plan: Plan, stack: Stack, targets: list[Target]) -> Burst:
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    for number in range(plan.burst_rounds):
        for target in rotate(targets, number):
            say(
                f"burst of {plan.burst} first turns, round {number + 1}/{plan.burst_rounds}: "
                f"{target.name}"
            )
            await quiet(stack)
            if target.name == "gateway-pool":
                await asyncio.sleep(plan.pool_warmup_s)  # the pool refills after each burst
            found = await burst_first_turns(
                target, plan.small, count=plan.burst, timeout=plan.timeout
            )
            samples[target.name].extend(found)
    burst = Burst(plan.burst, 0.0)
    for name, values in samples.items():
        burst.p50[name] = percentile(values, 50)
        burst.p99[name] = percentile(values, 99)
    return burst


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def burst_lines(burst: Burst, handshake_ms: float) -> list[str]:
    names = list(burst.p50)
    head = f"{'':<8}" + "".join(f"{n:>15}" for n in names)
    lines = [
        f"first turn of {burst.count} sockets connecting at once, each sending its turn at once "
        f"({handshake_ms:g} ms upstream handshake; from the client's handshake to the first "
        "event; gateway-nopool: GATEWAY_UPSTREAM_POOL_SIZE=0, gateway-pool: "
        f"GATEWAY_UPSTREAM_POOL_SIZE={burst.count})",
        head,
        "-" * len(head),
        f"{'p50':<8}" + "".join(f"{_ms(burst.p50[n]):>15}" for n in names),
        f"{'p99':<8}" + "".join(f"{_ms(burst.p99[n]):>15}" for n in names),
    ]
    return lines


def burst_verdicts(burst: Burst) -> list[Verdict]:
    out = []
    for q, values in (("p50", burst.p50), ("p99", burst.p99)):
        r = ratio(values.get("gateway-nopool"), values.get("relay"))
        out.append(
            verdict(
                None if r is None else r <= 1.5,
                f"burst first-turn time to first event {q} without the warm pool, gateway/relay"
                f" = {'-' if r is None else f'{r:.2f}'} (target <= 1.5)",
            )
        )
    for q, values in (("p50", burst.p50), ("p99", burst.p99)):
        r = ratio(values.get("gateway-pool"), values.get("direct"))
        out.append(
            verdict(
                None if r is None else r < 1,
                f"burst first-turn time to first event {q} with the warm pool, gateway/direct"
                f" = {'-' if r is None else f'{r:.2f}'} (target < 1)",
            )
        )
    return out


# -- workers ------------------------------------------------------------------------------------


@dataclass
class Workers:
    count: int
    events_per_s: dict[str, float | None] = field(default_factory=dict)
    cpu_per_1k: dict[str, float | None] = field(default_factory=dict)
    counted: float | None = None  # responses the N-worker gateway's /metrics counted
    served: int = 0  # turns the bench ran on it meanwhile


_RESPONSES = re.compile(r"^gateway_responses_total\{[^}]*\}\s+([0-9.eE+]+)$", re.M)


async def responses_counted(address: str) -> float | None:
    """The sum of `gateway_responses_total` in one scrape of a gateway's `/metrics`."""
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{address}/metrics") as resp:
                text = await resp.text()
    except (aiohttp.ClientError, OSError):
        return None
    return sum(float(v) for v in _RESPONSES.findall(text))


async def measure_workers(plan: Plan, stack: Stack, name: str) -> Workers:
    targets = [t for t in stack.targets() if t.name == "gateway"] + [stack.extra(name)]
    address = stack.extras[name].address
    before = await responses_counted(address)
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for number in range(plan.rounds):
        for target in rotate(targets, number):
            say(f"round {number + 1}/{plan.rounds}, saturated, workers: {target.name}")
            results[target.name].append(
                await load(
                    plan, stack, target, plan.saturated, plan.saturate_sockets, plan.saturate_turns
                )
            )
    after = await responses_counted(address)
    workers = Workers(plan.workers)
    for target_name, found in results.items():
        workers.events_per_s[target_name] = median([r.events_per_second for r in found])
        total = _cpu_total(found)
        workers.cpu_per_1k[target_name] = total[0] * 1000 / total[1] if total and total[1] else None
    served = results[name]
    # Each load also ran one untimed warm-up turn per socket.
    workers.served = sum(r.rec.turns + plan.saturate_sockets for r in served)
    if before is not None and after is not None:
        workers.counted = after - before
    return workers


def workers_lines(w: Workers, name: str) -> list[str]:
    one, many = w.events_per_s.get("gateway"), w.events_per_s.get(name)
    r = ratio(many, one)
    lines = [
        f"--workers {w.count}: saturated events per second, one worker "
        f"{'-' if one is None else f'{one:,.0f}'}, {w.count} workers "
        f"{'-' if many is None else f'{many:,.0f}'} ({'-' if r is None else f'{r:.2f}x'}); CPU-s "
        f"per 1,000 events {_cpu(w.cpu_per_1k.get('gateway'))} and "
        f"{_cpu(w.cpu_per_1k.get(name))}",
    ]
    counted = "-" if w.counted is None else f"{w.counted:,.0f}"
    lines.append(
        f"--workers {w.count}: one scrape of /metrics counted {counted} responses of the "
        f"{w.served:,} turns run through it"
    )
    return lines


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f} s"


def workers_verdicts(w: Workers, name: str) -> list[Verdict]:
    r = ratio(w.events_per_s.get(name), w.events_per_s.get("gateway"))
    coherent = w.counted is not None and w.counted == w.served
    return [
        verdict(
            None if r is None else r >= 1.8,
            f"saturated events per second, {w.count} workers / one = "
            f"{'-' if r is None else f'{r:.2f}'} (target >= 1.8)",
        ),
        verdict(
            None if w.counted is None else coherent,
            f"one /metrics for {w.count} workers: {w.counted or 0:,.0f} of {w.served:,} "
            "responses counted (target: all)",
        ),
    ]


# -- SSE ----------------------------------------------------------------------------------------


@dataclass
class Sse:
    events_per_s: dict[str, float | None] = field(default_factory=dict)
    cpu_per_1k: dict[str, float | None] = field(default_factory=dict)
    errors: int = 0


async def sse_load(plan: Plan, stack: Stack, target: Target) -> LoadResult:
    await quiet(stack)
    return await run_sse_load(
        target,
        plan.saturated,
        clients=plan.saturate_sockets,
        requests=plan.saturate_turns,
        timeout=plan.timeout,
        meter=meter(stack, target),
    )


async def measure_sse(plan: Plan, stack: Stack) -> Sse:
    targets = stack.http_targets()
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for number in range(plan.shape_rounds):
        for target in rotate(targets, number):
            say(f"SSE round {number + 1}/{plan.shape_rounds}: {target.name}")
            results[target.name].append(await sse_load(plan, stack, target))
    sse = Sse()
    expected = plan.saturated.events * plan.saturate_sockets * plan.saturate_turns
    for name, found in results.items():
        sse.events_per_s[name] = median([r.events_per_second for r in found])
        total = _cpu_total(found)
        sse.cpu_per_1k[name] = total[0] * 1000 / total[1] if total and total[1] else None
        sse.errors += sum(1 for r in found if r.rec.events != expected)
    return sse


def sse_lines(plan: Plan, sse: Sse) -> list[str]:
    names = list(sse.events_per_s)
    head = f"{'':<32}" + "".join(f"{n:>14}" for n in names) + f"{'gateway/relay':>15}"
    rows: list[tuple[str, dict[str, float | None], str]] = [
        ("saturated events per second", sse.events_per_s, "rate"),
        ("CPU-seconds per 1,000 events", sse.cpu_per_1k, "cpu"),
    ]
    lines = [
        f"POST /v1/responses with stream: true ({plan.saturate_sockets} clients x "
        f"{plan.saturate_turns} requests x {plan.saturated.events} events, no pause; relay: "
        "app/bench/httprelay.py)",
        head,
        "-" * len(head),
    ]
    for label, values, kind in rows:
        cells = ""
        for n in names:
            v = values.get(n)
            text = "-" if v is None else (f"{v:,.0f}" if kind == "rate" else f"{v:.4f} s")
            cells += f"{text:>14}"
        r = ratio(values.get("gateway"), values.get("http-relay"))
        lines.append(f"{label:<32}{cells}{'-' if r is None else f'{r:.2f}x':>15}")
    if sse.errors:
        lines.append(f"SSE loads whose event count was short: {sse.errors}")
    return lines


def sse_verdicts(sse: Sse) -> list[Verdict]:
    cpu = ratio(sse.cpu_per_1k.get("gateway"), sse.cpu_per_1k.get("http-relay"))
    rate = ratio(sse.events_per_s.get("gateway"), sse.events_per_s.get("http-relay"))
    return [
        verdict(
            None if cpu is None else cpu <= 1.3,
            f"SSE CPU per event, gateway/HTTP relay = {'-' if cpu is None else f'{cpu:.2f}'} "
            "(target <= 1.3)",
        ),
        verdict(
            None if rate is None else rate >= 0.9,
            f"SSE saturated events per second, gateway/HTTP relay = "
            f"{'-' if rate is None else f'{rate:.2f}'} (target >= 0.9)",
        ),
    ]


def check_events(plan: Plan) -> None:
    for events in plan.events_per_turn:
        try:
            Shape.of_events(plan.model, events)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
