"""`gateway serve --workers N`: one parent process, N worker processes sharing the port.

The parent
- binds the port once (SO_REUSEPORT, never listening: it takes no connection) so `GATEWAY_PORT=0`
  resolves to one port for all and a port already in use fails the start with one line;
- makes a fresh `PROMETHEUS_MULTIPROC_DIR` and starts each worker as a new interpreter with it in
  the environment, so prometheus-client keeps every value in a file there from its first import
  (a fork would inherit values already made) and any worker's `/metrics` adds up all of them;
- prints `gateway listening on …` once every worker listens;
- forwards SIGTERM and SIGINT to the workers, which drain (CONTRACT.md §6) and exit; it exits 0
  when every worker exited 0;
- makes the file of the workers' socket counts (app/places.py), so `GATEWAY_MAX_SOCKETS` holds
  for the node, not for each worker;
- marks a dead worker's live gauges dead (`mark_process_dead`), zeroes its socket count, and
  starts a new one when it died on its own.

Each worker listens on the port with SO_REUSEPORT; the kernel spreads new connections over them.
While draining a worker keeps listening (its handshakes get 503); a worker that lost its parent
drains and exits too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType

from app.config import ConfigError, Settings
from app.places import clear_slot, create_slots

log = logging.getLogger("gateway.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the name prometheus-client reads
START_TIMEOUT_SECONDS = 60.0
RESTART_DELAY_SECONDS = 1.0
# Past this after the first SIGTERM the parent stops waiting: the workers have had their drain.
_STOP_GRACE_SECONDS = 30.0


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int | None  # read end of the pipe the worker writes one byte to once it listens
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False  # sent SIGTERM


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT: fixes the port without listening."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"GATEWAY_HOST: cannot resolve {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"GATEWAY_PORT: cannot bind {host}:{port} ({exc.strerror})") from None
    return sock


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.count = workers
        self.workers: dict[int, _Worker] = {}  # by index
        self.metrics_dir = ""
        self.places_file = ""
        self.port = settings.port
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_codes: dict[int, int] = {}

    # -- workers --------------------------------------------------------------------------------

    def _environment(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env[MULTIPROC_ENV] = self.metrics_dir
        env["GATEWAY_PORT"] = str(self.port)
        if self.settings.node_id:  # one node id per worker: each holds its own socket leases
            env["GATEWAY_NODE_ID"] = f"{self.settings.node_id}-w{index}"
        return env

    def _spawn(self, index: int, *, wait_ready: bool) -> _Worker:
        command = [sys.executable, "-m", "app", "serve", "--reuse-port"]
        command += ["--places-file", self.places_file, "--worker-index", str(index)]
        read_fd: int | None = None
        pass_fds: tuple[int, ...] = ()
        if wait_ready:
            read_fd, write_fd = os.pipe()
            command += ["--ready-fd", str(write_fd)]
            pass_fds = (write_fd,)
        proc = subprocess.Popen(command, env=self._environment(index), pass_fds=pass_fds)
        for fd in pass_fds:
            os.close(fd)
        log.info("worker started", extra={"worker": index, "worker_pid": proc.pid})
        worker = _Worker(index, proc, read_fd)
        self.workers[index] = worker
        return worker

    def _wait_ready(self) -> bool:
        """True once every worker listens; False when one exits first or time runs out."""
        waiting = {w.ready_fd: w for w in self.workers.values() if w.ready_fd is not None}
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while waiting and not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("workers did not start in %.0f s", START_TIMEOUT_SECONDS)
                return False
            try:
                readable, _, _ = select.select(list(waiting), [], [], min(remaining, 0.5))
            except InterruptedError:
                continue
            for fd in readable:
                worker = waiting.pop(fd)
                got = os.read(fd, 1)
                os.close(fd)
                worker.ready_fd = None
                if not got:  # EOF: the worker exited before listening
                    return False
        return not self.stopping

    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None:
                continue
            del self.workers[index]
            self._mark_dead(worker.proc.pid)
            clear_slot(self.places_file, index)  # its sockets died with it
            if self.stopping:
                if code == -signal.SIGTERM:
                    # Killed by the stop's SIGTERM: it came before the worker set up its drain,
                    # which it does before it listens, so it had nothing to drain.
                    code = 0
                self.exit_codes[index] = code
                log.info("worker exited", extra={"worker": index, "exit_code": code})
                continue
            log.error("worker died; starting another", extra={"worker": index, "exit_code": code})
            delay = RESTART_DELAY_SECONDS - (time.monotonic() - worker.started)
            if delay > 0:
                time.sleep(delay)  # a worker that dies at once must not spin the parent
            if not self.stopping:
                self._spawn(index, wait_ready=False)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    # -- signals --------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = (
                time.monotonic() + self.settings.drain_seconds + _STOP_GRACE_SECONDS
            )
        self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in list(self.workers.values()):
            if not worker.stopped:
                worker.stopped = True
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        for worker in self.workers.values():
            worker.proc.wait()

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        reserved = reserve_port(self.settings.host, self.settings.port)
        self.port = reserved.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        # Not a *.db file: prometheus-client reads only those in its directory.
        self.places_file = os.path.join(self.metrics_dir, "socket-places")
        create_slots(self.places_file, self.count)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for index in range(self.count):
                self._spawn(index, wait_ready=True)
            if not self._wait_ready():
                if not self.stopping:
                    self._on_signal(signal.SIGTERM, None)
                    self.exit_codes[-1] = 1
            else:
                print(
                    f"gateway listening on http://{self.settings.host}:{self.port}"
                    f" ({self.count} workers)",
                    flush=True,
                )
            return self._supervise()
        finally:
            self._kill_all()
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        while self.workers:
            self._reap()
            if self.stopping:
                self._stop_workers()  # one started while the signal was being handled
            if self.stopping and time.monotonic() > self.stop_deadline:
                log.error("workers still running past the drain; killing them")
                self._kill_all()
                return 1
            time.sleep(0.1)
        failed = {i: c for i, c in self.exit_codes.items() if c != 0}
        if failed:
            log.error("exiting 1: worker exit codes %s", failed)
            return 1
        return 0


def run_workers(settings: Settings, workers: int) -> int:
    return Supervisor(settings, workers).run()
