"""Gateway settings from the environment (prefix TOLLGATE_GATEWAY_). Every limit is named with its unit last.

The shared facts (environment, admin token, tiers, the model registry) come from
`tollgate.common_settings.CommonSettings` (TOLLGATE_<NAME>), which this class inherits. The served models,
their limits, tokenizers and prices are the model registry's (`settings.models`, inference.registry):
the same entries the workers load and bill with.

List-valued settings are JSON in the environment, e.g.
    TOLLGATE_GATEWAY_WORKER_URLS='["http://127.0.0.1:8100", "http://127.0.0.1:8101"]'
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from tollgate.common_settings import CommonSettings


class GatewaySettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_GATEWAY_", env_nested_delimiter="__")

    host: str = "127.0.0.1"  # the address the gateway listens on
    port: int = Field(default=8000, ge=1, le=65535)  # the gateway port (OpenAI routes, admin API, /metrics)
    # SO_REUSEPORT: several gateway processes on this host share the port (one per core)
    reuse_port: bool = False
    event_log: Literal["kafka", "embedded"] = "kafka"  # embedded: the Postgres-backed log (no broker)

    # the inference workers (JSON list of base URLs)
    worker_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8100"], min_length=1)

    # Request limits (each refusal is a 400 naming the param).
    body_bytes_max: int = Field(default=1024 * 1024, ge=1024)
    messages_max: int = Field(default=256, ge=1)  # chat messages one request may hold
    prompt_chars_max: int = Field(default=65536, ge=1)  # the rendered prompt (the worker refuses more)
    stop_sequences_max: int = Field(default=3, ge=0)  # the worker takes 4; chat adds its own turn stop
    stop_sequence_chars_max: int = Field(default=64, ge=1)  # characters of one stop sequence
    idempotency_key_chars_max: int = Field(default=255, ge=1)  # characters of an Idempotency-Key header

    # Talking to workers.
    worker_connect_timeout_ms: int = Field(default=3000, ge=1)  # connecting, or waiting for a free connection
    worker_read_timeout_ms: int = Field(default=30_000, ge=1)  # the longest wait for one worker event
    request_timeout_ms: int = Field(default=120_000, ge=1)  # a request's whole budget, retries included
    worker_attempts_max: int = Field(default=3, ge=1)  # tries before the first token, across workers
    worker_connections_max: int = Field(default=512, ge=1)  # open connections per worker, idle ones included
    # below the worker's keep-alive (uvicorn: 5 s)
    worker_keepalive_expiry_ms: int = Field(default=3_000, ge=1)
    # one NDJSON line (or refusal body) from a worker
    worker_event_bytes_max: int = Field(default=64 * 1024, ge=256)
    worker_response_head_bytes_max: int = Field(default=16 * 1024, ge=256)  # a worker response's headers
    breaker_failures_max: int = Field(default=5, ge=1)  # consecutive failures that open a worker's breaker
    breaker_open_ms: int = Field(default=5_000, ge=1)  # how long an open breaker refuses before one trial
    overloaded_retry_after_s: int = Field(default=1, ge=0)  # Retry-After when every worker is full

    # Auth.
    auth_cache_ttl_ms: int = Field(default=5_000, ge=0)  # a revoked key keeps working at most this long
    auth_cache_entries_max: int = Field(default=100_000, ge=1)  # API keys the authentication cache holds

    # Idempotency.
    idempotency_timeout_ms: int = Field(default=5_000, ge=1)  # each store round trip

    # Billing what a worker could not (it died mid-stream, or said it could not record the usage).
    usage_publish_timeout_ms: int = Field(default=5_000, ge=1)  # one UsageRecorded publish to the event log

    # The Responses and Conversations APIs (gateway.responses, gateway.conversations, gateway.safety).

    # a change of a tenant's retention or safety policy applies within this
    policy_cache_ttl_ms: int = Field(default=5_000, ge=0)
    retention_sweep_interval_ms: int = Field(default=60_000, ge=1)  # how often expired stored text is deleted
    retention_sweep_batch_max: int = Field(default=1_000, ge=1)  # rows of each kind one sweep deletes
    # streamed output held back for the safety check (a finding up to this long is always caught)
    safety_output_holdback_chars: int = Field(default=64, ge=0)

    # The model router (gateway.router): versions, canary and rollback.

    # a version's own workers (JSON: registry entry -> base URLs); a version not named uses worker_urls
    model_worker_urls: dict[str, list[str]] = Field(default_factory=dict)
    route_cache_ttl_ms: int = Field(default=1_000, ge=0)  # a promotion or rollback applies within this
    rollout_window_ms: int = Field(default=300_000, ge=1)  # the window a canary is compared over
    # requests each version needs in the window before the automatic rollback judges
    rollout_window_requests_min: int = Field(default=50, ge=1)
    # the canary's error rate may exceed the stable version's by this many percentage points
    rollout_error_rate_margin_percent: int = Field(default=5, ge=0, le=100)
    # the canary's time-to-first-token p99 may exceed the stable version's by this much
    rollout_ttft_p99_margin_ms: int = Field(default=500, ge=0)
    # how often a gateway shares its canary outcomes and judges over every gateway's (0: at every request)
    rollout_share_interval_ms: int = Field(default=1_000, ge=0)
    # how often the router's pools read each worker's queue depth from its /health (gateway.balancer)
    worker_load_poll_interval_ms: int = Field(default=500, ge=10)
    # OTLP/HTTP endpoint the gateway's traces go to (gateway.tracing); unset: tracing is off
    otlp_traces_endpoint: str | None = None
    # the tenant eval traffic is admitted and billed to (gateway.eval_gate)
    eval_tenant_id: str = "tollgate-eval"
    # a canary is promoted only when its eval score is at most this many points below the stable one's
    eval_margin_percent: int = Field(default=5, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        # The production start-up check: the mounted admin API is never served without a usable token.
        problem = self.admin_token_problem()
        if problem is not None:
            raise ValueError(problem)
        return self
