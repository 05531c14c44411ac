"""The `gateway` console script: serve, simulate, migrate (and the admin commands)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from app.config import ConfigError, DatabaseSettings, Settings, load


def _parser() -> argparse.ArgumentParser:
    from app.simulator import add_simulate_arguments

    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes sharing the port, with one /metrics across them (default 1)",
    )
    # Set by the parent of `--workers N` for each worker it starts (app/supervisor.py).
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--places-file", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


async def _serve(settings: Settings, args: argparse.Namespace) -> None:
    """One server process: listen, serve until SIGTERM/SIGINT, drain (CONTRACT.md §6), exit."""
    from aiohttp import web

    from app import eventloop, metrics
    from app.listener import GatewayRunner
    from app.node import NODE
    from app.server import create_app, drain

    worker = bool(args.reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start-up: a stop then still drains
        loop.add_signal_handler(sig, stop.set)
    places = None
    if args.places_file is not None:
        from app.places import SharedPlaces

        places = SharedPlaces(settings.max_sockets, args.places_file, args.worker_index)
    app = create_app(settings, places)
    runner = GatewayRunner(
        app, handshake_seconds=settings.handshake_seconds, handle_signals=False, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=worker or None)
    await site.start()
    eventloop.freeze_startup()
    background: list[asyncio.Task[None]] = []
    if metrics.MULTIPROC_DIR is not None:
        background.append(asyncio.create_task(_sample_process(), name="process-metrics"))
    if worker:
        background.append(asyncio.create_task(_watch_parent(stop), name="watch-parent"))
        if args.ready_fd is not None:
            _tell_ready(args.ready_fd)
    else:
        sockets = getattr(site._server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else settings.port
        print(f"gateway listening on http://{settings.host}:{port}", flush=True)
    await stop.wait()
    started = loop.time()
    # The site keeps listening through the drain: new handshakes and POSTs get 503, not a reset.
    await drain(app[NODE], settings.drain_seconds)
    # Handlers still running (a POST streaming its response, a client that never answers its
    # close frame) get what is left of the deadline, at least 2 s, before the cleanup cancels
    # them; aiohttp reads this attribute there.
    runner._shutdown_timeout = max(settings.drain_seconds - (loop.time() - started), 2.0)
    for task in background:
        task.cancel()
    await runner.cleanup()


async def _watch_parent(stop: asyncio.Event) -> None:
    """A worker whose parent died (SIGKILL, OOM) drains and exits instead of serving alone."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            stop.set()
            return


async def _sample_process() -> None:
    from app import metrics

    while True:
        metrics.sample_process()
        await asyncio.sleep(5.0)


def _tell_ready(fd: int) -> None:
    try:
        os.write(fd, b"1")
    except OSError:
        pass  # the parent stopped waiting: it logs why
    finally:
        os.close(fd)


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
            if args.workers > 1:
                from app.supervisor import run_workers

                return run_workers(settings, args.workers)
            from app import eventloop

            eventloop.run(_serve(settings, args), settings.event_loop)
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
