"""Settings, read once from the environment (and `.env`) into a typed frozen object.

Names are fixed by CONTRACT.md §1. Each command reads only what it uses: `migrate` builds a
`DatabaseSettings`, `serve` the full `Settings`. A bad value becomes one `ConfigError` line naming
the variable, which the CLI prints without a traceback. REDIS_URL and DATABASE_URL are judged as
redis-py and asyncpg will parse them (app/dsn.py), so a malformed one fails here, not at the first
connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.dsn import check_postgres_url, check_redis_url
from app.redisconn import parse_sentinels

MIB = 1024 * 1024


class ConfigError(Exception):
    """A setting has a bad value; the message is one line naming the variable."""


class _Base(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        case_sensitive=True,
    )


class DatabaseSettings(_Base):
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/gateway", alias="DATABASE_URL"
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        check_postgres_url(value)
        return value


class RedisSettings(_Base):
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
    # Namespaces every key and channel, so several deployments (or test runs) share one Redis.
    redis_prefix: str = Field(
        default="gw", alias="GATEWAY_REDIS_PREFIX", min_length=1, pattern=r"^[^{}]+$"
    )  # no braces: the key layout's hash tags follow it (app/keystore.py)
    # REDIS_URL is one seed node of a Redis Cluster; the client learns the rest from it.
    redis_cluster: bool = Field(default=False, alias="GATEWAY_REDIS_CLUSTER")
    # Comma-separated host:port of Redis Sentinels; empty: REDIS_URL names the server. When set,
    # the primary is found (and re-found after a failover) through them, and REDIS_URL gives only
    # the password, db number and TLS (app/redisconn.py).
    redis_sentinels: str = Field(default="", alias="GATEWAY_REDIS_SENTINELS")
    redis_sentinel_master: str = Field(
        default="mymaster", alias="GATEWAY_REDIS_SENTINEL_MASTER", min_length=1
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        check_redis_url(value)
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: str) -> str:
        parse_sentinels(value)
        return value

    @model_validator(mode="after")
    def _one_topology(self) -> RedisSettings:
        if self.redis_cluster and self.redis_sentinels.strip():
            raise ValueError(
                "GATEWAY_REDIS_CLUSTER and GATEWAY_REDIS_SENTINELS: set one (a Cluster has no"
                " Sentinels)"
            )
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return parse_sentinels(self.redis_sentinels)


class Settings(RedisSettings, DatabaseSettings):
    host: str = Field(default="127.0.0.1", alias="GATEWAY_HOST")
    port: int = Field(default=8080, alias="GATEWAY_PORT", ge=0, le=65535)
    admin_token: str | None = Field(default=None, alias="ADMIN_TOKEN")
    openai_base_url: str = Field(default="https://api.openai.com/v1", alias="OPENAI_BASE_URL")
    openai_api_key: str | None = Field(default=None, alias="OPENAI_API_KEY")
    env: Literal["dev", "prod"] = Field(default="prod", alias="GATEWAY_ENV")
    max_frame_bytes: int = Field(default=16 * MIB, alias="GATEWAY_MAX_FRAME_BYTES", gt=0)
    max_sockets: int = Field(default=10_000, alias="GATEWAY_MAX_SOCKETS", gt=0)
    context_bytes: int = Field(default=8 * MIB, alias="GATEWAY_CONTEXT_BYTES", ge=0)
    context_total_bytes: int = Field(default=1024 * MIB, alias="GATEWAY_CONTEXT_TOTAL_BYTES", ge=0)
    upstream_max_age_seconds: float = Field(
        default=3300, alias="GATEWAY_UPSTREAM_MAX_AGE_SECONDS", gt=0
    )
    upstream_handshake_seconds: float = Field(
        default=10, alias="GATEWAY_UPSTREAM_HANDSHAKE_SECONDS", gt=0
    )
    upstream_idle_seconds: float = Field(default=300, alias="GATEWAY_UPSTREAM_IDLE_SECONDS", gt=0)
    # Warm upstream sockets per credential (app/pool.py). Off by default: CONTRACT.md §3 has the
    # upstream socket opened on the first accepted turn, and idle sockets held on an OpenAI
    # account are the operator's call. When on, 1-2 is enough unless new sockets arrive in bursts.
    upstream_pool_size: int = Field(default=0, alias="GATEWAY_UPSTREAM_POOL_SIZE", ge=0)
    # A pooled socket this old is replaced (capped at half of GATEWAY_UPSTREAM_MAX_AGE_SECONDS, so
    # a customer always gets most of an upstream socket's life).
    upstream_pool_refresh_seconds: float = Field(
        default=600, alias="GATEWAY_UPSTREAM_POOL_REFRESH_SECONDS", gt=0
    )
    upstream_max_frame_bytes: int = Field(
        default=256 * MIB, alias="GATEWAY_UPSTREAM_MAX_FRAME_BYTES", gt=0
    )
    # A connection that has not finished its first request's headers by then is closed
    # (slowloris); 0: no limit. Later requests on a keep-alive connection: app/listener.py.
    handshake_seconds: float = Field(default=10, alias="GATEWAY_HANDSHAKE_SECONDS", ge=0)
    # Failed authentications (401) per client address per minute, counted in this process; past
    # it the address gets 429 before its key is looked up (app/auth/guard.py). 0: no limit.
    auth_failures_per_minute: int = Field(
        default=60, alias="GATEWAY_AUTH_FAILURES_PER_MINUTE", ge=0
    )
    # Count failures by the right-most X-Forwarded-For entry (set it only behind a proxy that
    # appends it; otherwise a client could name any address).
    trust_forwarded_for: bool = Field(default=False, alias="GATEWAY_TRUST_FORWARDED_FOR")
    # Refuse /admin/v1/ with 403 unless the request came through a TLS-terminating proxy.
    admin_require_tls_proxy: bool = Field(default=False, alias="GATEWAY_ADMIN_REQUIRE_TLS_PROXY")
    # A socket with no response in flight and no client frame for this long is closed (1000,
    # "idle timeout"); 0: never. An hour, not minutes: an agent or Codex session sits idle while
    # its user reads, thinks or steps away, and a close costs its next turn a new socket and,
    # since the conversation memory goes with the socket, a full-context resend after
    # previous_response_not_found. OpenAI ends its own sockets at 60 minutes, so clients built
    # for it expect no more. What it bounds: a socket whose client vanished without a FIN
    # (laptop lid, NAT timeout) holding its slot, its key's and team's socket caps and its
    # memory until the kernel's keep-alive (over two hours with Linux defaults). Pings do not
    # count as frames (aiohttp answers them).
    idle_socket_seconds: float = Field(default=3600, alias="GATEWAY_IDLE_SOCKET_SECONDS", ge=0)
    # The longest life of one socket (1000, "socket lifetime reached"), reached at a turn
    # boundary: at once when idle, right after the terminal event when a response is in flight,
    # never mid-response; 0: no limit. A day: an agent loop that never idles reconnects once a
    # day, and no socket outlives the key rotations, team changes and deploys of a week.
    max_socket_seconds: float = Field(default=86400, alias="GATEWAY_MAX_SOCKET_SECONDS", ge=0)
    # Bytes waiting to go to one client; past it the client is not reading: closed with 1008.
    max_pending_bytes: int = Field(default=32 * MIB, alias="GATEWAY_MAX_PENDING_BYTES", gt=0)
    http_fallback: bool = Field(default=True, alias="GATEWAY_HTTP_FALLBACK")
    drain_seconds: float = Field(default=30, alias="GATEWAY_DRAIN_SECONDS", ge=0)
    spill_dir: Path = Field(default=Path("./var/spill"), alias="GATEWAY_SPILL_DIR")
    # Ledger partitions (a month each) entirely older than this many days are dropped; 0: never.
    ledger_retention_days: int = Field(
        default=365, alias="GATEWAY_LEDGER_RETENTION_DAYS", ge=0, le=36500
    )
    node_id: str | None = Field(default=None, alias="GATEWAY_NODE_ID")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", alias="GATEWAY_LOG_LEVEL"
    )
    # Upstream frames the session does not look into go to the client as bytes (app/rawpath.py);
    # false: every frame takes aiohttp's path (parsed, decoded, re-framed).
    raw_forwarding: bool = Field(default=True, alias="GATEWAY_RAW_FORWARDING")
    # auto: uvloop when installed (app/eventloop.py), else asyncio's own loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", alias="GATEWAY_EVENT_LOOP"
    )

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def upstream_ws_url(self) -> str:
        """`https`→`wss`, `http`→`ws`, plus `/responses` (CONTRACT.md §1)."""
        base = self.openai_base_url
        scheme, rest = base.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + "/responses"

    def check_serve(self) -> None:
        if not self.admin_token and self.env != "dev":
            raise ConfigError("ADMIN_TOKEN: required unless GATEWAY_ENV=dev")


_T = TypeVar("_T", bound=_Base)


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's wrapping of a validator's words
    return f"{name}: {msg}{_shown(name, err.get('input'))}"


def _shown(name: str, value: object) -> str:
    """The value, for the line, unless it is or may hold a secret (a URL's password)."""
    if value is None or isinstance(value, dict) or name in ("ADMIN_TOKEN", "OPENAI_API_KEY"):
        return ""
    text = str(value)
    if name in ("REDIS_URL", "DATABASE_URL") and ("@" in text or "pass" in text.lower()):
        return ""
    return f" (got {value!r})"


def load(cls: type[_T], **overrides: object) -> _T:
    """Build a settings object, turning a validation error into one `ConfigError` line."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None
