"""Builders for the admission tests: balance and usage records as the processor and workers write them,
a view fed by hand, a clock the test moves, and admission requests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry

from gateway.admission.base import AdmissionRequest
from gateway.admission.metrics import AdmissionMetrics
from gateway.ledger_view import LedgerView
from ledger.codec import encode_event
from ledger.events import UsageRecorded
from streams.records import BalanceRecord, LogRecord, partition_for_key
from streams.settings import StreamSettings
from streams.topics import LedgerTopics

PARTITIONS = 3
TOPICS = LedgerTopics.from_settings(StreamSettings(topic_prefix="unit."))
START_MS = 1_800_000_000_000

_balance_offsets = itertools.count()


@dataclass
class ManualClock:
    now_ms: int = START_MS

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def partition_of(tenant_id: str) -> int:
    return partition_for_key(tenant_id.encode(), PARTITIONS)


def new_metrics() -> AdmissionMetrics:
    return AdmissionMetrics(CollectorRegistry())


def new_view(metrics: AdmissionMetrics | None = None) -> LedgerView:
    return LedgerView(TOPICS, PARTITIONS, metrics=metrics or new_metrics())


def balance_record(
    tenant_id: str,
    balance: int,
    applied_offset: int,
    *,
    as_of: int = START_MS,
    expiring: tuple[tuple[int, int], ...] = (),
    offset: int | None = None,
) -> LogRecord:
    value = msgspec.json.encode(
        BalanceRecord(
            tenant_id=tenant_id,
            balance=balance,
            overage=0,
            as_of=as_of,
            applied_offset=applied_offset,
            expiring=expiring,
        )
    )
    offset = next(_balance_offsets) if offset is None else offset
    return LogRecord(TOPICS.balances, partition_of(tenant_id), offset, tenant_id.encode(), value, START_MS)


def usage_record(tenant_id: str, request_id: str, amount: int, offset: int) -> LogRecord:
    event = UsageRecorded(
        event_id=request_id, tenant_id=tenant_id, amount=amount, occurred_at=START_MS, model="m"
    )
    return LogRecord(
        TOPICS.events, partition_of(tenant_id), offset, tenant_id.encode(), encode_event(event), START_MS
    )


def mark_caught_up(view: LedgerView, at_ms: int) -> None:
    """Tell the view the log ends where it has read (as the feed's end-offset check would)."""
    view.note_end_offsets(at_ms, view.balance_positions(), dict.fromkeys(range(PARTITIONS), 0))


def admission_request(
    request_id: str,
    *,
    tenant_id: str = "acme",
    cost: int = 100,
    tier: str = "enterprise",
    prompt_tokens: int = 10,
    max_tokens: int = 20,
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        tier=tier,
        model="m",
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        estimated_cost=cost,
    )
