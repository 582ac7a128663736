"""The last hop of a request's trace: a span for the fold of its usage event.

A traced request's usage event names its trace and the span its generation ran under
(`UsageRecorded.trace_id`, `parent_span_id`: the gateway's `worker.generate`, whose children are the
worker's spans). The projector archives both `ledger.events` and `ledger.entries`; after each batch it
commits, it records one span `ledger.fold` per traced usage event whose entry it has seen: a child of that
span, from the event's knowledge time (when the log accepted it) to its entry's (when `ledger.entries`
accepted the entry), i.e. the time the usage waited for and spent in the fold, with the entry's outcome
(`tollgate.cost`, the credits drawn from blocks and the overage, the blocks that paid, the entry id).

Off the fold's hot path: the stream processor does nothing for it, and the projector only when tracing is
configured for it (`TOLLGATE_PROJECTOR_OTLP_TRACES_ENDPOINT`). The projector reads the two topics
independently, so an event and its entry may come in different batches: each waits for the other, at most
`FOLD_SPANS_PENDING_MAX` of each (the oldest dropped). A batch projected again after a crash records its
spans again (telemetry, not money: the ledger is exact either way).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import NamedTuple

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

TRACER_NAME = "tollgate.projector"
SPAN_NAME = "ledger.fold"
FOLD_SPANS_PENDING_MAX = 4_096  # traced events waiting for their entry, and usage entries for their event
NS_PER_MS = 1_000_000

_tracer = trace.get_tracer(TRACER_NAME)


class _TracedEvent(NamedTuple):
    trace_id: str
    parent_span_id: str
    known_at_ms: int


class _UsageEntry(NamedTuple):
    payload: dict
    known_at_ms: int


class FoldSpans:
    """Pairs traced usage events with their entries across the projector's batches; records the spans."""

    def __init__(self, pending_max: int = FOLD_SPANS_PENDING_MAX) -> None:
        assert pending_max >= 1, f"pending_max must be >= 1, got {pending_max}"
        self.pending_max = pending_max
        self._events: OrderedDict[str, _TracedEvent] = OrderedDict()
        self._entries: OrderedDict[str, _UsageEntry] = OrderedDict()
        self.recorded = 0

    def after_batch(self, event_rows: Iterable[dict], entry_rows: Iterable[dict]) -> int:
        """Take a committed batch's archived events and entries (streams.projector rows); spans recorded."""
        before = self.recorded
        for row in event_rows:
            payload = row["payload"]
            if row["event_type"] != "usage_recorded" or not payload.get("parent_span_id"):
                continue
            traced = _TracedEvent(payload["trace_id"], payload["parent_span_id"], _known_at(row))
            entry = self._entries.pop(row["event_id"], None)
            if entry is None:
                _bounded_put(self._events, row["event_id"], traced, self.pending_max)
            else:
                self._record(traced, entry)
        for row in entry_rows:
            if row["entry_type"] != "usage_allocated":
                continue
            entry = _UsageEntry(row["payload"], _known_at(row))
            traced = self._events.pop(entry.payload["event_id"], None)
            if traced is None:
                _bounded_put(self._entries, entry.payload["event_id"], entry, self.pending_max)
            else:
                self._record(traced, entry)
        return self.recorded - before

    def _record(self, traced: _TracedEvent, entry: _UsageEntry) -> None:
        payload = entry.payload
        parent = SpanContext(
            trace_id=int(traced.trace_id, 16),
            span_id=int(traced.parent_span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        allocations = payload["allocations"]
        span = _tracer.start_span(
            SPAN_NAME,
            context=trace.set_span_in_context(NonRecordingSpan(parent)),
            kind=SpanKind.CONSUMER,
            start_time=traced.known_at_ms * NS_PER_MS,
            attributes={
                "tollgate.tenant_id": payload["tenant_id"],
                "tollgate.request_id": payload["event_id"],
                "tollgate.entry_id": payload["entry_id"],
                "tollgate.cost": payload["amount"],
                "tollgate.overage": payload["overage"],
                "tollgate.blocks": [allocation[0] for allocation in allocations],
                "gen_ai.request.model": payload["model"],
                "gen_ai.usage.input_tokens": payload["prompt_tokens"],
                "gen_ai.usage.output_tokens": payload["completion_tokens"],
            },
        )
        span.end(end_time=max(entry.known_at_ms, traced.known_at_ms) * NS_PER_MS)
        self.recorded += 1


def _known_at(row: dict) -> int:
    """A row's knowledge time: the log's append time, else when it was archived."""
    return row["known_at_ms"] or row["recorded_at_ms"]


def _bounded_put(pending: OrderedDict, key: str, value, pending_max: int) -> None:
    pending[key] = value
    if len(pending) > pending_max:
        pending.popitem(last=False)
