"""The `gateway` console script: serve, simulate, migrate (and the admin commands)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from app.config import ConfigError, DatabaseSettings, Settings, load


def _parser() -> argparse.ArgumentParser:
    from app.simulator import add_simulate_arguments

    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the HTTP/WebSocket server")
    sim = sub.add_parser("simulate", help="run the bundled upstream simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8081)
    add_simulate_arguments(sim)
    sub.add_parser("migrate", help="apply migrations/ to DATABASE_URL")
    from app.bench.cli import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="load-test a gateway (gateway bench --help)"))
    from app.admin.cli import add_admin_commands

    add_admin_commands(sub)
    return parser


async def _serve(settings: Settings) -> None:
    from aiohttp import web

    from app.node import NODE
    from app.server import create_app, drain

    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.port
    print(f"gateway listening on http://{settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain(app[NODE], settings.drain_seconds)
    await runner.cleanup()


def _admin(args: argparse.Namespace) -> int | None:
    from app.admin.cli import run_admin_command

    code: int | None = run_admin_command(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from app import logs

            settings = load(Settings)
            settings.check_serve()
            logs.setup(settings.log_level)
            asyncio.run(_serve(settings))
        elif args.command == "simulate":
            from app.simulator import options_from_args, run_simulator

            asyncio.run(run_simulator(args.host, args.port, options_from_args(args)))
        elif (code := _admin(args)) is not None:
            return code
        elif args.command == "bench":
            from app.bench.cli import run_bench

            return run_bench(args)
        elif args.command == "migrate":
            from app.ledger import MigrationError
            from app.ledger.migrate import migrate

            db = load(DatabaseSettings)
            try:
                applied = asyncio.run(migrate(db.database_url))
            except MigrationError as exc:
                print(f"gateway migrate: {exc}", file=sys.stderr)
                return 1
            print(f"migrations applied: {len(applied)}" + "".join(f"\n  {m}" for m in applied))
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
