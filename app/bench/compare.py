"""`gateway bench --compare`: the same load on the simulator, a bare relay and the gateway.

Order of a run, each phase on every target before the next phase:
1. RSS per idle socket, first, while the processes are fresh (a process that already served
   a load has freed memory that new sockets would reuse unseen);
2. `rounds` rounds, the targets alternating (the order rotates each round): handshakes, a
   saturated load, a paced load; each figure is the median over the rounds (CPU per event: the
   total over the rounds), so one round disturbed by a neighbour on the host moves it little;
3. CPU per event by turn length, `--workers N`, SSE (app/bench/phases.py), each alternating;
4. first turns through a second stack whose simulator delays each handshake: one new socket at
   a time, then bursts of `--burst` sockets at once (app/bench/phases.py);
5. optionally, a py-spy profile of the gateway (or the relay) under the saturated load.

Before each measurement the bench waits until its processes are quiet (a process still closing
the last phase's sockets would slow the next phase down).
"""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from app import eventloop
from app.bench import phases, profile, report
from app.bench.load import (
    BenchError,
    LoadResult,
    Shape,
    Target,
    burst_first_turns,
    first_turns,
    handshake_rate,
    idle_rss,
)
from app.bench.phases import rotate as _rotate
from app.bench.phases import say
from app.bench.plan import Plan
from app.bench.proc import HostLoad
from app.bench.report import Figures, Verdict, median, percentile
from app.bench.stack import Bed, Stack, add_gateway, add_http_relay, add_relay, bed, start_stack


@dataclass(frozen=True)
class CompareOptions:
    gateway_env: dict[str, str] = field(default_factory=dict)
    team_limits: str = "all"  # TEAM_LIMITS
    profile: Path | None = None
    profile_target: str = "gateway"
    profile_load: str = "saturated"
    profile_seconds: float = 10.0
    workdir: Path | None = None


async def _load(
    plan: Plan, stack: Stack, target: Target, shape: Shape, sockets: int, turns: int
) -> LoadResult:
    return await phases.load(plan, stack, target, shape, sockets, turns)


async def _quiet(stack: Stack) -> None:
    await phases.quiet(stack)


def _per_1k(results: list[LoadResult], name: str) -> float | None:
    events = sum(r.rec.events for r in results)
    if not events or any(name not in r.cpu for r in results):
        return None
    return sum(r.cpu[name] for r in results) * 1000 / events


def _saturated(figures: Figures, results: list[LoadResult]) -> None:
    figures.events_per_s = median([r.events_per_second for r in results])
    figures.cpu_per_1k = _per_1k(results, "target")
    figures.sim_cpu_per_1k = _per_1k(results, "sim")
    figures.client_cpu_per_1k = _per_1k(results, "client")
    _errors(figures, results)


def _round_median(values: list[float | None]) -> float | None:
    """The median over rounds: one round disturbed by a neighbour on the host moves it little."""
    return median([v for v in values if v is not None])


def _paced(figures: Figures, results: list[LoadResult]) -> None:
    ttfe = [r.rec.ttfe for r in results]
    latency = [r.rec.latency for r in results]
    figures.ttfe_p50 = _round_median([percentile(x, 50) for x in ttfe])
    figures.ttfe_p99 = _round_median([percentile(x, 99) for x in ttfe])
    figures.latency_p50 = _round_median([percentile(x, 50) for x in latency])
    figures.latency_p99 = _round_median([percentile(x, 99) for x in latency])
    figures.paced_events_per_s = median([r.events_per_second for r in results])
    figures.paced_cpu_per_1k = _per_1k(results, "target")
    _errors(figures, results)


def _errors(figures: Figures, results: list[LoadResult]) -> None:
    for r in results:
        figures.errors += r.rec.errors
        figures.first_error = figures.first_error or r.rec.first_error


def _header(plan: Plan, stack: Stack) -> list[str]:
    p = plan
    return [
        f"gateway bench --compare: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {p.rounds} rounds with the targets alternating",
        f"  event loop of the relay and the gateway: {_loop_of(stack)}; of the bench client: "
        f"{eventloop.loop_name('auto')}",
        f"  direct   {stack.sim_ws_url} (the simulator, pid {stack.sim.pid})",
        f"  relay    {stack.relay.address} (bare relay, pid {stack.relay.pid})",
        f"  gateway  ws://{stack.gateway.address}/v1/responses (gateway serve, pid "
        f"{stack.gateway.pid})",
        f"  handshakes: {p.handshakes} sockets, {p.concurrency} in flight",
        f"  saturated: {p.saturate_sockets} sockets x {p.saturate_turns} turns x "
        f"{p.saturate_deltas} deltas, no pause ({p.saturated.events} events a turn)",
        f"  paced: {p.sockets} sockets x {p.turns} turns x {p.deltas} deltas, "
        f"{p.gap_ms:g} ms apart; latency = receive time - the simulator's sim_sent_at",
        f"  idle: {p.idle_sockets} sockets that ran one turn each",
        f"  first turn: {p.first_turns} new sockets per target, {p.handshake_delay_ms:g} ms "
        "upstream handshake, timed from the client's handshake to the first event",
        f"  turn lengths: {', '.join(map(str, p.events_per_turn)) or 'skipped'} events a turn, "
        f"{p.saturate_sockets} sockets, {p.shape_rounds} rounds"
        + (f", requests with {p.request_kb} KiB of instructions and tools" if p.request_kb else ""),
        f"  burst: {p.burst or 'skipped'} sockets at once, {p.burst_rounds} rounds; workers: "
        f"{p.workers if p.workers > 1 else 'skipped'}; SSE: {'yes' if p.sse else 'skipped'}",
    ]


def _loop_of(stack: Stack) -> str:
    if stack.loop == "asyncio":
        return "asyncio"
    if stack.loop == "uvloop":
        return "uvloop"
    return f"{eventloop.loop_name('auto')} (GATEWAY_EVENT_LOOP=auto)"


# The gateway's settings unless --gateway-env says otherwise: a warm pool of two upstream
# sockets (off by default in `gateway serve`), for the first-turn figure.
BENCH_GATEWAY_ENV = {"GATEWAY_UPSTREAM_POOL_SIZE": "2"}


async def compare(plan: Plan, options: CompareOptions) -> None:
    gateway_env = {**BENCH_GATEWAY_ENV, **options.gateway_env}
    phases.check_events(plan)
    async with bed(
        plan.model,
        limits=options.team_limits,
        gateway_env=gateway_env,
        keep=options.workdir,
    ) as b:
        say("starting the simulator, the relay and the gateway")
        stack = await start_stack(b, "main")
        targets = stack.targets()
        figures = {t.name: Figures() for t in targets}
        settings = " ".join(f"{k}={v}" for k, v in sorted(gateway_env.items()))
        header = [*_header(plan, stack), f"  gateway settings: {settings}"]
        header += [f"  note: {n}" for n in b.backing.notes]
        print("\n".join(header), flush=True)
        extra = await _start_extras(plan, b, stack)
        host = HostLoad(stack.pids)
        await _measure_rss(plan, stack, figures)
        await _measure_rounds(plan, stack, targets, figures)
        lines, verdicts = await _measure_phases(plan, stack, extra)
        others = host.others_cores()
        say(f"starting a second stack with a {plan.handshake_delay_ms:g} ms upstream handshake")
        cold = await start_stack(b, "first-turn", handshake_delay_ms=plan.handshake_delay_ms)
        burst_targets = await _start_burst_gateways(plan, b, cold)
        await asyncio.sleep(plan.pool_warmup_s)
        await _measure_first_turns(plan, cold, figures)
        if burst_targets:
            burst = await phases.measure_burst(plan, cold, burst_targets)
            lines += ["", *phases.burst_lines(burst, plan.handshake_delay_ms)]
            verdicts += phases.burst_verdicts(burst)
        _print_report(plan, figures, others, lines, verdicts)
        if options.profile is not None:
            await _profile(plan, stack, options)


def _workers_name(plan: Plan) -> str:
    return f"gateway-w{plan.workers}"


async def _start_extras(plan: Plan, b: Bed, stack: Stack) -> list[str]:
    """The relay on the other event loop, the HTTP relay, the N-worker gateway, as asked."""
    started: list[str] = []
    if plan.relay_loops and plan.events_per_turn:
        other = "asyncio" if eventloop.loop_name(_choice(stack.loop)) == "uvloop" else "uvloop"
        if other == "asyncio" or eventloop.loop_name("auto") == "uvloop":
            say(f"starting a relay on {other}")
            await add_relay(b, stack, f"relay-{other}", other)
            started.append(f"relay-{other}")
    if plan.sse:
        say("starting the bare HTTP relay")
        await add_http_relay(b, stack)
    if plan.workers > 1:
        say(f"starting gateway serve --workers {plan.workers}")
        await add_gateway(b, stack, _workers_name(plan), workers=plan.workers)
    return started


def _choice(loop: str) -> eventloop.LoopChoice:
    return "asyncio" if loop == "asyncio" else "uvloop" if loop == "uvloop" else "auto"


async def _start_burst_gateways(plan: Plan, b: Bed, cold: Stack) -> list[Target]:
    if not plan.burst:
        return []
    say("starting the burst's gateways, without a warm pool and with one")
    await add_gateway(b, cold, "gateway-nopool", env={"GATEWAY_UPSTREAM_POOL_SIZE": "0"})
    await add_gateway(b, cold, "gateway-pool", env={"GATEWAY_UPSTREAM_POOL_SIZE": str(plan.burst)})
    by_name = {t.name: t for t in cold.targets()}
    return [
        by_name["direct"],
        by_name["relay"],
        cold.extra("gateway-nopool"),
        cold.extra("gateway-pool"),
    ]


async def _measure_phases(
    plan: Plan, stack: Stack, extra_relays: list[str]
) -> tuple[list[str], list[Verdict]]:
    lines: list[str] = []
    verdicts: list[Verdict] = []
    if plan.events_per_turn:
        by_name = {t.name: t for t in stack.targets()}
        targets = [by_name["relay"], *(stack.extra(n) for n in extra_relays), by_name["gateway"]]
        rows = await phases.measure_shapes(plan, stack, targets)
        lines += ["", *phases.shape_lines(plan, rows, [t.name for t in targets])]
        verdicts += phases.shape_verdicts(rows)
    if plan.workers > 1:
        name = _workers_name(plan)
        workers = await phases.measure_workers(plan, stack, name)
        lines += ["", *phases.workers_lines(workers, name)]
        verdicts += phases.workers_verdicts(workers, name)
    if plan.sse:
        sse = await phases.measure_sse(plan, stack)
        lines += ["", *phases.sse_lines(plan, sse)]
        verdicts += phases.sse_verdicts(sse)
    return lines, verdicts


async def _measure_rss(plan: Plan, stack: Stack, figures: dict[str, Figures]) -> None:
    if not plan.idle_sockets:
        return
    for target in stack.targets():
        if target.name == "direct":
            continue  # the simulator's memory per socket is not a figure of interest
        say(f"RSS per idle socket: {target.name}")
        await _quiet(stack)
        rss = await idle_rss(
            target,
            plan.small,
            sockets=plan.idle_sockets,
            concurrency=plan.concurrency,
            timeout=plan.timeout,
        )
        figures[target.name].rss_per_socket = rss.per_socket


async def _handshakes(plan: Plan, stack: Stack, target: Target) -> float:
    await _quiet(stack)
    result = await handshake_rate(target, plan.handshakes, plan.concurrency, timeout=plan.timeout)
    if result.failed:
        raise BenchError(
            f"{target.name}: {result.failed} of {result.count} handshakes failed; "
            f"first: {result.first_failure}"
        )
    return result.per_second


async def _measure_rounds(
    plan: Plan, stack: Stack, targets: list[Target], figures: dict[str, Figures]
) -> None:
    handshakes: dict[str, list[float]] = {t.name: [] for t in targets}
    saturated: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    paced: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for number in range(plan.rounds):
        order = _rotate(targets, number)
        for target in order if plan.handshakes else []:
            say(f"round {number + 1}/{plan.rounds}, handshakes: {target.name}")
            handshakes[target.name].append(await _handshakes(plan, stack, target))
        for target in order:
            say(f"round {number + 1}/{plan.rounds}, saturated: {target.name}")
            saturated[target.name].append(
                await _load(
                    plan, stack, target, plan.saturated, plan.saturate_sockets, plan.saturate_turns
                )
            )
        for target in order:
            say(f"round {number + 1}/{plan.rounds}, paced: {target.name}")
            paced[target.name].append(
                await _load(plan, stack, target, plan.paced, plan.sockets, plan.turns)
            )
    for name, fig in figures.items():
        fig.handshakes_per_s = median(handshakes[name])
        _saturated(fig, saturated[name])
        _paced(fig, paced[name])


async def _measure_first_turns(plan: Plan, stack: Stack, figures: dict[str, Figures]) -> None:
    if not plan.first_turns:
        return
    say(f"first turns: {plan.first_turns} new sockets on each target, alternating")
    targets = stack.targets()
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    await _quiet(stack)
    for number in range(plan.first_turns):
        for target in _rotate(targets, number):
            found = await first_turns(
                target,
                plan.small,
                count=1,
                pause_s=plan.first_turn_pause_ms / 1000,
                timeout=plan.timeout,
            )
            samples[target.name].extend(found)
    for name, values in samples.items():
        figures[name].first_turn_p50 = percentile(values, 50)
        figures[name].first_turn_p99 = percentile(values, 99)


def _print_report(
    plan: Plan,
    figures: dict[str, Figures],
    others: float,
    phase_lines: list[str],
    phase_verdicts: list[Verdict],
) -> None:
    paced = f"{plan.sockets} paced streams"
    first = f"{plan.handshake_delay_ms:g} ms upstream handshake"
    lines = ["", *report.table(figures, report.compare_rows(paced, first)), *phase_lines, ""]
    lines.append(
        f"the rest of the host kept {others:.2f} of {os.cpu_count()} cores busy while the "
        "rounds ran (Redis and Postgres included; other work on the host makes figures noisy)"
    )
    lines.append("")
    lines.append("targets (a measurement, not a test: the exit status is 0 either way)")
    lines += [v.line for v in report.targets(figures, paced, plan.handshake_delay_ms)]
    lines += [v.line for v in phase_verdicts]
    for name, fig in figures.items():
        if fig.first_error:
            lines.append(f"first error event from {name}: {fig.first_error}")
    print("\n".join(lines), flush=True)


async def _profile(plan: Plan, stack: Stack, options: CompareOptions) -> None:
    raw, seconds = options.profile, options.profile_seconds
    assert raw is not None
    py_spy = profile.find_py_spy()
    if py_spy is None:
        print("profile: py-spy not found (pip install py-spy)", flush=True)
        return
    target = next(t for t in stack.targets() if t.name == options.profile_target)
    assert target.pid is not None
    kind = options.profile_load
    say(f"profiling the {target.name} (pid {target.pid}) for {seconds:g} s under the {kind} load")
    recorder = await profile.start_recording(py_spy, target.pid, seconds, raw)
    ended = asyncio.create_task(recorder.communicate())
    while not ended.done():
        if kind == "handshakes":
            await _handshakes(plan, stack, target)
        elif kind == "paced":
            await _load(plan, stack, target, plan.paced, plan.sockets, plan.turns)
        elif kind == "turns":  # short turns: the first --events-per-turn length (1: fixed cost)
            events = plan.events_per_turn[0] if plan.events_per_turn else 1
            shape = Shape.of_events(plan.model, events, plan.request_kb)
            turns = plan.shape_turns(events)
            await _load(plan, stack, target, shape, plan.saturate_sockets, turns)
        elif kind == "sse":  # POST /v1/responses with stream: true, saturated
            http_target = next(t for t in stack.http_targets() if t.name == "gateway")
            await phases.sse_load(plan, stack, http_target)
        elif kind == "burst":  # new sockets at once, each with its first turn
            await _quiet(stack)
            await burst_first_turns(
                target, plan.small, count=plan.burst or 200, timeout=plan.timeout
            )
        else:
            await _load(
                plan, stack, target, plan.saturated, plan.saturate_sockets, plan.saturate_turns
            )
    _, err = await ended
    if recorder.returncode != 0 or not profile.has_samples(raw):
        print(f"profile: py-spy failed: {err.decode(errors='replace').strip()}", flush=True)
        return
    lines = [
        "",
        f"py-spy profile of the {target.name} under the {kind} load ({raw}):",
        *profile.summarize(profile.load_stacks(raw)),
    ]
    print("\n".join(lines), flush=True)
