"""REDIS_URL and DATABASE_URL judged at start-up the way their clients will read them.

CONTRACT.md §1: a value that cannot be parsed is a bad value (one line, no traceback, exit
non-zero); a well-formed one whose server does not answer is an outage. So nothing here connects
or reads a file: each check stops where its client would first touch the network.

- Redis: redis-py's own `from_url` (the KeyStore's constructor) and the connection object it
  would make, so an unknown query option or a bad TLS flag is refused here, not at the first
  call. Beyond redis-py: a `unix://` URL needs a path, and port 0 is refused.
- Postgres: asyncpg (`asyncpg.connect(dsn)`, what the ledger and `migrate` call) takes only
  `postgresql://` / `postgres://` URLs, not libpq's `key=value` form. The checks below follow
  its parser (asyncpg/connect_utils.py, `_parse_connect_dsn_and_args`) step by step; they are
  not imported from it because that function is private, reads files (pgpass, TLS
  certificates) and changes signature between releases. Beyond asyncpg: ports must be 1-65535
  and host names non-empty (asyncpg fails those at every connection, as if Postgres were away).

A `ValueError`'s message is one line that never quotes a password (the caller may print it).
"""

from __future__ import annotations

import os
import re
import ssl
import urllib.parse

# asyncpg's accepted values (connect_utils: SSLMode, which also takes `_` for `-`;
# SessionAttribute; SSLNegotiation; gsslib). tests/test_startup_urls.py checks them against it.
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")
SSL_NEGOTIATIONS = ("postgres", "direct")
GSSLIBS = ("gssapi", "sspi")
_IPV6 = re.compile(r"(?:\[([^\]]+)\])(?::([0-9]+))?")


def check_redis_url(url: str) -> None:
    """Raise ValueError when redis-py could not build a connection from `url`."""
    from redis.asyncio import BlockingConnectionPool
    from redis.exceptions import RedisError

    if not url.lower().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    try:
        pool = BlockingConnectionPool.from_url(url)
        pool.make_connection()  # type: ignore[no-untyped-call]  # builds the object only: no I/O
    except TypeError as exc:  # a query option the connection does not take
        name = re.search(r"argument '(\w+)'", str(exc))
        raise ValueError(f"unknown option {name.group(1) if name else ''!r}") from None
    except (ValueError, RedisError) as exc:
        raise ValueError(_first_line(exc)) from None
    kwargs = pool.connection_kwargs
    if url.lower().startswith("unix://") and not kwargs.get("path"):
        raise ValueError("a unix:// URL needs the socket's path")
    if kwargs.get("port") == 0:
        raise ValueError("port 0: expected 1-65535")


def check_postgres_url(url: str) -> None:
    """Raise ValueError when asyncpg would refuse `url` (or fail every connection) before
    reaching a server."""
    if "://" not in url or url.split("://", 1)[0].lower() not in ("postgresql", "postgres"):
        hint = " (libpq's key=value form is not taken)" if "=" in url and "://" not in url else ""
        raise ValueError(f"expected a postgresql:// or postgres:// URL{hint}")
    try:
        parts = urllib.parse.urlparse(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ValueError(_first_line(exc)) from None
    query: dict[str, str] = {}
    if parts.query:
        try:
            pairs = urllib.parse.parse_qs(parts.query, strict_parsing=True)
        except ValueError:
            raise ValueError("the query is not name=value pairs joined by &") from None
        query = {name: values[-1] for name, values in pairs.items()}  # asyncpg: the last wins
    auth, at, hosts_part = parts.netloc.partition("@")  # asyncpg splits at the first @
    hostspec = hosts_part if at else auth
    if hostspec:
        _check_hosts(hostspec, unquote=True)  # the URL's hosts; `?port=` is then ignored
    else:
        ports = _ports(query["port"]) if query.get("port") else []
        hosts = _check_hosts(query["host"], ports) if query.get("host") else 0
        if len(ports) > 1 and len(ports) != hosts:
            raise ValueError(f"{len(ports)} ports for {hosts or 'the default'} hosts")
    _check_options(query)


def _check_hosts(hostlist: str, ports: list[int] | None = None, *, unquote: bool = False) -> int:
    """asyncpg's `_parse_hostlist`: comma-separated `host[:port]`, `[v6][:port]` or `/socket`
    entries; when `ports` came from `?port=`, the entries' own ports are not read."""
    specs = hostlist.split(",")
    if ports and len(ports) > 1 and len(ports) != len(specs):
        raise ValueError(f"{len(ports)} ports for {len(specs)} hosts")
    for spec in specs:
        if spec.startswith("["):
            match = _IPV6.match(spec)
            if match is None:
                raise ValueError("an IPv6 host is not closed by ]")
            addr, port = match.group(1), match.group(2) or ""
        elif spec.startswith("/"):
            addr, port = spec, ""
        else:
            addr, _, port = spec.partition(":")
        if unquote:
            addr, port = urllib.parse.unquote(addr), urllib.parse.unquote(port)
        if not addr:
            raise ValueError("a host name is empty")
        if port and not ports:
            _ports(port)
    return len(specs)


def _ports(text: str) -> list[int]:
    ports = []
    for part in text.split(","):
        try:
            port = int(part)
        except ValueError:
            raise ValueError("a port is not a number") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port}: expected 1-65535")
        ports.append(port)
    return ports


def _check_options(query: dict[str, str]) -> None:
    """The query options asyncpg itself parses; others go to the server as settings."""
    mode = query.get("sslmode")
    if mode is not None and mode.replace("_", "-") not in SSL_MODES:
        raise ValueError(f"sslmode: expected one of {', '.join(SSL_MODES)}")
    negotiation = query.get("sslnegotiation")
    if negotiation is not None:
        if negotiation not in SSL_NEGOTIATIONS:
            raise ValueError(f"sslnegotiation: expected one of {', '.join(SSL_NEGOTIATIONS)}")
        # asyncpg's own order: the URL's sslmode, else PGSSLMODE, else prefer
        effective = mode or os.environ.get("PGSSLMODE") or "prefer"
        if negotiation == "direct" and effective.replace("_", "-") not in SSL_MODES[3:]:
            raise ValueError("sslnegotiation=direct needs sslmode=require or verify-*")
    for name in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        version = query.get(name)
        if version is not None and (
            version.startswith("SSL") or version.replace(".", "_") not in ssl.TLSVersion.__members__
        ):
            raise ValueError(f"{name}: expected TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3")
    attrs = query.get("target_session_attrs")
    if attrs is not None and attrs not in TARGET_SESSION_ATTRS:
        raise ValueError(f"target_session_attrs: expected one of {', '.join(TARGET_SESSION_ATTRS)}")
    gsslib = query.get("gsslib")
    if gsslib is not None and gsslib not in GSSLIBS:
        raise ValueError(f"gsslib: expected one of {', '.join(GSSLIBS)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
