"""OpenTelemetry traces of the Responses API's path through the gateway: one trace per request, a root
span `responses.create` with child spans for the conversation service (`conversation.history`), the
input safety check (`safety.input`), the router (`router.route`), the prompt builder (`prompt.build`)
and the generation on a worker (`worker.generate`: admission, the worker's queue and prefill up to the
first token, then decoding to the end, with an event at the first token).

The root span carries the GenAI semantic conventions (`gen_ai.operation.name`, `gen_ai.request.model`,
`gen_ai.response.model`, `gen_ai.response.id`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
`gen_ai.response.finish_reasons`) and Tollgate's own: `tollgate.tenant_id`, `tollgate.request_id`,
`tollgate.model_version`, `tollgate.prompt_version`, `tollgate.safety.decision` (none, redact, block or
stop) and `tollgate.cost` (credit units, the usage price of the tokens). Never any text.

The completion routes (/v1/chat/completions, /v1/completions) are traced the same way when tracing is on:
a root span `chat.completions` or `completions` (operation `chat` or `text_completion`), ended when the
request is settled. The worker's spans (inference.worker: `worker.request` with `worker.queue`,
`worker.prefill`, `worker.decode`) join the trace: the gateway sends its span's W3C `traceparent` with the
generate call, and the worker's usage event carries the trace id (`UsageRecorded.trace_id`).

Off by default: with no `otlp_traces_endpoint` the OpenTelemetry API's tracer does nothing (no provider is
installed). Set it (e.g. http://collector:4318/v1/traces) and `configure_tracing` installs a provider that
batches spans to it over OTLP/HTTP. Tests install their own provider (an in-memory exporter).
"""

from __future__ import annotations

import contextlib

from opentelemetry import trace

from gateway.settings import GatewaySettings
from tollgate.tracing_setup import install_otlp_provider, tracing_enabled

TRACER_NAME = "tollgate.gateway"
SERVICE_NAME = "tollgate-gateway"

tracer = trace.get_tracer(TRACER_NAME)  # a proxy: follows whichever provider is installed, or none


def configure_tracing(settings: GatewaySettings) -> None:
    """Install the OTLP/HTTP exporting provider when `otlp_traces_endpoint` is set (once per process)."""
    install_otlp_provider(settings.otlp_traces_endpoint, SERVICE_NAME)


def traceparent_of(span: trace.Span) -> str | None:
    """`span`'s W3C `traceparent` (version 00), or None for a span that is not recording (tracing off)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class RequestTrace:
    """One request's spans: the root, a child per step (`step(name)`), and the generation's span from its
    start to its end; `end()` (idempotent) sets the root's outcome attributes and ends what is open."""

    def __init__(
        self, tenant_id: str, request_model: str, name: str = "responses.create", operation: str = "chat"
    ) -> None:
        # No provider installed (tracing off): every span is the invalid one, and nothing is built.
        self.enabled = tracing_enabled()
        self.generation: trace.Span | None = None
        self.safety_decision = "none"
        self._ended = False
        if not self.enabled:
            self.root = trace.INVALID_SPAN
            return
        self.root = tracer.start_span(
            name,
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": request_model,
                "tollgate.tenant_id": tenant_id,
            },
        )

    def step(self, name: str):
        """A child span of the root (a context manager), current while it runs."""
        if not self.enabled:
            return contextlib.nullcontext(trace.INVALID_SPAN)
        return tracer.start_as_current_span(name, context=trace.set_span_in_context(self.root))

    def start_generation(self, model: str, request_id: str) -> None:
        if not self.enabled:
            return
        self.generation = tracer.start_span(
            "worker.generate",
            context=trace.set_span_in_context(self.root),
            attributes={"gen_ai.response.model": model, "tollgate.request_id": request_id},
        )

    def traceparent(self) -> str | None:
        """The W3C trace context of the generation's span (the worker's spans are its children), or None
        when the request is not traced."""
        return traceparent_of(self.generation) if self.generation is not None else None

    def first_token(self) -> None:
        if self.generation is not None:
            self.generation.add_event("first_token")

    def end(self, attributes: dict, error: str | None = None) -> None:
        if self._ended or not self.enabled:
            return
        self._ended = True
        self.root.set_attributes({**attributes, "tollgate.safety.decision": self.safety_decision})
        if error is not None:
            self.root.set_status(trace.Status(trace.StatusCode.ERROR, error))
        if self.generation is not None:
            self.generation.end()
        self.root.end()
