"""The ledger's cost on a customer's turn: the same turns with the ledger on and off.

    python scripts/bench_turn_ledger.py [--turns N] [--rounds R]

Runs the simulator and a gateway in this process (real sockets on loopback, the Redis at
REDIS_URL under a fresh prefix, a throwaway database on DATABASE_URL's server), then times N
sequential turns on one socket (send to `response.completed`), alternating rounds with the
ledger recording and with `record()` replaced by a no-op. Prints p50/p99 per mode and the
difference. Not a test: figures, no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
import urllib.parse
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings
from app.ledger import migrate
from app.models import Price, Team
from app.node import NODE
from app.server import create_app
from app.simulator import SimulatorOptions, create_simulator_app

MODEL = "openai/gpt-bench"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def time_turns(url: str, key: str, turns: int) -> list[float]:
    frame = orjson.dumps(
        {"type": "response.create", "model": MODEL, "input": [{"role": "user", "content": "hi"}]}
    ).decode()
    times = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {key}"}) as ws:
            for _ in range(turns):
                start = time.perf_counter()
                await ws.send_str(frame)
                while True:
                    msg = await ws.receive()
                    if '"response.completed"' in msg.data[:40] or '"error"' in msg.data[:20]:
                        break
                times.append((time.perf_counter() - start) * 1000)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    base = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/gateway")
    parts = urllib.parse.urlsplit(base)
    name = "gwbench_" + secrets.token_hex(6)
    db = urllib.parse.urlunsplit(parts._replace(path="/" + name))
    admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    await migrate(db)
    sim = TestServer(create_simulator_app(SimulatorOptions()))
    await sim.start_server()
    prefix = "gwbench:" + secrets.token_hex(6)
    env: dict[str, Any] = {
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "GATEWAY_REDIS_PREFIX": prefix,
        "DATABASE_URL": db,
        "OPENAI_BASE_URL": str(sim.make_url("/v1")),
        "OPENAI_API_KEY": "sk-bench",
        "GATEWAY_ENV": "dev",
        "GATEWAY_SPILL_DIR": f"/tmp/{name}",
    }
    settings = Settings(**env)
    app = create_app(settings)
    gw = TestServer(app)
    await gw.start_server()
    node = app[NODE]
    await node.store.put_team(Team(id="bench", allowed_models=[MODEL]))
    await node.store.set_price(MODEL, Price(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)))
    _, key = await node.store.create_key("bench")
    url = str(gw.make_url("/v1/responses"))
    record = node.ledger.record

    def off(row: Any) -> None:
        return None

    results: dict[str, list[float]] = {"on": [], "off": []}
    await time_turns(url, key, 50)  # warm up
    for i in range(args.rounds):
        mode = "on" if i % 2 == 0 else "off"
        node.ledger.record = record if mode == "on" else off  # type: ignore[method-assign]
        results[mode] += await time_turns(url, key, args.turns)
    node.ledger.record = record  # type: ignore[method-assign]
    await node.ledger.flushed(30)
    print(f"{args.rounds // 2} rounds x {args.turns} turns per mode, one socket, sequential")
    for mode, values in results.items():
        print(
            f"ledger {mode:3}: turn p50 {pct(values, 0.5):.3f} ms  p99 {pct(values, 0.99):.3f} ms"
            f"  mean {statistics.fmean(values):.3f} ms"
        )
    diff = statistics.median(results["on"]) - statistics.median(results["off"])
    print(f"added by the ledger (p50 on - off): {diff * 1000:+.1f} µs")
    await gw.close()
    await sim.close()
    await node.store.redis.delete(*(await node.store.redis.keys(prefix + ":*")) or ["-"])
    conn = await asyncpg.connect(admin)
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
