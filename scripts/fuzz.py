"""The long fuzz run: hostile frames at one real socket, for N frames or S seconds.

    .venv/bin/python scripts/fuzz.py [--frames N] [--seconds S] [--seed N]
    .venv/bin/python scripts/fuzz.py --url ws://HOST:PORT/v1/responses --key sk-gw-…

The frames, the judging and the socket are those of `tests/test_fuzz.py` (its docstring says how
one frame is judged), here with oversized and deflate-compressed frames mixed in. Without `--url`
it runs the simulator and a gateway in this process (the Redis and Postgres the tests use, under
a fresh key prefix and a throwaway database, removed afterwards) and also checks the node's side:
the session is idle after each answer and gone after each close, no exception reaches the event
loop, no ERROR line is logged. With `--url` the key's team must route `openai/gpt-test` and
`openai/gpt-other`, and `--limit` must be the gateway's `GATEWAY_MAX_FRAME_BYTES`.

Prints how many frames it tried, how many of each outcome and generator, and every failure;
exits 1 when a frame broke a promise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from aiohttp import web  # noqa: E402
from conftest import gateway_settings, make_tenant  # noqa: E402
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings  # noqa: E402
from services import (  # noqa: E402
    delete_prefix,
    fresh_database_async,
    fresh_redis_prefix,
    postgres_dsn,
    redis_url,
)
from test_fuzz import LIMIT, Check, Frame, Prober, Watch, frames, judge  # noqa: E402

from app.ledger import migrate  # noqa: E402
from app.node import NODE, Node  # noqa: E402
from app.server import create_app  # noqa: E402
from app.session import Session, State  # noqa: E402
from app.simulator import SimulatorOptions, create_simulator_app  # noqa: E402


@dataclass
class Stack:
    """A simulator and a gateway in this process, and a tenant's key."""

    url: str  # the gateway's base, http://127.0.0.1:PORT
    key: str
    node: Node
    database_url: str
    sim_url: str
    spill_dir: Path


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@asynccontextmanager
async def in_process_stack(
    sim_options: SimulatorOptions | None = None, **overrides: Any
) -> AsyncIterator[Stack]:
    """Simulator + gateway on loopback ports; Redis prefix and database removed afterwards."""
    redis, admin_dsn = redis_url(), postgres_dsn()
    database_url, drop = await fresh_database_async(admin_dsn)
    prefix = fresh_redis_prefix()
    runners: list[web.AppRunner] = []
    spill_root = tempfile.TemporaryDirectory(prefix="gw-spill-")
    spill = Path(spill_root.name)
    try:
        await migrate(database_url)
        sim_runner, sim_base = await _serve(create_simulator_app(sim_options or SimulatorOptions()))
        runners.append(sim_runner)
        settings = gateway_settings(
            redis, prefix, database_url, sim_base + "/v1", spill, **overrides
        )
        app = create_app(settings)
        gw_runner, base = await _serve(app)
        runners.append(gw_runner)
        tenant = await make_tenant(app[NODE].store)
        yield Stack(base, tenant.key, app[NODE], database_url, sim_base, spill)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await delete_prefix(redis, prefix)
        await drop()
        spill_root.cleanup()


def node_checks(node: Node) -> tuple[Check, Check]:
    """The node's side of a probe (one socket open at a time): idle after an answer, gone after
    a close. The same as `test_fuzz.node_checks`, on a `Node` instead of a test fixture."""

    async def wait(ok: Any, describe: Any) -> str | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        while not ok():
            if loop.time() > end:
                return str(describe())
            await asyncio.sleep(0.01)
        return None

    def idle() -> bool:
        sessions = list(node.sessions)
        return len(sessions) == 1 and all(
            s.state is State.IDLE and isinstance(s, Session) and s.turn is None for s in sessions
        )

    async def idle_check() -> str | None:
        return await wait(
            idle,
            lambda: (
                "the node's sessions are not one idle session: "
                + str(
                    [(s.state.value, getattr(s, "turn", None) is not None) for s in node.sessions]
                )
            ),
        )

    async def gone_check() -> str | None:
        return await wait(
            lambda: not node.sessions,
            lambda: f"{len(node.sessions)} session(s) left after the socket closed",
        )

    return idle_check, gone_check


@dataclass
class Tally:
    frames: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    generators: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    valid_turns: int = 0
    deflate_frames: int = 0


class _Stop(Exception):
    """Raised inside the hypothesis example when the run is over."""


def _generator(frame: Frame) -> str:
    return frame.note.partition(":")[0]


async def _one(prober: Prober, watch: Watch, frame: Frame, limit: int, tally: Tally) -> None:
    outcome = await prober.probe(frame)
    tally.frames += 1
    tally.deflate_frames += prober.compress
    tally.outcomes[outcome.kind] += 1
    tally.generators[_generator(frame)] += 1
    problems = judge(frame, outcome, limit)
    if tally.frames % 50 == 0 and not problems:
        problems = [f"valid turn after it: {p}" for p in await prober.valid_turn()]
        tally.valid_turns += 1
        prober.compress = not prober.compress  # the next frame opens a socket with deflate
        await prober.reset()
    problems += watch.take(collect=tally.frames % 500 == 0)
    for problem in problems:
        tally.failures.append(f"{frame!r} -> {outcome.kind}: {problem}")


def generate(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Frame | None], args: argparse.Namespace
) -> None:
    """Hypothesis generates in this thread, a few frames ahead of the prober on the loop."""
    end = time.monotonic() + args.seconds if args.seconds else None
    strategy = frames(args.limit, oversized=True)
    sent = 0

    @seed(args.seed)
    @settings(
        max_examples=args.frames or 10**9,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
    )
    @given(frame=strategy)
    def one(frame: Frame) -> None:
        nonlocal sent
        if (end is not None and time.monotonic() > end) or (args.frames and sent >= args.frames):
            raise _Stop
        asyncio.run_coroutine_threadsafe(queue.put(frame), loop).result()
        sent += 1

    try:
        one()
    except _Stop:
        pass
    except BaseExceptionGroup as group:
        if not group.subgroup(_Stop):
            raise
    finally:
        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()


async def consume(
    queue: asyncio.Queue[Frame | None], prober: Prober, watch: Watch, limit: int, tally: Tally
) -> None:
    while (frame := await queue.get()) is not None:
        await _one(prober, watch, frame, limit, tally)


async def drive(prober: Prober, watch: Watch, args: argparse.Namespace, tally: Tally) -> None:
    queue: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=16)
    loop = asyncio.get_running_loop()
    producer = asyncio.create_task(asyncio.to_thread(generate, loop, queue, args))
    await consume(queue, prober, watch, args.limit, tally)
    await producer
    await prober.close()


async def run(args: argparse.Namespace) -> Tally:
    tally = Tally()
    watch = Watch()
    watch.install(asyncio.get_running_loop())
    started = time.monotonic()
    try:
        if args.url:
            prober = Prober(args.url, args.key)
            where = args.url
            await drive(prober, watch, args, tally)
        else:
            async with in_process_stack(GATEWAY_MAX_FRAME_BYTES=args.limit) as stack:
                idle, gone = node_checks(stack.node)
                prober = Prober(
                    stack.url + "/v1/responses", stack.key, idle_check=idle, gone_check=gone
                )
                where = "an in-process gateway"
                await drive(prober, watch, args, tally)
                tally.failures += watch.take(collect=True)
    finally:
        watch.uninstall()
    report(tally, args, where, time.monotonic() - started, prober.connects)
    return tally


def report(tally: Tally, args: argparse.Namespace, where: str, took: float, connects: int) -> None:
    rate = tally.frames / took if took else 0.0
    print(
        f"fuzz: {tally.frames} frames in {took:.1f} s ({rate:.0f}/s) against {where}, "
        f"limit {args.limit} B, seed {args.seed}"
    )
    print(
        f"sockets opened: {connects}; frames over deflate sockets: {tally.deflate_frames}; "
        f"valid turns checked between batches: {tally.valid_turns}"
    )
    print("outcomes:")
    for kind, count in tally.outcomes.most_common():
        print(f"  {count:7d}  {kind}")
    print("generators:")
    for name, count in tally.generators.most_common():
        print(f"  {count:7d}  {name}")
    print(f"failures: {len(tally.failures)}")
    for failure in tally.failures[: args.show]:
        print("  " + failure[:2000])
    if len(tally.failures) > args.show:
        print(f"  … and {len(tally.failures) - args.show} more")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=0, help="stop after N frames")
    parser.add_argument("--seconds", type=float, default=0, help="stop after S seconds")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--limit", type=int, default=LIMIT, help="GATEWAY_MAX_FRAME_BYTES")
    parser.add_argument("--url", help="a running gateway's WebSocket URL (default: in-process)")
    parser.add_argument("--key", help="a gateway key for --url")
    parser.add_argument("--show", type=int, default=20, help="failures printed in full")
    args = parser.parse_args()
    if not args.frames and not args.seconds:
        args.frames = 2000
    if args.url and not args.key:
        parser.error("--url needs --key")
    threading.current_thread().name = "fuzz"
    tally = asyncio.run(run(args))
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
