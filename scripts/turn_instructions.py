"""Instructions a turn costs the gateway and the bare relay, counted by valgrind's callgrind.

    .venv/bin/python scripts/turn_instructions.py [--sockets 2] [--turns 150] [--events 1]
                                                  [--target both|gateway|relay] [--runs 1]
                                                  [--keep DIR]

CPU seconds per turn (`gateway bench --compare`) move by 10-30% between runs of the same code on
a shared 2-core host; a change of a few percent does not show through that. Instructions do:
callgrind counts the user-space instructions a process runs, the same count for the same work
whatever else the host does. This starts what the bench starts (app/bench/stack.py: throwaway
Redis key prefix and database, the bench team with its budgets and rate limits, a price, a key;
the simulator, unmeasured), then the relay and the gateway each under
`valgrind --tool=callgrind --instr-atstart=no`. For each it opens --sockets sockets, runs 20
turns on each to warm up, switches instrumentation on (`callgrind_control -i on`), runs --turns
turns on each socket (the sockets at once, each one turn after another), waits 0.5 s for the
turns' tails (ledger rows, spend counts), switches it off and reads the count.

What it leaves out: the kernel's work (the syscalls' own cost, the TCP stack), and the time
spent waiting. A process under valgrind runs about 50x slower, so what depends on timing
(how many calls share a Redis batch or a ledger write) differs from a run at full speed: with
two sockets the batches hold one or two calls, the worst case for the gateway. Compare counts
of two versions of the code from runs with the same arguments; repeated runs of the same code
agree to within a few percent (the log writer thread and the ledger's timer run when they
run). Needs valgrind (Debian's package); not a test: figures, no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp

from app.bench.load import BenchError, Shape, Target, client_session, connect, run_turn
from app.bench.stack import (
    _GATEWAY_READY,
    _RELAY_READY,
    _SIM_READY,
    Child,
    _gateway_env,
    _python,
    bed,
    spawn,
)

MODEL = "openai/gpt-5-mini"
WARM_TURNS = 20
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)


def _callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=60)


async def _count(
    child: Child,
    target: Target,
    out: Path,
    sockets: int,
    turns: int,
    frame: str,
    keep: Path | None = None,
) -> int:
    """Instructions `child` ran for `sockets` x `turns` turns."""
    pid = str(child.pid)
    async with client_session() as http:
        opened = [await connect(http, target) for _ in range(sockets)]
        try:
            for _ in range(WARM_TURNS):
                await asyncio.gather(*(run_turn(ws, frame, None, timeout=60) for ws in opened))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(_control, "-z", pid)
            await asyncio.to_thread(_control, "-i", "on", pid)

            async def many(ws: aiohttp.ClientWebSocketResponse) -> None:
                for _ in range(turns):
                    await run_turn(ws, frame, None, timeout=60)

            await asyncio.gather(*(many(ws) for ws in opened))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_control, "-i", "off", pid)
            await asyncio.to_thread(_control, "-d", pid)
        finally:
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
    total = 0
    for dump in out.parent.glob(f"{out.name}.*"):  # the dump `-d` wrote: out.<n>
        found = _TOTALS.search(dump.read_text(errors="replace"))
        total += int(found.group(1)) if found else 0
        if keep is not None:
            await asyncio.to_thread(_keep, dump, keep)
    return total


def _keep(dump: Path, keep: Path) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(dump, keep / dump.name)


async def _run(args: argparse.Namespace) -> None:
    frame = Shape.of_events(MODEL, args.events).frame()
    async with bed(MODEL, limits="all", gateway_env={}) as b:
        sim_argv = _python("-m", "app", "simulate", "--port", "0")
        sim = await spawn("simulator", sim_argv, env=_env(), workdir=b.workdir, ready=_SIM_READY)
        b.exits.push_async_callback(sim.stop)
        names = ["relay", "gateway"] if args.target == "both" else [args.target]
        counts: dict[str, list[float]] = {name: [] for name in names}
        for run in range(args.runs):
            for name in names:
                out = b.workdir / f"callgrind-{name}-{run}"
                if name == "relay":
                    argv = _python("-m", "app.bench.relay", "--port", "0")
                    argv += ["--upstream", f"ws://{sim.address}/v1/responses"]
                    env, ready = _env(), _RELAY_READY
                else:
                    argv = _python("-m", "app", "serve")
                    env, ready = _gateway_env(b, f"http://{sim.address}/v1", name), _GATEWAY_READY
                child = await spawn(
                    f"{name}-{run}", _callgrind(out) + argv, env=env, workdir=b.workdir, ready=ready
                )
                try:
                    url = child.address
                    if name == "gateway":
                        url = f"ws://{child.address}/v1/responses"
                    target = Target(name, url, b.key, child.pid)
                    total = await _count(
                        child, target, out, args.sockets, args.turns, frame, args.keep
                    )
                finally:
                    await child.stop()
                per_turn = total / (args.sockets * args.turns)
                counts[name].append(per_turn)
                print(
                    f"{name:8} run {run + 1}: {total:,} instructions, "
                    f"{per_turn:,.0f} a turn ({args.sockets} sockets x {args.turns} turns, "
                    f"{args.events} event{'s' if args.events > 1 else ''} a turn)",
                    flush=True,
                )
        if len(names) == 2:
            relay, gateway = (sum(counts[n]) / len(counts[n]) for n in names)
            print(
                f"gateway/relay = {gateway / relay:.2f}x; gateway - relay = "
                f"{gateway - relay:,.0f} instructions a turn (means of {args.runs} run(s))"
            )


def _env() -> dict[str, str]:
    return dict(os.environ)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=2)
    parser.add_argument("--turns", type=int, default=150, help="turns per socket, measured")
    parser.add_argument("--events", type=int, default=1, help="events a turn: 1, or 9 and more")
    parser.add_argument("--target", choices=("both", "gateway", "relay"), default="both")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="copy callgrind's dumps there (for callgrind_annotate --inclusive=yes)",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("turn_instructions: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run(args))
    except BenchError as exc:
        print(f"turn_instructions: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
