"""Responses API layers benchmark: `python -m bench.responses` prints one JSON line.

What it measures, in one process, per request of the Responses path (no worker, no database: the
gateway-side CPU each layer adds on top of a completion):

    tracing_off_us / tracing_on_us  one request's spans (root, four steps, the generation span, its
                                    first-token event, the end with the GenAI and Tollgate attributes):
                                    with no provider installed (the default: the API's no-op tracer),
                                    and with the SDK's provider and a batch processor whose exporter
                                    drops the spans (what an OTLP export costs the request thread,
                                    before the network)
    safety_input_us_per_kib         the input check of a policy with terms, a pattern and every PII
                                    kind over 1 KiB of prose with a few findings
    safety_output_us_per_token      the streaming output guard (hold-back, rescans) per 4-character token
    prompt_build_ms                 the prompt builder over a 40-turn history that must be truncated
                                    (truncation auto: a binary search of renders and token counts)

Each figure is the median of `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from gateway.prompt_builder import build_prompt
from gateway.safety import OutputGuard, SafetyPolicy, Scanner
from gateway.tracing import RequestTrace
from inference.registry import DEFAULT_MODEL_NAME, DEFAULT_REGISTRY

POLICY = SafetyPolicy(
    blocked_terms=["project x", "codename"],
    blocked_patterns=[r"\bzz\d+\b"],
    pii=["email", "phone", "card", "iban"],
)
PROSE = (
    "The quarterly report was sent to ann.lee@example.org on Tuesday; questions go to +44 20 7946 0958. "
    "Payments used card 4111 1111 1111 1111 and the account DE89 3704 0044 0532 0130 00. "
    "Everything else in this paragraph is ordinary text about shipping schedules, weather and lunch. "
)


class DroppingExporter(SpanExporter):
    def export(self, spans) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def one_trace() -> None:
    request_trace = RequestTrace("tenant-1", DEFAULT_MODEL_NAME)
    for step in ("safety.input", "conversation.history", "router.route", "prompt.build"):
        with request_trace.step(step):
            pass
    request_trace.start_generation(DEFAULT_MODEL_NAME, "0123456789abcdef")
    request_trace.first_token()
    request_trace.end(
        {
            "gen_ai.response.model": DEFAULT_MODEL_NAME,
            "gen_ai.response.id": "resp_0123456789abcdef",
            "gen_ai.usage.input_tokens": 20,
            "gen_ai.usage.output_tokens": 30,
            "gen_ai.response.finish_reasons": ["completed"],
            "tollgate.request_id": "0123456789abcdef",
            "tollgate.model_version": DEFAULT_MODEL_NAME,
            "tollgate.prompt_version": "",
            "tollgate.cost": 80,
        }
    )


def per_call_us(function, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--traces", type=int, default=5_000)
    arguments = parser.parse_args()

    tracing_off = [per_call_us(one_trace, arguments.traces) for _ in range(arguments.rounds)]
    provider = TracerProvider()
    processor = BatchSpanProcessor(DroppingExporter(), max_queue_size=65_536)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    tracing_on = [per_call_us(one_trace, arguments.traces) for _ in range(arguments.rounds)]
    processor.shutdown()

    scanner = Scanner(POLICY)
    kib = (PROSE * 8)[:1024]
    safety_input = [per_call_us(lambda: scanner.scan(kib), 500) for _ in range(arguments.rounds)]
    text = PROSE * 4
    tokens = [text[start : start + 4] for start in range(0, len(text), 4)]

    def guard_stream() -> None:
        guard = OutputGuard(scanner, 64)
        for token in tokens:
            guard.feed(token)
        guard.flush()

    safety_output = [per_call_us(guard_stream, 20) / len(tokens) for _ in range(arguments.rounds)]

    spec = DEFAULT_REGISTRY.by_name()[DEFAULT_MODEL_NAME]
    history = []
    for index in range(40):
        history.append({"role": "user", "content": f"Question {index}: what happened on day {index}?"})
        history.append({"role": "assistant", "content": f"On day {index} the ship sailed north."})
    new_input = [{"role": "user", "content": "And on the last day?"}]
    prompt_build = [
        per_call_us(lambda: build_prompt(spec, "Be brief.", history, new_input, 16, "auto", 65_536), 20)
        / 1000
        for _ in range(arguments.rounds)
    ]
    print(
        json.dumps(
            {
                "bench": "responses",
                "tracing_off_us": round(statistics.median(tracing_off), 2),
                "tracing_on_us": round(statistics.median(tracing_on), 2),
                "safety_input_us_per_kib": round(statistics.median(safety_input), 1),
                "safety_output_us_per_token": round(statistics.median(safety_output), 2),
                "prompt_build_ms": round(statistics.median(prompt_build), 3),
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
