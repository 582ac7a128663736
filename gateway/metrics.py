"""The gateway's Prometheus metrics, in a registry of its own (served at /metrics).

Admission's own collectors (open reservations, ledger consumer lag) are registered into the same
registry by `create_app(..., collectors=...)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self, collectors: Iterable[Collector] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.time_to_first_token = Histogram(
            "tollgate_gateway_time_to_first_token_seconds",
            "From the request's arrival to its first token leaving the gateway",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.worker_queue_time = Histogram(
            "tollgate_gateway_worker_queue_seconds",
            "From dispatch to a worker until its first event (the worker's queue wait and prefill)",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.request_duration = Histogram(
            "tollgate_gateway_request_duration_seconds",
            "From the request's arrival to its last byte",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tollgate_gateway_prompt_tokens", "Prompt tokens processed (tokens in)", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "tollgate_gateway_completion_tokens",
            "Completion tokens produced (tokens out)",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "tollgate_gateway_requests", "Requests answered, by outcome", ["model", "outcome"], registry=r
        )
        self.rejections = Counter(
            "tollgate_gateway_rejections",
            "Requests refused, by reason (the error code)",
            ["reason"],
            registry=r,
        )
        self.stream_disconnects = Counter(
            "tollgate_gateway_stream_disconnects",
            "Streams whose client went away before the end",
            ["model"],
            registry=r,
        )
        self.worker_retries = Counter(
            "tollgate_gateway_worker_retries", "Requests that needed more than one worker attempt", registry=r
        )
        self.idempotent_replays = Counter(
            "tollgate_gateway_idempotent_replays", "Responses answered from the idempotency store", registry=r
        )
        self.usage_publish_failures = Counter(
            "tollgate_gateway_usage_publish_failures",
            "UsageRecorded events the gateway had to publish for a broken worker stream and could not",
            registry=r,
        )
        # The Responses and Conversations APIs, the prompt builder and the safety checks (issue 19).
        self.safety_decisions = Counter(
            "tollgate_gateway_safety_decisions",
            "Safety findings acted on, by stage (input, output, moderation), reason and action",
            ["stage", "reason", "action"],
            registry=r,
        )
        self.responses = Counter(
            "tollgate_gateway_responses",
            "Responses API answers, by status (completed, incomplete, failed) and whether stored",
            ["status", "stored"],
            registry=r,
        )
        self.prompt_history_dropped = Counter(
            "tollgate_gateway_prompt_history_dropped",
            "History messages left out of prompts to fit the context (truncation: auto)",
            registry=r,
        )
        self.retention_deleted = Counter(
            "tollgate_gateway_retention_deleted",
            "Conversations and stored responses deleted by the retention sweep",
            ["kind"],
            registry=r,
        )
        self.routed_requests = Counter(
            "tollgate_gateway_routed_requests",
            "Requests routed by the model router, by alias, the version that served and its role",
            ["alias", "model", "role"],
            registry=r,
        )
        self.rollbacks = Counter(
            "tollgate_gateway_rollbacks",
            "Canary rollbacks, by alias and trigger",
            ["alias", "trigger"],
            registry=r,
        )
        self.fallbacks = Counter(
            "tollgate_gateway_fallbacks",
            "Requests that fell back from a model to the next of their fallback_models, and why",
            ["model", "fallback", "reason"],
            registry=r,
        )
        for collector in collectors:
            r.register(collector)
        self._of_model: dict[str, ModelMetrics] = {}

    def of_model(self, model: str) -> ModelMetrics:
        """The per-model children, resolved once per model (only served models reach here: a bounded set)."""
        children = self._of_model.get(model)
        if children is None:
            children = self._of_model[model] = ModelMetrics(self, model)
        return children


class ModelMetrics:
    """One model's labelled children of the gateway's metrics: `labels()` takes a lock and builds a key on
    every call, which a request would otherwise pay six times."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self.time_to_first_token = metrics.time_to_first_token.labels(model)
        self.worker_queue_time = metrics.worker_queue_time.labels(model)
        self.request_duration = {
            stream: metrics.request_duration.labels(model, str(stream).lower()) for stream in (True, False)
        }
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self.stream_disconnects = metrics.stream_disconnects.labels(model)
        self._requests_counter = metrics.requests
        self._model = model
        self._requests: dict[str, Counter] = {}

    def requests(self, outcome: str) -> Counter:
        child = self._requests.get(outcome)
        if child is None:
            child = self._requests[outcome] = self._requests_counter.labels(self._model, outcome)
        return child
