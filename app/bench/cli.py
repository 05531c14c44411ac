"""`gateway bench`: flags, and the run they start (one target, or `--compare`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app import eventloop
from app.bench.load import BenchError
from app.bench.plan import Plan
from app.bench.stack import TEAM_LIMITS

DEFAULT_MODEL = "openai/gpt-5-mini"
N = TypeVar("N", int, float)


def _at_least(kind: Callable[[str], N], low: N, *, strict: bool) -> Callable[[str], N]:
    """An argparse type: a number of `kind` above `low` (or at least `low`)."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (strict and value == low):
            bound = f"> {low}" if strict else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text}")
        return value

    return parse


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _events_list(text: str) -> tuple[int, ...]:
    """`1,20,50,108`: turn lengths in events (1, or 9 and more); empty or `none`: no phase."""
    if text.strip().lower() in ("", "none"):
        return ()
    values: list[int] = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected numbers with commas, got {text!r}"
            ) from None
        if value != 1 and value < 9:
            raise argparse.ArgumentTypeError(
                f"a turn has 1 event (the terminal one) or 9 and more (8 + deltas), not {value}"
            )
        values.append(value)
    return tuple(values)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Load-test a gateway (or any WebSocket Responses endpoint) and print its figures. "
        "With --compare, start a simulator, a bare relay and a gateway, and compare them."
    )
    pos_int, pos_float = _at_least(int, 0, strict=True), _at_least(float, 0.0, strict=True)
    nn_int, nn_float = _at_least(int, 0, strict=False), _at_least(float, 0.0, strict=False)
    target = parser.add_argument_group("target (without --compare)")
    target.add_argument(
        "--url",
        default="ws://127.0.0.1:8080/v1/responses",
        help="the WebSocket endpoint (default ws://127.0.0.1:8080/v1/responses)",
    )
    target.add_argument(
        "--key",
        default=os.environ.get("GATEWAY_BENCH_KEY"),
        help="gateway key (or $GATEWAY_BENCH_KEY)",
    )
    target.add_argument(
        "--gateway-pid",
        type=pos_int,
        metavar="PID",
        help="the gateway's process on this host: CPU per 1,000 events and RSS per idle socket",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--model", default=DEFAULT_MODEL, help=f"(default {DEFAULT_MODEL})")
    load.add_argument("--sockets", type=pos_int, default=200, help="paced sockets (default 200)")
    load.add_argument("--turns", type=pos_int, default=2, help="turns per socket (default 2)")
    load.add_argument("--deltas", type=pos_int, default=20, help="deltas per turn (default 20)")
    load.add_argument(
        "--gap-ms", type=nn_float, default=50.0, help="simulator's pause before each delta (50)"
    )
    load.add_argument(
        "--concurrency", type=pos_int, default=64, help="handshakes in flight at once (64)"
    )
    load.add_argument(
        "--handshakes", type=nn_int, default=1000, help="sockets opened for the rate (1000)"
    )
    load.add_argument(
        "--idle-sockets", type=nn_int, default=1000, help="idle sockets for the RSS figure (1000)"
    )
    load.add_argument(
        "--timeout",
        type=pos_float,
        default=60.0,
        help="seconds a turn may take (60)",
    )
    cmp = parser.add_argument_group("--compare")
    cmp.add_argument(
        "--compare",
        action="store_true",
        help="start a simulator, a bare relay and a gateway; run the load on each, alternating",
    )
    cmp.add_argument("--rounds", type=pos_int, default=5, help="alternating rounds (5)")
    cmp.add_argument(
        "--saturate-sockets", type=pos_int, default=50, help="sockets of the saturated load (50)"
    )
    cmp.add_argument(
        "--saturate-turns", type=pos_int, default=10, help="turns per socket, saturated (10)"
    )
    cmp.add_argument(
        "--saturate-deltas", type=pos_int, default=100, help="deltas per turn, saturated (100)"
    )
    cmp.add_argument(
        "--handshake-delay-ms",
        type=nn_float,
        default=150.0,
        help="simulated upstream handshake for the first-turn figure (150)",
    )
    cmp.add_argument("--first-turns", type=nn_int, default=10, help="new sockets per target (10)")
    cmp.add_argument(
        "--first-turn-pause-ms", type=nn_float, default=300.0, help="pause between them (300)"
    )
    cmp.add_argument(
        "--pool-warmup-s",
        type=nn_float,
        default=1.0,
        help="wait after the first-turn gateway starts, for a warm pool to fill (1.0)",
    )
    cmp.add_argument(
        "--events-per-turn",
        type=_events_list,
        default=(1, 20, 50, 108),
        metavar="E[,E…]",
        help="turn lengths of the CPU-per-event phase, in events (1: the terminal event alone; "
        "else 9 and more); default 1,20,50,108; none: skip the phase",
    )
    cmp.add_argument(
        "--agent-request-kb",
        dest="request_kb",
        type=nn_int,
        default=0,
        metavar="KB",
        help="the turn-length phase's requests carry instructions and tools of about KB KiB, "
        "as an agent's do (the upstream echoes both in response.created and the terminal "
        "event); default 0: none",
    )
    cmp.add_argument(
        "--shape-rounds",
        type=pos_int,
        default=3,
        help="rounds of the turn-length and SSE phases (3)",
    )
    cmp.add_argument(
        "--shape-events",
        type=pos_int,
        default=54_000,
        help="events per target and round for each turn length (54000)",
    )
    cmp.add_argument(
        "--shape-max-turns",
        type=pos_int,
        default=3_000,
        help="turns per target and round for each turn length, at most (3000)",
    )
    cmp.add_argument(
        "--burst",
        type=nn_int,
        default=200,
        help="sockets connecting at once, each sending its first turn at once (200; 0: skip)",
    )
    cmp.add_argument("--burst-rounds", type=pos_int, default=3, help="bursts per target (3)")
    cmp.add_argument(
        "--workers",
        type=pos_int,
        default=2,
        help="also run a `gateway serve --workers N` against the one-worker gateway (2; 1: skip)",
    )
    cmp.add_argument(
        "--no-sse",
        dest="sse",
        action="store_false",
        help="skip POST /v1/responses with stream: true against the bare HTTP relay",
    )
    cmp.add_argument(
        "--no-relay-loops",
        dest="relay_loops",
        action="store_false",
        help="run the turn-length phase's relay on the gateway's event loop only",
    )
    cmp.add_argument(
        "--gateway-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateways started (repeatable; default "
        "GATEWAY_UPSTREAM_POOL_SIZE=2, for the first-turn figure)",
    )
    cmp.add_argument(
        "--team-limits",
        choices=TEAM_LIMITS,
        default="all",
        help="the bench team's limits, set too high to bite: all (socket caps, responses and "
        "tokens per minute, spend budgets; default), rate (socket caps and responses per "
        "minute), none",
    )
    cmp.add_argument(
        "--no-team-limits",
        dest="team_limits",
        action="store_const",
        const="none",
        help="the same as --team-limits none",
    )
    cmp.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after measuring, profile the gateway with py-spy under load (collapsed stacks "
        "into FILE) and print its top costs",
    )
    cmp.add_argument(
        "--profile-target",
        choices=("gateway", "relay"),
        default="gateway",
        help="the process --profile samples (default gateway)",
    )
    cmp.add_argument(
        "--profile-load",
        choices=("saturated", "paced", "handshakes", "turns", "burst", "sse"),
        default="saturated",
        help="the load run while --profile samples (default saturated; turns: turns of the "
        "first --events-per-turn length, 1 by default, saturated; burst: --burst new sockets "
        "at once, each with its first turn; sse: streamed POSTs, saturated; needs the SSE "
        "phase's relay, so not with --no-sse)",
    )
    cmp.add_argument(
        "--profile-seconds", type=pos_float, default=10.0, help="how long py-spy samples (10)"
    )
    cmp.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="keep the processes' logs here (default: a temporary directory, removed)",
    )


def plan_from_args(args: argparse.Namespace) -> Plan:
    return Plan(
        model=args.model,
        sockets=args.sockets,
        turns=args.turns,
        deltas=args.deltas,
        gap_ms=args.gap_ms,
        concurrency=args.concurrency,
        handshakes=args.handshakes,
        idle_sockets=args.idle_sockets,
        timeout=args.timeout,
        rounds=args.rounds,
        saturate_sockets=args.saturate_sockets,
        saturate_turns=args.saturate_turns,
        saturate_deltas=args.saturate_deltas,
        handshake_delay_ms=args.handshake_delay_ms,
        first_turns=args.first_turns,
        first_turn_pause_ms=args.first_turn_pause_ms,
        pool_warmup_s=args.pool_warmup_s,
        events_per_turn=args.events_per_turn,
        shape_rounds=args.shape_rounds,
        shape_events=args.shape_events,
        shape_max_turns=args.shape_max_turns,
        burst=args.burst,
        burst_rounds=args.burst_rounds,
        workers=args.workers,
        sse=args.sse,
        relay_loops=args.relay_loops,
        request_kb=args.request_kb,
    )


def run_bench(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    try:
        if args.compare:
            from app.bench.compare import CompareOptions, compare

            options = CompareOptions(
                gateway_env=dict(args.gateway_env),
                team_limits=args.team_limits,
                profile=args.profile,
                profile_target=args.profile_target,
                profile_load=args.profile_load,
                profile_seconds=args.profile_seconds,
                workdir=args.workdir,
            )
            # The client on the fastest loop there is: its CPU is taken from the targets'
            # host (2 cores here), the less the better for every target.
            eventloop.run(compare(plan, options))
        else:
            from app.bench.single import bench_one

            if not args.key:
                print("gateway bench: --key (or $GATEWAY_BENCH_KEY) is required", file=sys.stderr)
                return 2
            eventloop.run(bench_one(plan, args.url, args.key, args.gateway_pid))
    except BenchError as exc:
        print(f"gateway bench: {exc}", file=sys.stderr)
        return 1
    return 0
