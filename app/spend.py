"""Token and spend limits (CONTRACT.md §3 check 8, §4) and where a team stands (§5).

Counters, in Redis (app/keystore.py), in nano-USD (each response's cost rounded to the nearest
one, so sums are exact integers and a rebuilt counter equals the one it replaces):
- the key's spend today and the team's spend today and this month (UTC calendar periods), each
  expiring at its period's end;
- the key's tokens (`input + output`) per second over the last 60 s.

Judging a turn (`check`): without token or spend limits, the response window alone, as before
(one round trip for a few dozen turns of a busy key). With them, one round trip: the key's
script (responses per minute, tokens per minute, the key's spend today, in that order; the turn
counted in the window only if all pass) and a read of the team's two counters, sent together.
A turn the team's spend refuses is taken back out of the key's window.

Counting (`count`): when a response ends, its cost and tokens are queued, summed per key and per
team, and go to the counters that exist in front of this node's next judgment (in the same
Redis pipeline, before it: a node's own next turn sees them), or after COUNT_WAIT_SECONDS when
no judgment comes first. A limit is overshot by the responses already in flight and by those
whose counts are on their way (at most COUNT_WAIT_SECONDS and a round trip), never by more.
While Redis is away the counts wait (up to UNSENT_MAX) and are sent again.

Counters that are missing (the first turn of a day or month, a Redis restart or failover, a
flushed key) are rebuilt from the ledger before the turn is judged: the sum of the period's
`cost_usd` in Postgres, plus this node's rows not yet written (memory and spill), each row
counted once (`SpendSums` excludes their ids). A counter is only created by a rebuild (SET NX),
never by an increment, so an increment that finds it missing is dropped: its row is in the
ledger the rebuild reads. A rebuild first waits REBUILD_SETTLE_SECONDS, so other nodes' rows
reach Postgres. What it cannot see: rows another node still holds unwritten after that (Postgres
slow or down: that node's backlog), and responses that end during its query (milliseconds).

Postgres also down when a counter is missing: the turn is served (the limit fails open, as rate
limits do while Redis is away, CONTRACT.md §4), the counter stays missing, and a turn
REBUILD_RETRY_SECONDS later tries the rebuild again (the turns between fail open at once);
`gateway_spend_rebuilds_total{outcome="failed"}` counts the attempts and a warning is logged
once per team and day. A budget protects money, but a double outage of the two stores should
not stop every budgeted team's agents; the spend made meanwhile is in the ledger and counted by
the first rebuild after Postgres is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from app import metrics
from app.auth.principal import Principal
from app.errors import Code, GatewayError
from app.keystore import Judged, KeyStore
from app.ledger import Ledger, TurnRecord
from app.ledger.sums import SpendSums
from app.models import ApiKey, Limits, Team

log = logging.getLogger(__name__)

NANO = Decimal(1_000_000_000)
# Counts that could not be sent (Redis away) wait this long between tries, up to this many.
UNSENT_RETRY_SECONDS = 1.0
# How long a finished response's count waits for a judgment to ride with (a busy node sends a
# judgment within microseconds; the count saves its own Redis write) before it goes alone.
COUNT_WAIT_SECONDS = 0.005
UNSENT_MAX = 100_000
# A rebuild waits this long before it reads the ledger: every node's writer flushes its rows
# every 0.1 s, so rows other nodes still held when the counter went missing reach Postgres
# first (while Postgres keeps up).
REBUILD_SETTLE_SECONDS = 0.3
# A rebuild whose ledger query failed is not tried again for this long (the turns meanwhile fail
# open at once instead of each waiting on a Postgres that does not answer); the query itself
# gives up after REBUILD_TIMEOUT_SECONDS.
REBUILD_RETRY_SECONDS = 5.0
REBUILD_TIMEOUT_SECONDS = 2.0
DAY_LIMIT = "usd_per_day_per_team"
MONTH_LIMIT = "usd_per_month_per_team"
KEY_DAY_LIMIT = "usd_per_day_per_key"


def nano_usd(usd: Decimal | float) -> int:
    value = usd if isinstance(usd, Decimal) else Decimal(repr(usd))
    return int((value * NANO).to_integral_value(ROUND_HALF_UP))


@functools.lru_cache(maxsize=4096)
def cap_nano(cap: float) -> int:
    """A limit's USD cap in nano-USD: `nano_usd`, remembered (a team's caps are a few values
    read at every turn; Decimal arithmetic each time cost more than the rest of the check)."""
    return nano_usd(cap)


def usd(nano: int) -> float:
    """Nano-USD as USD to the micro-dollar (the contract's precision)."""
    return float((Decimal(nano) / NANO).quantize(Decimal("0.000001"), ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month a moment falls in, with their counters' name suffixes."""

    day: str  # "d20261206"
    month: str  # "m202612"
    day_start: datetime
    day_end: datetime
    month_start: datetime
    month_end: datetime

    @classmethod
    def at(cls, moment: datetime) -> Periods:
        moment = moment.astimezone(UTC)
        day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        month_start = day_start.replace(day=1)
        month_end = (month_start + timedelta(days=32)).replace(day=1)
        return cls(
            day=f"d{day_start:%Y%m%d}",
            month=f"m{month_start:%Y%m}",
            day_start=day_start,
            day_end=day_start + timedelta(days=1),
            month_start=month_start,
            month_end=month_end,
        )


def _entries(
    counts: Mapping[tuple[str, str, str, str], list[int]],
) -> list[tuple[str, str, str, str, int, int]]:
    """Queued counts as `KeyStore.add_spend` takes them."""
    return [(*name, nano, tokens) for name, (nano, tokens) in counts.items()]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def quota_error(
    what: str, limit_name: str, spent_nano: int, cap_usd: float, period: str, ends: datetime
) -> GatewayError:
    """`insufficient_quota`. Over HTTP it says not to retry (`x-should-retry: false`, which
    openai-python obeys; it retries any other 429) and when the period ends (`Retry-After`)."""
    wait = max(1, int((ends - datetime.now(UTC)).total_seconds()) + 1)
    return GatewayError(
        Code.INSUFFICIENT_QUOTA,
        f"{what} has spent ${usd(spent_nano):.6f} this {period}, at or over its "
        f"{limit_name} limit of ${cap_usd:.6f}; the {period} ends at {_rfc3339(ends)} (UTC).",
        headers={"x-should-retry": "false", "Retry-After": str(wait)},
    )


class SpendBook:
    """A node's (or a shell command's) view of the spend counters: judge, count, report."""

    def __init__(self, store: KeyStore, sums: SpendSums, ledger: Ledger | None = None) -> None:
        self.store = store
        self.sums = sums
        self.ledger = ledger  # this node's unwritten rows count in a rebuild; None in a shell
        # (key, team, day, month) -> [nano-USD, tokens] not yet sent
        self._counts: dict[tuple[str, str, str, str], list[int]] = {}
        self._unsent = 0
        self._sender: asyncio.Task[None] | None = None
        self._rebuilds: dict[tuple[str, ...], asyncio.Task[bool]] = {}
        self._failed_until: dict[tuple[str, ...], float] = {}  # job -> time.monotonic()
        self._periods = Periods.at(datetime.now(UTC))
        self._warned: set[tuple[str, str]] = set()
        # gateway_budget_used_ratio children set here, with the end of the period they show.
        self._gauges: dict[tuple[str, str], datetime] = {}
        self._limited: set[str] | None = None  # teams with a spend limit at the last view tick
        self._forgetting: set[asyncio.Task[None]] = set()

    def _periods_at(self, moment: datetime) -> Periods:
        """`Periods.at`, computed once a day (a turn needs its day's, almost always today's)."""
        periods = self._periods
        if periods.day_start <= moment < periods.day_end:
            return periods
        periods = Periods.at(moment)
        if moment >= self._periods.day_end:
            self._periods = periods
        return periods

    # -- check 8 ----------------------------------------------------------------------------------

    async def check(self, principal: Principal, team: Team | None) -> None:
        """Raise `rate_limit_exceeded` or `insufficient_quota` when a limit refuses the turn."""
        limits = team.limits if team is not None else Limits()
        if not limits.spend_limited:
            if not await self.store.allow_response(
                principal.key_id, limits.responses_per_minute_per_key
            ):
                raise GatewayError(Code.RATE_LIMIT_EXCEEDED)
            return
        assert team is not None
        if self._counts:
            self._queue_counts()  # in front of the judgment, in the same pipeline
        periods = self._periods_at(datetime.now(UTC))
        key_day_cap, team_day_cap, team_month_cap = (  # each remembered by its value
            cap_nano(limits.usd_per_day_per_key),
            cap_nano(limits.usd_per_day_per_team),
            cap_nano(limits.usd_per_month_per_team),
        )
        for attempt in (1, 2):
            try:
                judged = await self.store.judge_spend(
                    principal.key_id,
                    team.id,
                    responses=limits.responses_per_minute_per_key,
                    tokens=limits.tokens_per_minute_per_key,
                    key_day_cap=key_day_cap,
                    team_day_cap=team_day_cap,
                    team_month_cap=team_month_cap,
                    day=periods.day,
                    month=periods.month,
                )
            except GatewayError:
                return  # Redis away: limits fail open (CONTRACT.md §4)
            if judged.code == 1:
                raise GatewayError(Code.RATE_LIMIT_EXCEEDED)
            if judged.code == 2:
                raise GatewayError(
                    Code.RATE_LIMIT_EXCEEDED,
                    f"Rate limit exceeded: {judged.figure} tokens in the last minute, at or over "
                    f"this key's tokens_per_minute_per_key limit of "
                    f"{limits.tokens_per_minute_per_key}.",
                )
            if judged.code == 3:
                raise quota_error(
                    "This key",
                    KEY_DAY_LIMIT,
                    judged.figure,
                    limits.usd_per_day_per_key,
                    "day",
                    periods.day_end,
                )
            missing = self._missing(principal, team, periods, judged)  # codes 4 and 5
            if missing:
                if judged.code == 0 and judged.member is not None:
                    self.store.unjudge(principal.key_id, judged.member)
                if attempt == 1 and await self._rebuild(principal, team, periods, missing):
                    continue
                # Postgres away too (or the counter expired meanwhile): fail open, see above.
                if not await self.store.allow_response(
                    principal.key_id, limits.responses_per_minute_per_key
                ):
                    raise GatewayError(Code.RATE_LIMIT_EXCEEDED)
                return
            refusal = self._team_refusal(team, periods, judged.team_day, judged.team_month)
            if refusal is not None:
                if judged.member is not None:
                    self.store.unjudge(principal.key_id, judged.member)
                raise refusal
            return

    def _missing(
        self, principal: Principal, team: Team, periods: Periods, judged: Judged
    ) -> list[str]:
        names = []
        if judged.code == 4:  # the script stopped there: the team's figures may be unread
            names.append(self.store.key_spend(principal.key_id, periods.day))
        if team.limits.usd_per_day_per_team and judged.team_day is None:
            names.append(self.store.team_spend(team.id, periods.day))
        if team.limits.usd_per_month_per_team and judged.team_month is None:
            names.append(self.store.team_spend(team.id, periods.month))
        return names

    def _team_refusal(
        self, team: Team, periods: Periods, day: int | None, month: int | None
    ) -> GatewayError | None:
        limits = team.limits
        refusal = None
        for name, cap, spent, period, ends in (
            (DAY_LIMIT, limits.usd_per_day_per_team, day, "day", periods.day_end),
            (MONTH_LIMIT, limits.usd_per_month_per_team, month, "month", periods.month_end),
        ):
            if not cap or spent is None:
                continue
            cap_in_nano = cap_nano(cap)
            metrics.set_gauge(metrics.budget_used(team.id, name), spent / cap_in_nano)
            self._gauges[(team.id, name)] = ends
            if spent >= cap_in_nano and refusal is None:
                refusal = quota_error(f"Team {team.id!r}", name, spent, cap, period, ends)
        return refusal

    def on_view(self, teams: Mapping[str, Team]) -> None:
        """The node's view ticked (4 times a second). Gauges of periods that have ended are
        zeroed and those of limits that are gone dropped, so an alert does not fire on
        yesterday's spend; a team that has gained a spend limit since the last tick has its
        counters dropped, since nothing kept them while it had none."""
        now = datetime.now(UTC)
        for (team_id, name), ends in list(self._gauges.items()):
            team = teams.get(team_id)
            if team is None or not getattr(team.limits, name):
                metrics.remove_budget_used(team_id, name)
                del self._gauges[(team_id, name)]
            elif now >= ends:
                metrics.set_gauge(metrics.budget_used(team_id, name), 0)
                del self._gauges[(team_id, name)]
        limited = {team_id for team_id, team in teams.items() if team.limits.usd_limited}
        if self._limited is not None:
            for team_id in limited - self._limited:
                task = asyncio.create_task(self._forget(team_id), name=f"spend-forget-{team_id}")
                self._forgetting.add(task)
                task.add_done_callback(self._forgetting.discard)
        self._limited = limited

    async def _forget(self, team_id: str) -> None:
        periods = self._periods_at(datetime.now(UTC))
        try:
            keys = await self.store.list_keys(team_id)
            await self.store.drop_counters(
                [
                    self.store.team_spend(team_id, periods.day),
                    self.store.team_spend(team_id, periods.month),
                    *(self.store.key_spend(k.id, periods.day) for k in keys),
                ]
            )
        except GatewayError:
            log.warning("spend: could not drop team %s's old counters (Redis away)", team_id)

    # -- rebuilds ---------------------------------------------------------------------------------

    async def _rebuild(
        self, principal: Principal, team: Team, periods: Periods, names: list[str]
    ) -> bool:
        """Rebuild the missing counters `names`; one rebuild at a time per set of counters on
        this node, shared by the turns that find them missing together."""
        job = tuple(sorted(names))
        if time.monotonic() < self._failed_until.get(job, 0.0):
            return False
        task = self._rebuilds.get(job)
        if task is None:
            task = asyncio.create_task(self._rebuild_now(principal.key_id, team.id, periods, names))
            self._rebuilds[job] = task
            task.add_done_callback(lambda _: self._rebuilds.pop(job, None))
        done = await asyncio.shield(task)
        if done:
            self._failed_until.pop(job, None)
        else:
            self._failed_until[job] = time.monotonic() + REBUILD_RETRY_SECONDS
        return done

    async def _rebuild_now(
        self, key_id: str | None, team_id: str, periods: Periods, names: list[str]
    ) -> bool:
        keys = [key_id] if key_id and self.store.key_spend(key_id, periods.day) in names else []
        try:
            await asyncio.sleep(REBUILD_SETTLE_SECONDS)
            seeds = await self._ledger_figures(team_id, keys, periods)
            wanted = [s for s in seeds if s[0] in names]
            await self.store.seed_counters(wanted)
        except Exception as exc:  # Postgres (or Redis) away: the caller fails open
            metrics.SPEND_REBUILDS_TOTAL.labels(outcome="failed").inc()
            if (team_id, periods.day) not in self._warned:
                self._warned.add((team_id, periods.day))
                log.warning(
                    "spend: could not rebuild team %s's counters from the ledger (%s); its "
                    "spend limits fail open until it can",
                    team_id,
                    type(exc).__name__,
                )
            return False
        metrics.SPEND_REBUILDS_TOTAL.labels(outcome="rebuilt").inc(len(wanted))
        return True

    async def _ledger_figures(
        self, team_id: str, key_ids: list[str], periods: Periods
    ) -> list[tuple[str, int, int]]:
        """(counter, nano-USD, expiry ms) for the team's day and month and the keys' days."""
        unwritten = [
            row
            for row in (await self.ledger.unwritten_turns() if self.ledger else [])
            if row.cost_usd is not None
            and periods.month_start <= row.received_at < periods.month_end
            and (row.team_id == team_id or row.key_id in key_ids)
        ]
        exclude: list[uuid.UUID] = [row.row_id for row in unwritten]
        day, month = await self.sums.team(
            team_id, (periods.month_start, periods.month_end), periods.day_start, exclude
        )
        by_key = (
            await self.sums.keys(key_ids, (periods.day_start, periods.day_end), exclude)
            if key_ids
            else {}
        )
        for row in unwritten:
            assert row.cost_usd is not None
            cost = nano_usd(row.cost_usd)
            today = row.received_at >= periods.day_start
            if row.team_id == team_id:
                month += cost
                day += cost if today else 0
            if row.key_id in by_key and today:
                by_key[row.key_id] += cost
        day_end, month_end = _ms(periods.day_end), _ms(periods.month_end)
        seeds = [
            (self.store.team_spend(team_id, periods.day), day, day_end),
            (self.store.team_spend(team_id, periods.month), month, month_end),
        ]
        seeds += [(self.store.key_spend(k, periods.day), v, day_end) for k, v in by_key.items()]
        return seeds

    # -- counting ---------------------------------------------------------------------------------

    def count(self, turn: TurnRecord, limits: Limits | None) -> None:
        """A finished response's cost and tokens, on their way to the counters. Never blocks.

        Only what a limit of the team reads is counted: tokens with a token limit, cost with a
        spend limit (a team without limits costs Redis nothing here). A team that gains a spend
        limit has its counters dropped (`on_view`), so they are rebuilt from the ledger rather
        than read as they were when it last had one; a token limit set again counts from then
        (its window is a minute)."""
        if limits is None:
            return
        tokens = (
            (turn.input_tokens or 0) + (turn.output_tokens or 0)
            if limits.tokens_per_minute_per_key
            else 0
        )
        cost = nano_usd(turn.cost_usd) if turn.cost_usd is not None and limits.usd_limited else 0
        if not tokens and not cost:
            return
        periods = self._periods_at(turn.received_at)
        name = (turn.key_id, turn.team_id, periods.day, periods.month)
        entry = self._counts.get(name)
        if entry is None:
            self._counts[name] = [cost, tokens]
        else:
            entry[0] += cost
            entry[1] += tokens
        self._unsent += 1
        if self._sender is None:
            self._sender = asyncio.create_task(self._send(), name="spend-counts")

    async def _send(self) -> None:
        """The counts no judgment took along, after COUNT_WAIT_SECONDS."""
        try:
            while self._counts:
                await asyncio.sleep(COUNT_WAIT_SECONDS)
                if self._counts and not await self._queue_counts():
                    await asyncio.sleep(UNSENT_RETRY_SECONDS)
        finally:
            self._sender = None

    def _queue_counts(self) -> asyncio.Future[bool]:
        """The queued counts into the Redis batch now (before any call made after this); the
        future: whether they were counted (on an error they are queued again)."""
        counts, self._counts = self._counts, {}
        unsent, self._unsent = self._unsent, 0
        sent = self.store.queue_spend(_entries(counts))
        done: asyncio.Future[bool] = sent.get_loop().create_future()

        def settled(future: asyncio.Future[Any]) -> None:
            failed = future.cancelled() or future.exception() is not None
            if failed:
                self._requeue(counts, unsent)
                if self._sender is None and self._counts:
                    self._sender = asyncio.create_task(self._send(), name="spend-counts")
            done.set_result(not failed)

        sent.add_done_callback(settled)
        return done

    def _requeue(self, counts: dict[tuple[str, str, str, str], list[int]], unsent: int) -> None:
        if self._unsent + unsent > UNSENT_MAX:
            log.error("spend: Redis away, %d response counts dropped", unsent)
            return
        for name, (nano, tokens) in counts.items():
            entry = self._counts.setdefault(name, [0, 0])
            entry[0] += nano
            entry[1] += tokens
        self._unsent += unsent

    async def flush(self) -> None:
        """Send what is queued (at shutdown), once."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, GatewayError):
                await self._sender
        counts, self._counts = self._counts, {}
        if counts:
            with contextlib.suppress(GatewayError):
                await self.store.add_spend(_entries(counts))

    # -- where a team stands ----------------------------------------------------------------------

    async def report(self, team: Team, keys: Iterable[ApiKey]) -> dict[str, Any]:
        """`GET /admin/v1/teams/{id}/spend` (CONTRACT.md §5): the counters check 8 reads, rebuilt
        from the ledger first where missing. A team without a spend limit has no counters kept
        (`count`): its figures come from the ledger (and this node's unwritten rows), and no
        counter is created for them."""
        periods = Periods.at(datetime.now(UTC))
        key_list = list(keys)
        names = [
            self.store.team_spend(team.id, periods.day),
            self.store.team_spend(team.id, periods.month),
            *(self.store.key_spend(k.id, periods.day) for k in key_list),
        ]
        if not team.limits.usd_limited:
            seeds = await self._ledger_figures(team.id, [k.id for k in key_list], periods)
            found = {name: value for name, value, _expiry in seeds}
            values: list[int | None] = [found.get(n, 0) for n in names]
        else:
            values = await self.store.read_counters(names)
            if any(v is None for v in values):
                missing = [n for n, v in zip(names, values, strict=True) if v is None]
                seeds = await self._ledger_figures(team.id, [k.id for k in key_list], periods)
                await self.store.seed_counters([s for s in seeds if s[0] in missing])
                values = await self.store.read_counters(names)
        figures = [v or 0 for v in values]
        limits = team.limits

        def period(start: datetime, end: datetime, nano: int, cap: float) -> dict[str, Any]:
            return {
                "start": _rfc3339(start),
                "end": _rfc3339(end),
                "usd": usd(nano),
                "limit": cap or None,
            }

        day = (periods.day_start, periods.day_end)
        return {
            "object": "team.spend",
            "team_id": team.id,
            "day": period(*day, figures[0], limits.usd_per_day_per_team),
            "month": period(
                periods.month_start, periods.month_end, figures[1], limits.usd_per_month_per_team
            ),
            "keys": [
                {
                    "id": key.id,
                    "prefix": key.prefix,
                    "day": period(*day, nano, limits.usd_per_day_per_key),
                }
                for key, nano in zip(key_list, figures[2:], strict=True)
            ],
        }

    async def close(self) -> None:
        await self.flush()
        await self.sums.close()
