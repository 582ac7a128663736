"""OpenTelemetry traces of the Responses API (gateway.tracing), read with an in-memory exporter: one trace
per request, the root span with the GenAI conventions and Tollgate's attributes (tenant, model version,
prompt version, safety decision, cost), a child span per step of the path; never any text."""

from __future__ import annotations

import asyncio

import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.settings import GatewaySettings
from inference.settings import WorkerSettings
from ledger.codec import encode_event
from ledger.events import CreditGranted
from ledger.pricing import usage_amount
from streams.fold_tracing import FoldSpans
from streams.processor import LedgerProcessor
from streams.projector import rows_of_batch
from streams.records import LogRecord
from tests.admin.conftest import TOPICS
from tests.audit.test_chain import DictState, policy
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)

pytestmark = pytest.mark.postgres

MODEL = "tollgate-tiny"
SPEC = WorkerSettings().models[MODEL]
STEPS = {"safety.input", "conversation.history", "router.route", "prompt.build", "worker.generate"}


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def gateway(worker, module_database_url, spans):
    settings = gateway_settings([worker.url], policy_cache_ttl_ms=0)
    running = start_gateway(module_database_url, settings, RecordingAdmission())
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def tenant(module_database_url):
    return insert_tenant_with_key(module_database_url, "tracing-acme")


@pytest.fixture
def client(gateway, tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


def trace_of(spans: InMemorySpanExporter, request_id: str) -> list:
    roots = [
        span
        for span in spans.get_finished_spans()
        if span.name == "responses.create" and span.attributes.get("tollgate.request_id") == request_id
    ]
    assert len(roots) == 1, [span.name for span in spans.get_finished_spans()]
    trace_id = roots[0].context.trace_id
    return [span for span in spans.get_finished_spans() if span.context.trace_id == trace_id]


def check_one_trace(spans_of_request: list, tenant_id: str, usage, response) -> dict:
    root = next(span for span in spans_of_request if span.name == "responses.create")
    children = [
        span for span in spans_of_request if span.parent and span.parent.span_id == root.context.span_id
    ]
    assert sorted(span.name for span in children) == sorted(STEPS)  # (FastAPI's own spans are its parents)
    attributes = dict(root.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.response.model"] == attributes["tollgate.model_version"] == MODEL
    assert attributes["gen_ai.response.id"] == response.id
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert (
        attributes["tollgate.cost"]
        == usage.amount
        == usage_amount(SPEC.price, usage.prompt_tokens, usage.completion_tokens)
    )
    assert attributes["tollgate.tenant_id"] == tenant_id
    generate = next(span for span in spans_of_request if span.name == "worker.generate")
    assert [event.name for event in generate.events] == ["first_token"]
    return attributes


async def test_a_response_is_one_trace_with_the_genai_attributes(client, spans, worker, tenant):
    response = await client.responses.create(model=MODEL, input="secret words", max_output_tokens=4)
    request_id = response.id.removeprefix("resp_")
    usage = worker.usage_of(request_id)
    attributes = check_one_trace(trace_of(spans, request_id), tenant.tenant_id, usage, response)
    assert attributes["tollgate.safety.decision"] == "none"
    assert attributes["tollgate.prompt_version"] == ""
    assert not any("secret words" in str(value) for value in attributes.values())


async def test_a_streamed_response_ends_its_trace_with_the_stream(client, spans, worker, tenant):
    stream = await client.responses.create(model=MODEL, input="Count", max_output_tokens=6, stream=True)
    events = [event async for event in stream]
    response = events[-1].response
    request_id = response.id.removeprefix("resp_")
    check_one_trace(trace_of(spans, request_id), tenant.tenant_id, worker.usage_of(request_id), response)


async def test_a_blocked_request_is_traced_as_blocked_without_a_generation(client, spans, gateway, tenant):
    import httpx

    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        admin.put(f"/admin/v1/tenants/{tenant.tenant_id}/policy", json={"safety": {"pii": ["email"]}})
    blocked_client = openai.AsyncOpenAI(api_key=client.api_key, base_url=gateway.url + "/v1", max_retries=0)
    spans.clear()
    try:
        with pytest.raises(openai.BadRequestError):
            await blocked_client.responses.create(model=MODEL, input="mail a@b.io", max_output_tokens=4)
    finally:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
            admin.put(f"/admin/v1/tenants/{tenant.tenant_id}/policy", json={})
    finished = spans.get_finished_spans()
    root = next(span for span in finished if span.name == "responses.create")
    assert root.attributes["tollgate.safety.decision"] == "block"
    assert root.status.status_code == trace.StatusCode.ERROR
    assert "worker.generate" not in {span.name for span in finished}


WORKER_STEPS = ["worker.queue", "worker.prefill", "worker.decode"]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_trace_goes_through_the_worker_and_the_usage_event_names_it(
    client, spans, worker, tenant, stream
):
    if stream:
        events = [
            event
            async for event in await client.responses.create(
                model=MODEL, input="Count", max_output_tokens=6, stream=True
            )
        ]
        response = events[-1].response
    else:
        response = await client.responses.create(model=MODEL, input="Count", max_output_tokens=6)
    request_id = response.id.removeprefix("resp_")
    usage = worker.usage_of(request_id)
    of_request = trace_of(spans, request_id)
    root = next(span for span in of_request if span.name == "responses.create")
    assert usage.trace_id == f"{root.context.trace_id:032x}"  # the usage event (and its entry) from the trace
    generate = next(span for span in of_request if span.name == "worker.generate")
    on_worker = next(span for span in of_request if span.name == "worker.request")
    assert on_worker.parent.span_id == generate.context.span_id  # the gateway's trace context, propagated
    assert on_worker.attributes["tollgate.request_id"] == request_id
    assert on_worker.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    steps = sorted(
        (span for span in of_request if span.parent and span.parent.span_id == on_worker.context.span_id),
        key=lambda span: span.start_time,
    )
    assert [span.name for span in steps] == WORKER_STEPS
    for earlier, later in zip(steps, steps[1:], strict=False):
        assert earlier.end_time <= later.start_time + 1_000  # one after the other (clock rounding aside)
    assert on_worker.start_time <= steps[0].start_time and steps[-1].end_time <= on_worker.end_time


@pytest.mark.parametrize(("chat", "stream"), [(True, False), (True, True), (False, False), (False, True)])
async def test_a_completion_route_is_one_trace_through_the_worker(
    client, spans, worker, tenant, chat, stream
):
    asked = dict(model=MODEL, max_tokens=4, temperature=0)
    if chat:
        create = client.chat.completions.with_raw_response.create
        asked["messages"] = [{"role": "user", "content": "secret words"}]
    else:
        create = client.completions.with_raw_response.create
        asked["prompt"] = "secret words"
    raw = await create(**asked, stream=stream)
    if stream:
        async for _chunk in raw.parse():
            pass
    request_id = raw.headers["x-request-id"]
    usage = worker.usage_of(request_id)
    name = "chat.completions" if chat else "completions"
    for _ in range(100):  # a stream's root span ends when it is settled, just after its last chunk
        roots = [
            span
            for span in spans.get_finished_spans()
            if span.name == name and span.attributes.get("tollgate.request_id") == request_id
        ]
        if roots:
            break
        await asyncio.sleep(0.02)
    (root,) = roots
    assert usage.trace_id == f"{root.context.trace_id:032x}"
    attributes = dict(root.attributes)
    assert attributes["gen_ai.operation.name"] == ("chat" if chat else "text_completion")
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert attributes["tollgate.cost"] == usage.amount
    assert attributes["tollgate.model_version"] == MODEL
    assert not any("secret words" in str(value) for value in attributes.values())
    of_trace = [span for span in spans.get_finished_spans() if span.context.trace_id == root.context.trace_id]
    on_worker = next(span for span in of_trace if span.name == "worker.request")
    assert on_worker.parent.span_id == root.context.span_id
    assert {span.name for span in of_trace} >= {name, "worker.request", *WORKER_STEPS}


def test_tracing_is_off_unless_an_endpoint_is_set():
    assert GatewaySettings(admin_token=ADMIN_TOKEN).otlp_traces_endpoint is None


async def test_the_fold_of_the_usage_event_ends_the_trace_whichever_the_projector_reads_first(
    client, spans, worker, tenant
):
    """The worker's usage event, folded by the processor and projected (its entry first, its event in a
    later batch): the projector's `ledger.fold` span is a child of the generation, in the same trace."""
    response = await client.responses.create(model=MODEL, input="Count", max_output_tokens=6)
    request_id = response.id.removeprefix("resp_")
    usage = worker.usage_of(request_id)
    generate = next(span for span in trace_of(spans, request_id) if span.name == "worker.generate")
    assert usage.parent_span_id == f"{generate.context.span_id:016x}"

    grant = CreditGranted(event_id="g", tenant_id=usage.tenant_id, grant_id="g", amount=10**9, effective_at=0)
    known, published = usage.occurred_at + 5, usage.occurred_at + 12
    key = usage.tenant_id.encode()
    events = [
        LogRecord(TOPICS.events, 0, 0, key, encode_event(grant), 1_000),
        LogRecord(TOPICS.events, 0, 1, key, encode_event(usage), known),
    ]
    folded = LedgerProcessor(DictState(), source_topic=TOPICS.events, checkpoints=policy()).process(0, events)
    entries = [
        LogRecord(TOPICS.entries, 0, offset, record.key, record.value, published)
        for offset, record in enumerate(folded.entries)
    ]
    fold_spans = FoldSpans()
    assert fold_spans.after_batch((), rows_of_batch(TOPICS, entries, 0).entries.values()) == 0, "no event yet"
    assert fold_spans.after_batch(rows_of_batch(TOPICS, events, 0).events.values(), ()) == 1

    (fold,) = [
        span
        for span in spans.get_finished_spans()
        if span.name == "ledger.fold" and span.attributes["tollgate.request_id"] == request_id
    ]
    assert fold.context.trace_id == generate.context.trace_id
    assert fold.parent.span_id == generate.context.span_id
    assert (fold.start_time, fold.end_time) == (known * 1_000_000, published * 1_000_000)
    assert fold.attributes["tollgate.cost"] == usage.amount > 0
    assert fold.attributes["tollgate.blocks"] == ("g",) and fold.attributes["tollgate.overage"] == 0
    assert fold.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
