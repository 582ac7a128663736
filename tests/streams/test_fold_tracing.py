"""streams.fold_tracing: a traced usage event and its entry pair up in either order, across batches; an
untraced one keeps nothing; what waits for its other half is bounded."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streams.fold_tracing import FoldSpans

TRACE_ID, SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def event_row(request_id: str, traced: bool = True) -> dict:
    payload = {"type": "usage_recorded", "event_id": request_id}
    if traced:
        payload |= {"trace_id": TRACE_ID, "parent_span_id": SPAN_ID}
    return {
        "event_id": request_id,
        "event_type": "usage_recorded",
        "payload": payload,
        "known_at_ms": 1_000,
        "recorded_at_ms": 9_999,
    }


def entry_row(request_id: str) -> dict:
    payload = {
        "type": "usage_allocated",
        "entry_id": f"usage/{request_id}",
        "tenant_id": "acme",
        "event_id": request_id,
        "model": "tollgate-tiny",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "amount": 70,
        "allocations": [["g1", 50], ["g2", 20]],
        "overage": 0,
    }
    return {"entry_type": "usage_allocated", "payload": payload, "known_at_ms": None, "recorded_at_ms": 1_040}


def folds_of(spans: InMemorySpanExporter, request_id: str) -> list:
    return [
        span
        for span in spans.get_finished_spans()
        if span.name == "ledger.fold" and span.attributes["tollgate.request_id"] == request_id
    ]


def test_an_event_and_its_entry_pair_up_in_either_order(spans):
    fold_spans = FoldSpans()
    assert fold_spans.after_batch([event_row("r1")], []) == 0
    assert fold_spans.after_batch([], [entry_row("r1")]) == 1
    assert fold_spans.after_batch([], [entry_row("r2")]) == 0
    assert fold_spans.after_batch([event_row("r2")], [entry_row("r3")]) == 1
    (fold,) = folds_of(spans, "r1")
    assert f"{fold.context.trace_id:032x}" == TRACE_ID and f"{fold.parent.span_id:016x}" == SPAN_ID
    assert fold.parent.is_remote
    # from the event's knowledge time to the entry's (its archive time when the log gave none)
    assert (fold.start_time, fold.end_time) == (1_000 * 1_000_000, 1_040 * 1_000_000)
    assert fold.attributes["tollgate.blocks"] == ("g1", "g2") and fold.attributes["tollgate.cost"] == 70
    assert len(folds_of(spans, "r2")) == 1 and not folds_of(spans, "r3")


def test_an_untraced_event_keeps_nothing_and_what_waits_is_bounded(spans):
    fold_spans = FoldSpans(pending_max=2)
    assert fold_spans.after_batch([event_row("u1", traced=False)], []) == 0
    assert fold_spans.after_batch([event_row(f"w{n}") for n in range(3)], []) == 0  # w0 dropped: oldest
    assert fold_spans.after_batch([], [entry_row("w0"), entry_row("w1"), entry_row("w2")]) == 2
    assert not folds_of(spans, "w0") and not folds_of(spans, "u1")
    with pytest.raises(AssertionError):
        FoldSpans(pending_max=0)
