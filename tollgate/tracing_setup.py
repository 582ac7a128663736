"""Installs the OpenTelemetry provider that exports a process's spans over OTLP/HTTP, once per process.

Each component that traces (the gateway, the inference worker, the projector) has its own endpoint setting
and service name and calls `install_otlp_provider` at start; with no endpoint nothing is installed, the
API's tracer stays the no-op proxy and spans cost nothing.
"""

from __future__ import annotations

from opentelemetry import trace


def install_otlp_provider(endpoint: str | None, service_name: str) -> None:
    if endpoint is None:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)


def tracing_enabled() -> bool:
    """Whether a tracer provider is installed (by `install_otlp_provider`, or a test's)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
