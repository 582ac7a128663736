"""Budgets per API key: a key may spend at most `daily_credits` per UTC day and `monthly_credits` per UTC
calendar month (storage.tenants.ApiKey; NULL: no limit).

What a key has spent in a window is counted from the ledger: the usage entries carrying its id
(ledger_entries.api_key_id, written by the projector from UsageAllocated.api_key_id) whose usage
occurred in the window, plus the key's open holds (admitted requests whose usage is not folded yet), so
concurrent requests cannot pass together:

    spent(window) = usage entries of the key in the window + the key's open holds
    admit iff spent(window) + estimated_cost <= limit, for each window the key has a limit for

Fast mode (gateway.admission.fast) reads the entries' sums through `KeySpendReader` (cached per key for
`budget_spend_cache_ttl_ms`) and adds this process's holds of the key in the same synchronous step as the
hold it takes. Strict mode does it all in Postgres under the key's row lock (admission_reserve_key,
migration 0016), so holds of every gateway count.

A usage both projected and still held (its hold not yet settled) counts twice for a moment:
conservative. A usage folded (its hold dropped when the balance includes it) but not yet projected (the
projector writes the entry a moment later) keeps counting: the settled hold is kept as "unprojected",
with its usage entry's id, until a read of the key's spend finds that entry (fast mode: `KeySpendReader`;
strict mode: admission_key_unprojected, migration 0019), at most `UNPROJECTED_COUNTED_MAX_MS`. So a key
that sends request after request never runs past its budget by what the projector has not written yet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admission.base import Overloaded, Rejection
from gateway.admission.rate_limit import format_duration
from storage.admission import UNPROJECTED_COUNTED_MAX_MS

DAILY = "daily_credits"
MONTHLY = "monthly_credits"
KEY_SPEND_QUERY_TIMEOUT_MS = 2_000  # one read of a key's spend; beyond it the state is unavailable
KEY_SPEND_CACHE_ENTRIES_MAX = 100_000  # keys whose spend a fast-mode gateway remembers
UNPROJECTED_PER_KEY_MAX = 10_000  # settled usages awaiting projection a fast-mode gateway keeps per key

_SPEND = text("""
SELECT COALESCE(SUM(amount) FILTER (WHERE occurred_at_ms >= :day_start_ms), 0) AS daily,
       COALESCE(SUM(amount), 0) AS monthly,
       ARRAY(SELECT entry_id FROM ledger_entries WHERE entry_id = ANY(:unprojected)) AS projected
FROM ledger_entries
WHERE api_key_id = :api_key_id AND entry_type = 'usage_allocated' AND occurred_at_ms >= :month_start_ms
""")


@dataclass(frozen=True, slots=True)
class KeyBudget:
    """An API key's spend limits in credits; None: no limit in that window."""

    key_id: str
    daily_credits: int | None = None
    monthly_credits: int | None = None

    @property
    def limited(self) -> bool:
        return self.daily_credits is not None or self.monthly_credits is not None


@dataclass(frozen=True, slots=True)
class Windows:
    """The UTC day and calendar month around `now_ms`: their starts and the next resets, epoch ms."""

    day_start_ms: int
    day_end_ms: int
    month_start_ms: int
    month_end_ms: int

    @classmethod
    def at(cls, now_ms: int) -> Windows:
        now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        next_month = (
            month.replace(year=month.year + 1, month=1)
            if month.month == 12
            else month.replace(month=month.month + 1)
        )
        day_start_ms = int(day.timestamp() * 1000)
        return cls(
            day_start_ms=day_start_ms,
            day_end_ms=day_start_ms + 86_400_000,
            month_start_ms=int(month.timestamp() * 1000),
            month_end_ms=int(next_month.timestamp() * 1000),
        )


@dataclass(frozen=True, slots=True)
class KeySpend:
    """What a key has spent in its day and its month (usage entries plus open holds), in credits."""

    daily: int
    monthly: int

    def plus(self, held: int) -> KeySpend:
        return KeySpend(self.daily + held, self.monthly + held)


class KeyBudgetExceeded(Rejection):
    """OpenAI's quota error naming the budget (`param`: daily_credits or monthly_credits). Not retryable
    before the window resets (x-should-retry: false; retry-after says when it resets)."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "api_key_budget_exceeded"
    reason = "key_budget"

    def __init__(self, message: str, *, param: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers={**headers, "x-should-retry": "false"})
        self.param = param


class KeyBudgetUnavailable(Overloaded):
    """The state a budget is decided on could not be read: refused (fail closed), retryable."""

    reason = "key_budget_unavailable"


def budget_unavailable(budget: KeyBudget, why: str, retry_after_s: int) -> KeyBudgetUnavailable:
    return KeyBudgetUnavailable(
        f"The budget of API key {budget.key_id} could not be checked ({why}); the request is refused "
        "rather than admitted unchecked. Try again shortly.",
        headers={"retry-after": str(retry_after_s)},
    )


def budget_headers(budget: KeyBudget, spend: KeySpend, cost: int, now_ms: int) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-credits of the key's tighter window, after this request."""
    windows = Windows.at(now_ms)
    candidates = []
    if budget.daily_credits is not None:
        candidates.append(
            (budget.daily_credits - spend.daily - cost, budget.daily_credits, windows.day_end_ms)
        )
    if budget.monthly_credits is not None:
        candidates.append(
            (budget.monthly_credits - spend.monthly - cost, budget.monthly_credits, windows.month_end_ms)
        )
    assert candidates, f"key {budget.key_id} has no budget"
    remaining, limit, reset_at_ms = min(candidates)
    return {
        "x-ratelimit-limit-credits": str(limit),
        "x-ratelimit-remaining-credits": str(max(remaining, 0)),
        "x-ratelimit-reset-credits": format_duration(reset_at_ms - now_ms),
    }


def exceeded_window(budget: KeyBudget, spend: KeySpend, cost: int) -> str | None:
    """The first window (daily, then monthly) this request's cost would take past its limit; None: fits.
    A free request always fits."""
    if cost == 0:
        return None
    if budget.daily_credits is not None and spend.daily + cost > budget.daily_credits:
        return DAILY
    if budget.monthly_credits is not None and spend.monthly + cost > budget.monthly_credits:
        return MONTHLY
    return None


def budget_exceeded(
    budget: KeyBudget, window: str, spend: KeySpend, cost: int, now_ms: int
) -> KeyBudgetExceeded:
    windows = Windows.at(now_ms)
    if window == DAILY:
        limit, spent, period, reset_at_ms = budget.daily_credits, spend.daily, "daily", windows.day_end_ms
    else:
        limit, spent, period, reset_at_ms = (
            budget.monthly_credits,
            spend.monthly,
            "monthly",
            windows.month_end_ms,
        )
    assert limit is not None, f"{window} of key {budget.key_id} has no limit"
    headers = budget_headers(budget, spend, 0, now_ms)
    headers["retry-after"] = str(max(1, -(-(reset_at_ms - now_ms) // 1000)))
    return KeyBudgetExceeded(
        f"API key {budget.key_id} reached its {period} budget of {limit} credits ({window}): "
        f"{spent} spent or held, and this request may cost up to {cost}. It resets at "
        f"{datetime.fromtimestamp(reset_at_ms / 1000, tz=UTC).isoformat()}.",
        param=window,
        headers=headers,
    )


class KeySpendReader:
    """Fast mode's read of a key's usage entries in its windows, cached per key for `ttl_ms`. When the
    database does not answer, the last answer serves while it is younger than `stale_max_ms` (what the
    balance view allows for balances, view_staleness_max_ms); older, the budget is unavailable: fail
    closed."""

    def __init__(
        self, engine: AsyncEngine | None, ttl_ms: int, stale_max_ms: int, retry_after_s: int
    ) -> None:
        self.engine = engine
        self.ttl_ms = ttl_ms
        self.stale_max_ms = stale_max_ms
        self.retry_after_s = retry_after_s
        self._cache: dict[tuple[str, int, int], tuple[float, KeySpend]] = {}  # -> (read at, spend)
        # key id -> usage entry id -> (amount, settled at): folded, not yet seen projected
        self._unprojected: dict[str, dict[str, tuple[int, int]]] = {}

    def settled(self, key_id: str, entry_id: str, amount: int, now_ms: int) -> None:
        """A usage of the key was folded (its hold dropped): count it until its entry is read."""
        assert amount >= 0, f"a settled usage costs a non-negative amount, got {amount}"
        if amount == 0:
            return
        pending = self._unprojected.setdefault(key_id, {})
        pending[entry_id] = (amount, now_ms)
        if len(pending) > UNPROJECTED_PER_KEY_MAX:
            pending.pop(next(iter(pending)))

    def _unprojected_spend(self, key_id: str, windows: Windows, now_ms: int) -> KeySpend:
        pending = self._unprojected.get(key_id)
        if not pending:
            return KeySpend(0, 0)
        for entry_id, (_, settled_at) in list(pending.items()):
            if settled_at < now_ms - UNPROJECTED_COUNTED_MAX_MS:
                del pending[entry_id]
        daily = sum(amount for amount, at in pending.values() if at >= windows.day_start_ms)
        monthly = sum(amount for amount, at in pending.values() if at >= windows.month_start_ms)
        return KeySpend(daily, monthly)

    def _projected(self, key_id: str, entry_ids: list[str]) -> None:
        pending = self._unprojected.get(key_id)
        for entry_id in entry_ids:
            if pending is not None:
                pending.pop(entry_id, None)
        if pending is not None and not pending:
            del self._unprojected[key_id]

    async def spent(self, budget: KeyBudget, now_ms: int) -> KeySpend:
        """The key's usage entries in its windows (read, or cached) plus its usage folded but not yet
        projected."""
        windows = Windows.at(now_ms)
        entries = await self._entries_spent(budget, windows)
        unprojected = self._unprojected_spend(budget.key_id, windows, now_ms)
        return KeySpend(entries.daily + unprojected.daily, entries.monthly + unprojected.monthly)

    async def _entries_spent(self, budget: KeyBudget, windows: Windows) -> KeySpend:
        cache_key = (budget.key_id, windows.day_start_ms, windows.month_start_ms)
        cached = self._cache.get(cache_key)
        read_at = time.monotonic() * 1000
        if cached is not None and read_at - cached[0] < self.ttl_ms:
            return cached[1]
        if self.engine is None:
            raise budget_unavailable(
                budget, "this gateway has no database to count its usage", self.retry_after_s
            )
        try:
            async with (
                asyncio.timeout(KEY_SPEND_QUERY_TIMEOUT_MS / 1000),
                self.engine.connect() as connection,
            ):
                row = (
                    await connection.execute(
                        _SPEND,
                        {
                            "api_key_id": budget.key_id,
                            "day_start_ms": windows.day_start_ms,
                            "month_start_ms": windows.month_start_ms,
                            "unprojected": list(self._unprojected.get(budget.key_id, ())),
                        },
                    )
                ).one()
        except (TimeoutError, SQLAlchemyError, OSError) as error:
            if cached is not None and read_at - cached[0] < self.stale_max_ms:
                return cached[1]
            raise budget_unavailable(
                budget,
                f"its usage could not be read from the database: {type(error).__name__}",
                self.retry_after_s,
            ) from None
        spend = KeySpend(int(row.daily), int(row.monthly))
        self._projected(budget.key_id, row.projected)  # counted in the read from now on
        if len(self._cache) >= KEY_SPEND_CACHE_ENTRIES_MAX:
            self._cache.pop(next(iter(self._cache)))
        self._cache[cache_key] = (read_at, spend)
        return spend
