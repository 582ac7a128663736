"""Admission settings from the environment (prefix TOLLGATE_ADMISSION_). Every limit has its unit last.

The tiers and their rate limits are shared facts (`tollgate.common_settings`, TOLLGATE_TIERS and
TOLLGATE_TIER_DEFAULT), inherited here, e.g.
    TOLLGATE_ADMISSION_MODE=strict
    TOLLGATE_TIERS='{"free": {"requests_per_minute": 20, "tokens_per_minute": 20000, "priority_level": 1}}'
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tollgate.common_settings import CommonSettings, TierLimits

__all__ = ["AdmissionSettings", "TierLimits"]


class AdmissionSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_ADMISSION_", env_nested_delimiter="__")

    # fast: reserve against this process's balance view (overspend bounded by the race between
    # processes); strict: reserve through the tenant's owner row in Postgres (never overspends).
    mode: Literal["fast", "strict"] = "fast"

    # Fast mode: how many gateway processes admit for the same tenants. Each may hold at most its share
    # (1/gateway_processes) of a tenant's spendable credit, plus one request when it holds nothing else:
    # overspend is then at most one request's maximum cost per gateway process. Set it to the number of
    # gateway replicas; 1 (a single gateway) keeps the whole balance spendable by that process.
    gateway_processes: int = Field(default=1, ge=1, le=1024)

    # A hold whose request never calls finish() or release() is dropped after this long.
    hold_timeout_ms: int = Field(default=15 * 60_000, ge=1)
    # A finished hold waits for its usage to be folded into the balance; dropped after this long anyway.
    settle_timeout_ms: int = Field(default=5 * 60_000, ge=1)
    # Open holds of one tenant in one process; beyond it admission answers 503 overloaded.
    tenant_holds_max: int = Field(default=10_000, ge=1)
    # How often timed-out holds are swept (they are also checked at each admission of their tenant).
    hold_sweep_interval_ms: int = Field(default=1_000, ge=1)

    # The balance view: admission answers 503 when it has not been caught up with the log for this long
    # (a view that falls behind would let a tenant spend credit the ledger already consumed).
    view_staleness_max_ms: int = Field(default=10_000, ge=1)
    # How often the view compares its position with the ends of the log (consumer lag, staleness).
    view_lag_check_interval_ms: int = Field(default=500, ge=1)
    # How long admit() waits for a view that is still reading the balances at start-up before a 503.
    view_ready_wait_ms: int = Field(default=2_000, ge=0)
    # Records per batch the view takes from each tail.
    view_batch_records_max: int = Field(default=1_000, ge=1, le=100_000)
    # Retry-After (seconds) when the view is not ready or stale.
    view_unavailable_retry_after_s: int = Field(default=1, ge=0)

    # Strict mode: one reservation transaction's budget (lock wait included); beyond it a 503.
    strict_transaction_timeout_ms: int = Field(default=5_000, ge=1)
    # Folded holds waiting to be deleted in Postgres (beyond it they are left to expire), and per batch.
    strict_settle_queue_max: int = Field(default=100_000, ge=1)
    strict_settle_batch_max: int = Field(default=500, ge=1)  # finished holds deleted per round trip

    # Budgets per API key, fast mode: a key's usage entries in its windows are read from Postgres at most
    # this often per key (strict mode reads them in every reservation). Its own holds count at once.
    budget_spend_cache_ttl_ms: int = Field(default=1_000, ge=0)
