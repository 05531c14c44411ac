"""Prometheus metrics of CONTRACT.md §6.

Names are fixed by the contract; labels are bounded (never a key, a key id or a socket id).
Every metric lives in one module so dashboards and alert rules have a single source.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# Sub-millisecond buckets: the gateway's own work per forwarded event.
_OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
# Seconds: what an upstream model takes.
_TTFE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

WS_CONNECTIONS_ACTIVE = Gauge(
    "gateway_ws_connections_active",
    "Client WebSocket sockets open on this node.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WS_CONNECTIONS_TOTAL = Counter(
    "gateway_ws_connections_total",
    "WebSocket handshakes by outcome (accepted or the refusal code).",
    ["outcome"],
    registry=REGISTRY,
)
WS_CLOSES_TOTAL = Counter(
    "gateway_ws_closes_total",
    "WebSocket closes by side (client, gateway, upstream) and close code.",
    ["side", "code"],
    registry=REGISTRY,
)
RESPONSES_TOTAL = Counter(
    "gateway_responses_total",
    "Responses finished, by model (openai/<model>) and status.",
    ["model", "status"],
    registry=REGISTRY,
)
ERRORS_TOTAL = Counter(
    "gateway_errors_total",
    "Errors the gateway sent or answered, by code.",
    ["code"],
    registry=REGISTRY,
)
UPSTREAM_RETRIES_TOTAL = Counter(
    "gateway_upstream_retries_total",
    "Turns the gateway served a second time by itself, by reason.",
    ["reason"],
    registry=REGISTRY,
)
TIME_TO_FIRST_EVENT = Histogram(
    "gateway_time_to_first_event_seconds",
    "From an accepted response.create to the first event sent to the client.",
    buckets=_TTFE_BUCKETS,
    registry=REGISTRY,
)
RESPONSE_DURATION = Histogram(
    "gateway_response_duration_seconds",
    "From an accepted response.create to its terminal event.",
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "Per forwarded event: from its receipt to its write to the other side.",
    buckets=_OVERHEAD_BUCKETS,
    registry=REGISTRY,
)
TOKENS_TOTAL = Counter(
    "gateway_tokens_total",
    "Tokens by model and kind (input, cached_input, output, reasoning).",
    ["model", "kind"],
    registry=REGISTRY,
)
COST_USD_TOTAL = Counter(
    "gateway_cost_usd_total",
    "Cost in USD by team.",
    ["team"],
    registry=REGISTRY,
)
LEDGER_PENDING_ROWS = Gauge(
    "gateway_ledger_pending_rows",
    "Ledger rows not yet written to Postgres (memory and spill files).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
LEDGER_WRITE_FAILURES_TOTAL = Counter(
    "gateway_ledger_write_failures_total",
    "Failed attempts to write a batch of ledger rows.",
    registry=REGISTRY,
)
REDIS_UP = Gauge(
    "gateway_redis_up",
    "1 when the last Redis call succeeded, else 0.",
    registry=REGISTRY,
    multiprocess_mode="max",
)
POSTGRES_UP = Gauge(
    "gateway_postgres_up",
    "1 when the last Postgres call succeeded, else 0.",
    registry=REGISTRY,
    multiprocess_mode="max",
)


def count_error(code: str) -> None:
    ERRORS_TOTAL.labels(code=code).inc()
