"""Prometheus metrics of CONTRACT.md §6, and the process metrics beside them.

Names are fixed by the contract; labels are bounded (never a key, a key id or a socket id): close
codes a client picks and error codes an upstream sends are folded into a few values here.

One process (`gateway serve`): every metric lives in `REGISTRY`, with prometheus-client's process,
platform and GC collectors. Several workers (`gateway serve --workers N`): the parent sets
`PROMETHEUS_MULTIPROC_DIR` before a worker's interpreter starts, so every value below is kept in a
file there, and any worker's `/metrics` adds up all of them (`MultiProcessCollector`); the gauges
say how (`multiprocess_mode`). Process metrics cannot be collected across processes, so each
worker samples its own into the gauges of `_MultiProcessSampler`, summed the same way.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from bisect import bisect_left
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from app.errors import Code

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Read once, at import: prometheus-client picks its value storage when it is first imported.
MULTIPROC_DIR: str | None = os.environ.get(MULTIPROC_ENV) or None

REGISTRY = CollectorRegistry(auto_describe=True)


class _Pending:
    """Counter and histogram additions, and gauge values, that a turn makes, held as plain
    numbers and handed to prometheus-client in one go (`fold`).

    Each `inc`, `observe` and `set` of prometheus-client validates and takes a lock (and with
    several workers writes a shared file after a `getpid`): a turn made about a dozen, 7% of a
    short turn's CPU. Here a turn adds to a dict. One process: the additions are folded in
    whenever the registry is read (`/metrics`, `REGISTRY.collect`, `get_sample_value`), so no
    reader ever sees a figure without them. Several workers: a worker's `/metrics` reads the
    other workers' files, so the additions are folded in at the end of the event loop's
    current round of callbacks (`call_soon`), before the loop polls for what comes next.
    """

    __slots__ = ("adds", "sets", "soon", "tallies")

    def __init__(self) -> None:
        # A counter's child -> the amount to add (an int, a float or a Decimal); a gauge's
        # child -> the value it was last set to.
        self.adds: dict[Any, Any] = {}
        self.sets: dict[Any, float] = {}
        self.soon = False
        # A histogram observed (`tally`) -> its observations, added up.
        self.tallies: dict[Histogram, Tally] = {}

    def tally(self, histogram: Histogram) -> Tally:
        """The histogram's `Tally` (made when first asked for), folded in with the rest."""
        found = self.tallies.get(histogram)
        if found is None:
            found = self.tallies[histogram] = Tally(histogram)
        return found

    def arm(self) -> None:
        """Several workers: fold at the end of this round of callbacks (none running: now)."""
        if self.soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.fold()
            return
        self.soon = True
        loop.call_soon(self.fold)

    def fold(self) -> None:
        self.soon = False
        if self.adds:
            adds, self.adds = self.adds, {}
            for target, amount in adds.items():
                target.inc(float(amount))
        if self.sets:
            sets, self.sets = self.sets, {}
            for gauge, value in sets.items():
                gauge.set(value)
        for tally in self.tallies.values():
            tally.fold()

    def describe(self) -> list[Any]:  # a collector of REGISTRY that collects nothing itself
        return []

    def collect(self) -> list[Any]:
        self.fold()
        return []


PENDING = _Pending()
# First of the registry's collectors: every read of REGISTRY folds the additions in first.
REGISTRY.register(PENDING)


def add(target: Any, amount: float | Decimal = 1) -> None:
    """`target.inc(amount)`, folded in later (`_Pending`); `target` a counter's child."""
    adds = PENDING.adds
    adds[target] = adds.get(target, 0) + amount
    if MULTIPROC_DIR is not None:
        PENDING.arm()


def set_gauge(gauge: Gauge, value: float) -> None:
    """`gauge.set(value)`, folded in later (`_Pending`): the last value set wins."""
    PENDING.sets[gauge] = value
    if MULTIPROC_DIR is not None:
        PENDING.arm()


def observe(histogram: Histogram, amount: float) -> None:
    """`histogram.observe(amount)` (unlabelled, no exemplar), through the histogram's `Tally`:
    folded in later (`_Pending`). The hot path holds its histograms' tallies (`TTFE_TALLY`,
    `DURATION_TALLY`, `OVERHEAD_TALLY`) and skips this lookup."""
    PENDING.tally(histogram).observe(amount)


# Sub-millisecond buckets: the gateway's own work per forwarded event (tens of microseconds).
_OVERHEAD_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
)
# Seconds: what an upstream model takes to start (time to first event) and to finish.
_TTFE_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

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
# `livemax`: a worker that died says nothing; any live worker reaching the service counts as up
# (a worker that has not called it yet reads 0 and must not hide the others).
REDIS_UP = Gauge(
    "gateway_redis_up",
    "1 when the last Redis call succeeded, else 0.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
POSTGRES_UP = Gauge(
    "gateway_postgres_up",
    "1 when the last Postgres call succeeded, else 0.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
# Not in CONTRACT.md §6: a node whose slot leases are not renewed lets its sockets' caps lapse
# (LEASE_MS after the last renewal) while its sockets keep serving; nothing else shows that.
LEASE_RENEWAL_FAILURES_TOTAL = Counter(
    "gateway_lease_renewal_failures_total",
    "Failed renewals of this node's socket slot leases and session records (per call).",
    registry=REGISTRY,
)
# Not in CONTRACT.md §6: teams near their spend limits (labels: the team, and the limit's name,
# `usd_per_day_per_team` or `usd_per_month_per_team`), set each time a node judges one of the
# team's turns; `gateway_spend_rebuilds_total{outcome}` (`rebuilt`, `failed`): counters rebuilt
# from the ledger, after Redis lost them or at a period's start.
BUDGET_USED_RATIO = Gauge(
    "gateway_budget_used_ratio",
    "A team's spend in the current UTC day or month over its limit, as this node last read it.",
    ["team", "limit"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
SPEND_REBUILDS_TOTAL = Counter(
    "gateway_spend_rebuilds_total",
    "Spend counters rebuilt from the ledger (outcome: rebuilt, failed).",
    ["outcome"],
    registry=REGISTRY,
)
UPSTREAM_POOL_READY = Gauge(
    "gateway_upstream_pool_ready",
    "Warm upstream sockets waiting in the pool (GATEWAY_UPSTREAM_POOL_SIZE per credential).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)

# Known label values start at 0, so `rate()` and `increase()` see the first event too.
ACCEPTED = WS_CONNECTIONS_TOTAL.labels(outcome="accepted")
for _reason in ("previous_response_not_found", "http_fallback"):
    UPSTREAM_RETRIES_TOTAL.labels(reason=_reason)
for _code in Code:
    ERRORS_TOTAL.labels(code=_code.value)
for _outcome in ("rebuilt", "failed"):
    SPEND_REBUILDS_TOTAL.labels(outcome=_outcome)

_Mode = Literal["livesum", "livemin"]
_ERROR_CODE = re.compile(r"^[a-z0-9_.]{1,64}$")
# Close codes RFC 6455 and IANA define; codes a peer picks (3000-4999) fold into two values.
_KNOWN_CLOSE_CODES = frozenset(range(1000, 1016))


class Tally:
    """Observations of one histogram added up where they happen, handed to it in one go.

    `Histogram.observe` takes a lock and walks the buckets in Python for every value: per
    forwarded event that was a few percent of the hot path. Here an observation is a C bisect
    and two additions to plain numbers; `fold` hands them to the histogram, which then holds
    exactly what observing each value would have left in it (tests/test_hot_path_parts.py).
    The histograms a turn observes each have one, made by `PENDING.tally` and folded in with
    the other pending figures (whenever the registry is read; with several workers at the end
    of the loop's round of callbacks after an `observe`).
    """

    __slots__ = ("_bounds", "_histogram", "counts", "total")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = histogram._upper_bounds
        self.counts = [0] * len(self._bounds)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self._bounds, value)] += times
        self.total += value * times
        if MULTIPROC_DIR is not None:
            PENDING.arm()

    def fold(self) -> None:
        """Add the tally to its histogram and start again from zero."""
        counts = self.counts
        if not any(counts):
            return
        histogram = self._histogram
        buckets = histogram._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        histogram._sum.inc(self.total)
        self.total = 0.0


# The histograms every turn observes. A turn's events' overhead goes straight into `OVERHEAD_TALLY`
# (`EventTally.forwarded`, per write, without arming a fold: the turn's end does, as it observes
# its duration).
TTFE_TALLY = PENDING.tally(TIME_TO_FIRST_EVENT)
DURATION_TALLY = PENDING.tally(RESPONSE_DURATION)
OVERHEAD_TALLY = PENDING.tally(OVERHEAD)


class EventTally:
    """One turn's events as the metrics and the ledger see them: how many reached the client,
    when the first came in (the time-to-first-event histogram, once), and each one's overhead
    (into `OVERHEAD_TALLY`). `forwarded` is the one place that counts an event, whichever path
    it took (the raw path per write, aiohttp's path per event)."""

    __slots__ = ("events", "first_event_at", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # time.perf_counter() when the turn was accepted
        self.first_event_at: float | None = None
        self.events = 0

    def forwarded(self, received: float, count: int = 1) -> None:
        """`count` events that came in at `received` (time.perf_counter()) were written."""
        if self.first_event_at is None:
            self.first_event_at = received
            TTFE_TALLY.observe(received - self.started)
        self.events += count
        spent = time.perf_counter() - received
        # `Tally.observe` inlined (on the raw path this runs once per write), without its arming.
        overhead = OVERHEAD_TALLY
        overhead.counts[bisect_left(overhead._bounds, spent)] += count
        overhead.total += spent * count


# Labelled children, looked up once per label set (`labels()` validates and locks each call).
# The label values are bounded already (models in the catalog, statuses, teams, kinds).
@lru_cache(maxsize=4096)
def responses(model: str, status: str) -> Counter:
    return RESPONSES_TOTAL.labels(model=model, status=status)


@lru_cache(maxsize=4096)
def tokens(model: str) -> tuple[Counter, Counter, Counter, Counter]:
    """The model's token counters, by kind: input, cached_input, output, reasoning."""
    return (
        TOKENS_TOTAL.labels(model=model, kind="input"),
        TOKENS_TOTAL.labels(model=model, kind="cached_input"),
        TOKENS_TOTAL.labels(model=model, kind="output"),
        TOKENS_TOTAL.labels(model=model, kind="reasoning"),
    )


@lru_cache(maxsize=4096)
def cost(team: str) -> Counter:
    return COST_USD_TOTAL.labels(team=team)


@lru_cache(maxsize=4096)
def budget_used(team: str, limit: str) -> Gauge:
    return BUDGET_USED_RATIO.labels(team=team, limit=limit)


def remove_budget_used(team: str, limit: str) -> None:
    """Drop a `gateway_budget_used_ratio` child (its limit is gone), with its pending value
    and the cached child, so a limit set again shows in a new one."""
    PENDING.sets.pop(budget_used(team, limit), None)
    BUDGET_USED_RATIO.remove(team, limit)
    budget_used.cache_clear()


@lru_cache(maxsize=1024)
def _error_child(code: str) -> Counter:
    return ERRORS_TOTAL.labels(code=code if _ERROR_CODE.match(code) else "other")


@lru_cache(maxsize=1024)
def _close_child(side: str, code: int | None) -> Counter:
    return WS_CLOSES_TOTAL.labels(side=side, code=close_code_label(code))


def count_error(code: str) -> None:
    """Count an error; a code an upstream made up (odd characters, very long) counts as `other`."""
    _error_child(str(code)).inc()


def close_code_label(code: int | None) -> str:
    if code is None:
        return "none"
    if code in _KNOWN_CLOSE_CODES:
        return str(code)
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def count_close(side: str, code: int | None) -> None:
    _close_child(side, code).inc()


# -- process metrics ------------------------------------------------------------------------------


class _MultiProcessSampler:
    """Each worker's process figures, kept in multiprocess gauges and a counter.

    prometheus-client's `ProcessCollector` reads /proc for the process that serves the scrape
    only; here every worker writes its own figures, and the scrape adds them up.
    """

    def __init__(self) -> None:
        self._source = ProcessCollector(registry=None)
        self._cpu_seen = 0.0
        self.resident = _live_gauge("process_resident_memory_bytes", "Resident memory size.")
        self.virtual = _live_gauge("process_virtual_memory_bytes", "Virtual memory size.")
        self.open_fds = _live_gauge("process_open_fds", "Open file descriptors.")
        self.max_fds = _live_gauge(
            "process_max_fds", "Maximum open file descriptors (per process).", "livemin"
        )
        self.start_time = _live_gauge(
            "process_start_time_seconds", "Start time of the oldest live worker.", "livemin"
        )
        self.cpu = Counter(
            "process_cpu_seconds", "User and system CPU time spent, all workers.", registry=REGISTRY
        )

    def sample(self) -> None:
        values = {
            sample.name: sample.value
            for family in self._source.collect()
            for sample in family.samples
        }
        gauges = {
            "process_resident_memory_bytes": self.resident,
            "process_virtual_memory_bytes": self.virtual,
            "process_open_fds": self.open_fds,
            "process_max_fds": self.max_fds,
            "process_start_time_seconds": self.start_time,
        }
        for name, gauge in gauges.items():
            if name in values:
                gauge.set(values[name])
        cpu = values.get("process_cpu_seconds_total")
        if cpu is not None and cpu > self._cpu_seen:
            self.cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu


def _live_gauge(name: str, documentation: str, mode: _Mode = "livesum") -> Gauge:
    return Gauge(name, documentation, registry=REGISTRY, multiprocess_mode=mode)


_SAMPLER: _MultiProcessSampler | None = None
if MULTIPROC_DIR is None:
    for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        REGISTRY.register(_collector)
else:
    _SAMPLER = _MultiProcessSampler()


def sample_process() -> None:
    """Several workers: record this worker's memory, CPU and descriptors (every few seconds)."""
    if _SAMPLER is not None:
        _SAMPLER.sample()


def _scrape_registry() -> CollectorRegistry:
    if MULTIPROC_DIR is None:
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=MULTIPROC_DIR)  # type: ignore[no-untyped-call]
    PlatformCollector(registry=registry)
    return registry


_SCRAPE = _scrape_registry()


def exposition() -> bytes:
    """The text `/metrics` serves: this process's metrics, or every worker's added up."""
    PENDING.fold()
    return generate_latest(_SCRAPE)
