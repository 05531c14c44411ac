"""Redis and PostgreSQL for the test suite.

Where they come from, in order:

- Redis: ``TEST_REDIS_URL`` if set; else the server at ``TEST_PROBE_REDIS`` (default
  ``127.0.0.1:6379``) if it answers PING without a password; else a throwaway ``redis-server``
  started by this module on a free port.
- PostgreSQL (an *admin* DSN: a server where we may CREATE/DROP databases): ``TEST_DATABASE_URL``
  if set; else the server at ``TEST_PROBE_POSTGRES`` (default ``127.0.0.1:5432``) if user
  ``postgres`` gets in without a password; else a throwaway cluster (initdb + postgres) on a free
  port in a temp dir.

Tests never touch data they did not create: each test run gets its own database
(``gwtest_<hex>``, see :func:`fresh_database`) and its own Redis key prefix (``gwtest:<hex>``, see
:func:`fresh_redis_prefix` and :func:`delete_prefix`).

Throwaway servers are stopped and their directories removed at interpreter exit (atexit), and
by a small watchdog process if the interpreter dies without running atexit (SIGKILL, crash).

A conftest uses it like this::

    import pytest
    from services import (  # or `from tests.services import …` if tests/ is a package
        fresh_database, fresh_redis_prefix, delete_prefix, run_blocking,
        session_postgres_admin_dsn, session_redis_url,
    )

    redis_url = pytest.fixture(scope="session")(session_redis_url)
    pg_admin_dsn = pytest.fixture(scope="session")(session_postgres_admin_dsn)

    @pytest.fixture
    def database_url(pg_admin_dsn: str) -> Iterator[str]:
        dsn, drop = fresh_database(pg_admin_dsn)
        yield dsn
        drop()

    @pytest.fixture
    def redis_prefix(redis_url: str) -> Iterator[str]:
        prefix = fresh_redis_prefix()
        yield prefix
        run_blocking(delete_prefix(redis_url, prefix))
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

REDIS_PREFIX_ROOT = "gwtest:"
DATABASE_PREFIX = "gwtest_"
_DATABASE_NAME_RE = re.compile(r"^gwtest_[0-9a-f]+$")

DEFAULT_REDIS_PROBE = "127.0.0.1:6379"
DEFAULT_POSTGRES_PROBE = "127.0.0.1:5432"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class ServiceError(RuntimeError):
    """A throwaway server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# Probes (plain sockets: usable before any event loop exists)


def _split_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        return value.strip() or "127.0.0.1", default_port
    return host.strip("[]") or "127.0.0.1", int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def redis_answers(host: str = "127.0.0.1", port: int = 6379, timeout: float = 1.0) -> bool:
    """True if a Redis server at host:port answers PING without asking for a password."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return _recv_exact(sock, 5) == b"+PONG"
    except (OSError, ConnectionError):
        return False


def postgres_answers(
    host: str = "127.0.0.1",
    port: int = 5432,
    user: str = "postgres",
    database: str = "postgres",
    timeout: float = 2.0,
) -> bool:
    """True if PostgreSQL at host:port lets `user` into `database` without a password.

    Speaks just enough of the v3 protocol: StartupMessage, then expects AuthenticationOk and
    ReadyForQuery. A password request, an error ("starting up", unknown role…) or silence is False.
    """
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(startup)
            authenticated = False
            while True:
                kind, length = struct.unpack("!ci", _recv_exact(sock, 5))
                body = _recv_exact(sock, length - 4)
                if kind == b"R":
                    if struct.unpack("!i", body[:4])[0] != 0:
                        return False  # wants a password / SASL
                    authenticated = True
                elif kind == b"E":
                    return False
                elif kind == b"Z":
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X\0\0\0\4")  # Terminate
                    return authenticated
    except (OSError, ConnectionError, struct.error):
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Watchdog: stops our servers if this interpreter dies without running atexit.

_WATCHDOG_SOURCE = r"""
import os, shutil, signal, sys, time

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

pids, dirs = {}, set()
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "pid+":
        pid, sig = arg.split()
        pids[int(pid)] = int(sig)
    elif cmd == "pid-":
        pids.pop(int(arg), None)
    elif cmd == "dir+":
        dirs.add(arg)
    elif cmd == "dir-":
        dirs.discard(arg)
# EOF: the interpreter that started the servers is gone.
for pid, sig in pids.items():
    for s in (signal.SIGCONT, sig):
        try:
            os.kill(pid, s)
        except OSError:
            pass
deadline = time.monotonic() + 10
while time.monotonic() < deadline and any(alive(p) for p in pids):
    time.sleep(0.05)
for pid in pids:
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
time.sleep(0.2)
for d in dirs:
    shutil.rmtree(d, ignore_errors=True)
"""


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _WATCHDOG_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    start_new_session=True,  # Ctrl-C in the terminal must not kill it first
                )
            stdin = self._proc.stdin
            assert stdin is not None
            try:
                stdin.write(line + "\n")
                stdin.flush()
            except OSError:
                pass

    def watch_pid(self, pid: int, sig: int) -> None:
        self._send(f"pid+ {pid} {int(sig)}")

    def forget_pid(self, pid: int) -> None:
        self._send(f"pid- {pid}")

    def watch_dir(self, path: Path) -> None:
        self._send(f"dir+ {path}")

    def forget_dir(self, path: Path) -> None:
        self._send(f"dir- {path}")


_watchdog = _Watchdog()


# --------------------------------------------------------------------------------------------
# Throwaway servers

_live_servers: set[_Server] = set()
_live_lock = threading.Lock()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _world_traversable(path: Path) -> bool:
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


class _Server:
    """A server process on 127.0.0.1:port whose files live in a private temp dir.

    ``start()`` / ``stop()`` may be repeated; the port and the directory stay the same, so
    clients can reconnect after an outage. ``close()`` stops it and removes the directory.
    """

    kind = "server"
    stop_signal: int = signal.SIGTERM

    def __init__(self, port: int | None = None) -> None:
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.dir: Path = self._make_dir()
        _watchdog.watch_dir(self.dir)
        self.log_path: Path = self.dir / f"{self.kind}.log"
        self._closed = False
        self._started_once = False

    # -- to override
    def _make_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"gwtest-{self.kind}-"))

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_extra(self) -> dict[str, Any]:
        return {}

    def _answers(self) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Runs once before the first start (e.g. initdb)."""

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> Self:
        with self._lock:
            if self._closed:
                raise ServiceError(f"{self.kind} server was closed")
            if self.running:
                return self
            self._prepare()
            attempts = 1 if self._fixed_port or self._started_once else 3
            for attempt in range(attempts):
                try:
                    self._spawn_and_wait()
                    break
                except ServiceError:
                    if attempt == attempts - 1:
                        raise
                    self.port = free_port()  # lost a race for the port: try another one
            self._started_once = True
            with _live_lock:
                _live_servers.add(self)
            return self

    def _spawn_and_wait(self) -> None:
        self._log_file = open(self.log_path, "ab")  # kept open while running
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # keep terminal signals away; we stop it ourselves
            **self._popen_extra(),
        )
        _watchdog.watch_pid(self._proc.pid, self.stop_signal)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                raise ServiceError(
                    f"{self.kind} on port {self.port} exited at start:\n{tail(self.log_path)}"
                )
            if self._answers():
                if self._proc.poll() is None:
                    return
                continue  # something else answered on the port and ours exited: report that
            time.sleep(0.05)
        self._terminate()
        raise ServiceError(
            f"{self.kind} on port {self.port} did not answer within {START_TIMEOUT:.0f}s:\n"
            f"{tail(self.log_path)}"
        )

    def _reap(self) -> None:
        if self._proc is not None:
            _watchdog.forget_pid(self._proc.pid)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _terminate(self, timeout: float = STOP_TIMEOUT) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._reap()

    def stop(self) -> None:
        """Stop the process; `start()` brings it back on the same port and directory."""
        with self._lock:
            self._terminate()
            with _live_lock:
                _live_servers.discard(self)

    def close(self) -> None:
        """Stop the process and remove its directory. Idempotent."""
        with self._lock:
            self.stop()
            if not self._closed:
                self._closed = True
                shutil.rmtree(self.dir, ignore_errors=True)
                _watchdog.forget_dir(self.dir)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} 127.0.0.1:{self.port} {state} dir={self.dir}>"


def find_redis_server() -> str:
    """Path of redis-server (PATH, then Debian's location)."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError("redis-server not found; run scripts/install-system-deps.sh")


class RedisServer(_Server):
    """A throwaway redis-server: no persistence, bound to 127.0.0.1.

    After ``stop()`` + ``start()`` it listens on the same port again, empty.
    ``freeze()`` / ``thaw()`` (SIGSTOP/SIGCONT) simulate a Redis that hangs instead of refusing.
    """

    kind = "redis"
    stop_signal = signal.SIGTERM

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", "",
        ]  # fmt: skip

    def _answers(self) -> bool:
        return redis_answers("127.0.0.1", self.port, timeout=0.5)

    def freeze(self) -> None:
        with self._lock:
            if self._proc is not None and self.running:
                self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        with self._lock:
            if self._proc is not None and self.running:
                self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its sockets reset, nothing is handed over."""
        with self._lock:
            if self._proc is not None and self.running:
                self._proc.send_signal(signal.SIGCONT)
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT)
            self._reap()
            with _live_lock:
                _live_servers.discard(self)


def find_postgres_bindir() -> Path:
    """The directory holding initdb and postgres: PATH first, then the newest Debian version."""
    candidates: list[Path] = [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]

    def version_key(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in path.parent.name.split("."))
        except ValueError:
            return (0,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    candidates += debian
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return directory
    raise ServiceError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; run scripts/install-system-deps.sh"
    )


def _cluster_owner() -> pwd.struct_passwd | None:
    """initdb/postgres refuse to run as root: the unprivileged user to own the cluster, or None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError("running as root and neither user 'postgres' nor 'nobody' exists")


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster: trust auth for user ``postgres``, fsync off.

    ``stop()`` (fast shutdown) + ``start()`` bring it back on the same port with its data, which
    is how tests simulate a database outage. When running as root the cluster is owned by and run
    as user ``postgres`` (or ``nobody``), because initdb and postgres refuse to run as root.
    """

    kind = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown

    def __init__(
        self,
        port: int | None = None,
        *,
        tls: bool = False,
        standby_of: PostgresServer | None = None,
    ) -> None:
        """`tls`: `ssl=on` with a self-signed certificate for 127.0.0.1 (its copy for clients:
        `ca_file`). `standby_of`: a hot standby of that running server (pg_basebackup -R), which
        takes no writes (`in_hot_standby`, `transaction_read_only` on)."""
        self._owner = _cluster_owner()
        self.bindir = find_postgres_bindir()
        self.tls = tls
        self.standby_of = standby_of
        super().__init__(port)
        self.data_dir = self.dir / "data"
        self.ca_file = self.dir / "ca.crt"

    @property
    def dsn(self) -> str:
        """Admin DSN (maintenance database ``postgres``)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _make_dir(self) -> Path:
        parent = Path(tempfile.gettempdir())
        owner = _cluster_owner()
        if owner is not None and not _world_traversable(parent):
            parent = Path("/tmp")  # the cluster's owner must be able to reach its directory
        path = Path(tempfile.mkdtemp(prefix="gwtest-postgres-", dir=parent))
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        return path

    def _popen_extra(self) -> dict[str, Any]:
        if self._owner is None:
            return {}
        env = dict(os.environ, HOME=self._owner.pw_dir, USER=self._owner.pw_name)
        return {
            "user": self._owner.pw_uid,
            "group": self._owner.pw_gid,
            "extra_groups": [],
            "env": env,
        }

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.standby_of is not None:
            # initdb's pg_hba.conf trusts replication from 127.0.0.1; -R writes primary_conninfo
            # and standby.signal, so the copy starts as a hot standby streaming from the primary.
            # Next to the real postgres binary (PATH may hold symlinks to initdb/postgres only).
            basebackup = (self.bindir / "postgres").resolve().parent / "pg_basebackup"
            self._run_as_owner(
                "pg_basebackup",
                str(basebackup),
                "-D", str(self.data_dir),
                "-h", "127.0.0.1",
                "-p", str(self.standby_of.port),
                "-U", "postgres",
                "-X", "stream",
                "-R",
                "--no-sync",
            )  # fmt: skip
        else:
            self._run_as_owner(
                "initdb",
                str(self.bindir / "initdb"),
                "-D", str(self.data_dir),
                "-A", "trust",
                "-U", "postgres",
                "-E", "UTF8",
                "--no-locale",
                "--no-sync",
            )  # fmt: skip
        if self.tls:
            self._make_certificate()

    def _run_as_owner(self, what: str, *command: str) -> None:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            check=False,
            **self._popen_extra(),
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise ServiceError(f"{what} failed ({result.returncode}):\n{output}")

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 in the data dir (postgres's default
        ssl_cert_file/ssl_key_file names), the key 0600 and the cluster owner's as postgres
        demands; a copy of the certificate is the clients' CA file."""
        openssl = shutil.which("openssl") or "/usr/bin/openssl"
        crt, key = self.data_dir / "server.crt", self.data_dir / "server.key"
        result = subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key), "-out", str(crt),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceError(f"openssl failed ({result.returncode}):\n{result.stderr.decode()}")
        key.chmod(0o600)
        if self._owner is not None:
            for path in (crt, key):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        shutil.copyfile(crt, self.ca_file)

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "logging_collector": "off",
        }
        if self.tls:
            settings["ssl"] = "on"  # pg_hba's `host` lines match TLS and plain connections alike
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _answers(self) -> bool:
        return postgres_answers("127.0.0.1", self.port, timeout=1.0)


def stop_all() -> None:
    """Close every throwaway server this process started (registered with atexit)."""
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()
    with _resolved_lock:
        owned = [server for _, server in _resolved.values() if server is not None]
        _resolved.clear()
    for server in owned:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(stop_all)


# --------------------------------------------------------------------------------------------
# Which servers the tests use


def resolve_redis_url() -> tuple[str, RedisServer | None]:
    """(url, server): `server` is the throwaway one started for it, or None. Not cached."""
    configured = os.environ.get("TEST_REDIS_URL", "").strip()
    if configured:
        return configured, None
    host, port = _split_hostport(os.environ.get("TEST_PROBE_REDIS", DEFAULT_REDIS_PROBE), 6379)
    if redis_answers(host, port):
        return f"redis://{host}:{port}/0", None
    server = RedisServer().start()
    return server.url, server


def resolve_postgres_dsn() -> tuple[str, PostgresServer | None]:
    """(admin dsn, server): `server` is the throwaway one started for it, or None. Not cached."""
    configured = os.environ.get("TEST_DATABASE_URL", "").strip()
    if configured:
        return configured, None
    host, port = _split_hostport(
        os.environ.get("TEST_PROBE_POSTGRES", DEFAULT_POSTGRES_PROBE), 5432
    )
    if postgres_answers(host, port):
        return f"postgresql://postgres@{host}:{port}/postgres", None
    server = PostgresServer().start()
    return server.dsn, server


_resolved: dict[str, tuple[str, _Server | None]] = {}
_resolved_lock = threading.Lock()


def redis_url() -> str:
    """The Redis URL for this test process (resolved once; see the module docstring)."""
    with _resolved_lock:
        if "redis" not in _resolved:
            _resolved["redis"] = resolve_redis_url()
        return _resolved["redis"][0]


def postgres_dsn() -> str:
    """The admin PostgreSQL DSN for this test process (resolved once)."""
    with _resolved_lock:
        if "postgres" not in _resolved:
            _resolved["postgres"] = resolve_postgres_dsn()
        return _resolved["postgres"][0]


def _release(kind: str) -> None:
    with _resolved_lock:
        _, server = _resolved.pop(kind, ("", None))
    if server is not None:
        server.close()


def session_redis_url() -> Iterator[str]:
    """Generator for a session fixture: yields :func:`redis_url`, then stops a throwaway one."""
    try:
        yield redis_url()
    finally:
        _release("redis")


def session_postgres_admin_dsn() -> Iterator[str]:
    """Generator for a session fixture: yields :func:`postgres_dsn`, then stops a throwaway one."""
    try:
        yield postgres_dsn()
    finally:
        _release("postgres")


# --------------------------------------------------------------------------------------------
# Per-test data: a fresh database, a fresh Redis key prefix


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop in a helper thread.

    Works from sync code and from inside a running event loop alike (it blocks that loop).
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(asyncio.run(coro))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="services.run_blocking", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database name replaced."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def fresh_database_name() -> str:
    return f"{DATABASE_PREFIX}{secrets.token_hex(16)}"


def _checked_database_name(dsn_or_name: str) -> str:
    name = dsn_or_name
    if "://" in dsn_or_name:
        name = urlsplit(dsn_or_name).path.lstrip("/")
    if not _DATABASE_NAME_RE.match(name):
        raise ValueError(f"refusing to touch database {name!r}: not a gwtest_<hex> database")
    return name


async def _admin_execute(admin_dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, dsn_or_name: str) -> None:
    """DROP DATABASE IF EXISTS … WITH (FORCE). Only ``gwtest_<hex>`` names are accepted."""
    name = _checked_database_name(dsn_or_name)
    await _admin_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def fresh_database_async(
    admin_dsn: str, *, create: bool = True
) -> tuple[str, Callable[[], Coroutine[Any, Any, None]]]:
    """(dsn, drop): a new empty ``gwtest_<hex>`` database on the admin DSN's server.

    With ``create=False`` the database does not exist yet (for testing "migrate creates it");
    ``drop`` works either way.
    """
    name = fresh_database_name()
    if create:
        await _admin_execute(admin_dsn, f'CREATE DATABASE "{name}"')

    async def drop() -> None:
        await drop_database(admin_dsn, name)

    return with_database(admin_dsn, name), drop


def fresh_database(admin_dsn: str, *, create: bool = True) -> tuple[str, Callable[[], None]]:
    """Blocking :func:`fresh_database_async`; safe in sync and async fixtures."""
    dsn, drop_async = run_blocking(fresh_database_async(admin_dsn, create=create))

    def drop() -> None:
        run_blocking(drop_async())

    return dsn, drop


def fresh_redis_prefix() -> str:
    """A new key prefix ``gwtest:<32 hex>``; all have one length, so none prefixes another."""
    return f"{REDIS_PREFIX_ROOT}{secrets.token_hex(16)}"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key starting with `prefix` (SCAN + UNLINK, never FLUSHDB). Returns the count.

    Only prefixes made by :func:`fresh_redis_prefix` (``gwtest:…``) are accepted.
    """
    if not prefix.startswith(REDIS_PREFIX_ROOT) or len(prefix) <= len(REDIS_PREFIX_ROOT):
        raise ValueError(f"refusing to delete keys under {prefix!r}: not a gwtest: prefix")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(await client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await client.unlink(*batch))
    finally:
        await client.aclose()
    return deleted


# --------------------------------------------------------------------------------------------
# A throwaway Redis Cluster (GATEWAY_REDIS_CLUSTER): six nodes, three primaries with a replica
# each. Lazily started by the first test that asks (`session_redis_cluster_url`).

CLUSTER_NODES = 6
_CLUSTER_PORT_CEILING = 55536  # a node's bus port is its port + 10000, which must be a port


def free_cluster_port() -> int:
    """A free port whose bus port (port + 10000) is a valid port too."""
    for _ in range(100):
        port = free_port()
        if port < _CLUSTER_PORT_CEILING:
            return port
    raise ServiceError("no free port below 55536 for a cluster node")


class RedisClusterNode(RedisServer):
    """One `redis-server --cluster-enabled yes`, its nodes.conf in its own directory."""

    kind = "redis-cluster"

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.node_timeout_ms = node_timeout_ms
        super().__init__(free_cluster_port())

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--repl-diskless-sync-delay", "0",  # the replicas' first sync at once, not in 5 s
        ]  # fmt: skip


class RedisCluster:
    """Six cluster nodes joined by `redis-cli --cluster create … --cluster-replicas 1`; ready
    when every node says `cluster_state:ok`. `url` is one seed node (what REDIS_URL names).
    `node_timeout_ms` (cluster-node-timeout): how long a silent primary takes to be failed
    over."""

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.nodes = [RedisClusterNode(node_timeout_ms) for _ in range(CLUSTER_NODES)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.close()
            raise ServiceError(f"redis-cli --cluster create failed:\n{created.stdout!r}")
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._ok(node) and self._synced(node) for node in self.nodes):
            if time.monotonic() > deadline:
                self.close()
                raise ServiceError(
                    "the Redis Cluster did not reach cluster_state:ok with every replica in sync"
                )
            time.sleep(0.1)
        return self

    @staticmethod
    def _ok(node: RedisClusterNode) -> bool:
        info = subprocess.run(
            ["redis-cli", "-p", str(node.port), "cluster", "info"],
            capture_output=True, timeout=5, check=False,
        )  # fmt: skip
        return b"cluster_state:ok" in info.stdout

    @staticmethod
    def _synced(node: RedisClusterNode) -> bool:
        """A primary, or a replica whose first sync is done. A replica that never synced is
        never promoted (its data counts as infinitely old), so a primary killed before then
        is never failed over."""
        info = subprocess.run(
            ["redis-cli", "-p", str(node.port), "info", "replication"],
            capture_output=True, timeout=5, check=False,
        )  # fmt: skip
        return b"role:master" in info.stdout or b"master_link_status:up" in info.stdout

    def close(self) -> None:
        for node in self.nodes:
            node.close()


_cluster: RedisCluster | None = None


def redis_cluster_url() -> str:
    """The seed node's URL of this test process' Redis Cluster (TEST_REDIS_CLUSTER_URL, or a
    throwaway one started on first use)."""
    global _cluster
    configured = os.environ.get("TEST_REDIS_CLUSTER_URL", "").strip()
    if configured:
        return configured
    with _resolved_lock:
        if _cluster is None:
            _cluster = RedisCluster().start()
        return _cluster.url


def session_redis_cluster_url() -> Iterator[str]:
    """Generator for a lazily-started session fixture: yields :func:`redis_cluster_url`, then
    stops a throwaway cluster."""
    global _cluster
    try:
        yield redis_cluster_url()
    finally:
        with _resolved_lock:
            cluster, _cluster = _cluster, None
        if cluster is not None:
            cluster.close()


async def delete_cluster_prefix(url: str, prefix: str) -> int:
    """:func:`delete_prefix` on every primary of a Redis Cluster (one key per UNLINK: keys of
    one call must share a slot)."""
    if not prefix.startswith(REDIS_PREFIX_ROOT) or len(prefix) <= len(REDIS_PREFIX_ROOT):
        raise ValueError(f"refusing to delete keys under {prefix!r}: not a gwtest: prefix")
    from redis.asyncio.cluster import RedisCluster as ClusterClient

    client = ClusterClient.from_url(url)
    deleted = 0
    try:
        async for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
            deleted += int(await client.unlink(key))
    finally:
        await client.aclose()
    return deleted


# Redis under Sentinel (a primary, a replica, three Sentinels) and Redis over TLS


def redis_command(host: str, port: int, *args: str, timeout: float = 1.0) -> Any:
    """One command on a fresh connection (redis-py's sync client); raises its errors."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=timeout, decode_responses=True)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


class RedisNode(RedisServer):
    """A throwaway redis-server that may start as a replica of another (and, as every
    RedisServer, may be SIGKILLed)."""

    def __init__(self, replica_of: int | None = None) -> None:
        self.replica_of = replica_of
        super().__init__()

    def _command(self) -> list[str]:
        extra = ["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []
        return [*super()._command(), *extra]


class SentinelServer(_Server):
    """A throwaway Redis Sentinel watching `master` as `mymaster` (quorum 2, quick failover)."""

    kind = "sentinel"
    stop_signal = signal.SIGTERM

    def __init__(self, master_port: int, name: str = "mymaster") -> None:
        self.master_port = master_port
        self.name = name
        super().__init__()

    def _prepare(self) -> None:
        conf = self.dir / "sentinel.conf"
        if conf.exists():
            return  # Sentinel rewrites its file: keep what it learnt across restarts
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {self.name} 1000\n"
            f"sentinel failover-timeout {self.name} 3000\n"
            f"sentinel parallel-syncs {self.name} 1\n"
        )

    def _command(self) -> list[str]:
        return [find_redis_server(), str(self.dir / "sentinel.conf"), "--sentinel"]

    def _answers(self) -> bool:
        return redis_answers("127.0.0.1", self.port, timeout=0.5)


class SentinelTopology:
    """One primary, one replica and three Sentinels on free ports of 127.0.0.1."""

    name = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisNode()
        self.replica: RedisNode | None = None
        self.sentinels: list[SentinelServer] = []

    @property
    def nodes(self) -> list[RedisNode]:
        return [n for n in (self.primary, self.replica) if n is not None]

    @property
    def sentinel_addresses(self) -> str:
        """For GATEWAY_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def url(self) -> str:
        """For REDIS_URL beside the Sentinels (only the db number is read from it)."""
        return "redis://127.0.0.1:1/0"

    def start(self) -> Self:
        self.primary.start()
        self.replica = RedisNode(replica_of=self.primary.port).start()
        self.sentinels = [SentinelServer(self.primary.port, self.name).start() for _ in range(3)]
        self.wait_healthy()
        return self

    def master_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            with contextlib.suppress(Exception):
                addr = redis_command(
                    "127.0.0.1", sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name
                )
                return int(addr[1]) if addr else None
        return None

    def node_at(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until every Sentinel sees the primary, the replica and the two other Sentinels, and
        the replica is in sync: a failover can then be elected and promote it."""
        deadline = time.monotonic() + timeout
        problem = "not checked"
        while time.monotonic() < deadline:
            problem = self._problem()
            if not problem:
                return
            time.sleep(0.1)
        raise ServiceError(f"Sentinel topology not healthy within {timeout:.0f}s: {problem}")

    def _problem(self) -> str:
        try:
            master = self.master_port()
            if master is None:
                return "no primary named"
            for sentinel in self.sentinels:
                info = redis_command("127.0.0.1", sentinel.port, "SENTINEL", "MASTER", self.name)
                if int(info["port"]) != master or "down" in info["flags"]:
                    return f"sentinel {sentinel.port} sees {info['port']} {info['flags']}"
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < 2:
                    return f"sentinel {sentinel.port}: {info['num-slaves']} replicas, " + (
                        f"{info['num-other-sentinels']} other sentinels"
                    )
                replicas = redis_command(
                    "127.0.0.1", sentinel.port, "SENTINEL", "SLAVES", self.name
                )
                for fields in replicas:
                    if "down" in fields["flags"]:
                        return f"sentinel {sentinel.port}: replica {fields['port']} down"
            for node in self.nodes:
                if node.port == master:
                    continue
                info = redis_command("127.0.0.1", node.port, "INFO", "replication")
                if info.get("master_link_status") != "up" or int(info["master_port"]) != master:
                    return f"replica {node.port} not in sync with {master}"
        except Exception as exc:  # a node still starting
            return repr(exc)
        return ""

    def close(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            with contextlib.suppress(Exception):
                server.close()


def session_sentinel_topology() -> Iterator[SentinelTopology]:
    """Generator for a session fixture: a started topology, closed at the end."""
    topology = SentinelTopology()
    try:
        yield topology.start()
    finally:
        topology.close()


class TlsRedisServer(RedisServer):
    """A throwaway redis-server that speaks only TLS, with a self-signed CA made by `openssl`
    (`ca.crt`, and `redis.crt`/`redis.key` for 127.0.0.1 and localhost) in its directory."""

    kind = "redis-tls"

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca_file}"

    def _prepare(self) -> None:
        if self.ca_file.exists():
            return
        openssl = shutil.which("openssl") or "/usr/bin/openssl"
        (self.dir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        steps = [
            ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
             "-subj", "/CN=gwtest CA", "-keyout", "ca.key", "-out", "ca.crt"],
            ["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=127.0.0.1",
             "-keyout", "redis.key", "-out", "redis.csr"],
            ["x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "redis.crt"],
        ]  # fmt: skip
        for step in steps:
            subprocess.run([openssl, *step], cwd=self.dir, check=True, capture_output=True)

    def _command(self) -> list[str]:
        return [
            find_redis_server(),
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.dir / "redis.crt"),
            "--tls-key-file", str(self.dir / "redis.key"),
            "--tls-ca-cert-file", str(self.ca_file),
            "--tls-auth-clients", "no",
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", "",
        ]  # fmt: skip

    def _answers(self) -> bool:
        import ssl

        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    return _recv_exact(sock, 5) == b"+PONG"
        except (OSError, ConnectionError):
            return False
