"""The webhook dispatcher's settings: environment prefix `TOLLGATE_WEBHOOK_`."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WebhookSettings(BaseSettings):
    """The retry schedule (exponential backoff with full jitter, for a bounded time) and the limits."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_WEBHOOK_", extra="ignore")

    # the longest wait before the second attempt; each later one doubles, up to retry_delay_max_ms
    first_retry_delay_ms: int = Field(default=5_000, ge=1, le=3_600_000)
    retry_delay_max_ms: int = Field(default=3_600_000, ge=1, le=86_400_000)  # the cap of one wait
    # no attempt starts later than this after the alert was scheduled: the delivery is then dead-lettered
    give_up_after_ms: int = Field(default=86_400_000, ge=1, le=30 * 86_400_000)
    request_timeout_ms: int = Field(default=10_000, ge=1, le=120_000)  # one POST, connect to last byte
    in_flight_deliveries_max: int = Field(default=64, ge=1, le=10_000)  # POSTs in flight, all endpoints
    endpoint_in_flight_max: int = Field(default=4, ge=1, le=1_000)  # POSTs in flight to one endpoint
    alert_batch_max: int = Field(default=500, ge=1, le=5_000)  # alerts read per partition per step
    # Kafka: between looks for new alerts when idle
    poll_interval_ms: int = Field(default=500, ge=1, le=60_000)
    # the embedded log (which wakes it on appends): the longest idle wait; a due retry ends it sooner
    idle_recheck_ms: int = Field(default=5_000, ge=1, le=600_000)
    consumer_name: str = Field(default="webhook-dispatcher", min_length=1, max_length=128)  # its offsets' key
    # attempts older than this leave the delivery log (each delivery's row, its final state, stays: it is
    # what keeps a redelivered alert from being sent again)
    delivery_log_retention_ms: int = Field(default=30 * 86_400_000, ge=60_000)

    @model_validator(mode="after")
    def _delays_ordered(self) -> WebhookSettings:
        if self.first_retry_delay_ms > self.retry_delay_max_ms:
            raise ValueError("first_retry_delay_ms must be at most retry_delay_max_ms")
        return self

    @property
    def lease_ms(self) -> int:
        """How long a claimed delivery stays leased: one request and a margin to record it."""
        return self.request_timeout_ms + LEASE_MARGIN_MS


LEASE_MARGIN_MS = 5_000
