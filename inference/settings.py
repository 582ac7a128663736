"""Worker settings from the environment (prefix TOLLGATE_WORKER_). Every limit is named with its unit last.

The served model (checkpoint, tokenizer, limits, price) is an entry of the model registry
(`inference.registry`, TOLLGATE_MODEL_REGISTRY_PATH) named by TOLLGATE_WORKER_MODEL_NAME; the tiers and
their queue priority are the shared TOLLGATE_TIERS (`tollgate.common_settings`). Nested engine settings
use `__`, e.g. TOLLGATE_WORKER_ENGINE__RUNNING_SEQUENCES_MAX=64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr, model_validator
from pydantic_settings import SettingsConfigDict

from inference.registry import DEFAULT_MODEL_NAME, ModelSpec
from tollgate.common_settings import CommonSettings, TierLimits, default_tiers


def tier_levels_of(tiers: dict[str, TierLimits]) -> dict[str, int]:
    """Each tier's place in the waiting queue (lower is served first)."""
    return {name: tier.priority_level for name, tier in tiers.items()}


class EngineSettings(BaseModel):
    """What the engine and its scheduler need; the worker settings carry one of these."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    # auto: fp16 on cuda, fp32 on cpu
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = "auto"
    running_sequences_max: int = Field(default=128, ge=1)  # sequences in the running batch
    step_tokens_max: int = Field(default=512, ge=1)  # token budget of one engine step
    # longest prompt chunk one sequence feeds per step
    prefill_chunk_tokens_max: int = Field(default=256, ge=1)
    # prompt + completion tokens per sequence
    context_tokens_max: int = Field(default=512, ge=2)
    kv_block_tokens: int = Field(default=16, ge=1)  # tokens per paged KV cache block
    # KV cache size in tokens (rounded down to whole blocks); at least one whole context
    kv_cache_tokens_max: int = Field(default=16384, ge=2)
    prefix_caching: bool = True  # reuse the KV blocks of a cached prompt prefix (billed as cached tokens)
    # beyond this, new requests are refused (overloaded)
    waiting_queue_depth_max: int = Field(default=256, ge=1)
    # waiting-queue order: priority (by tier, with aging) or fcfs
    queue_policy: Literal["priority", "fcfs"] = "priority"
    # waiting this long lifts a request one tier level
    aging_ms_per_tier_level: int = Field(default=2000, ge=1)
    stop_sequences_max: int = Field(default=4, ge=0)  # stop sequences one request may give
    stop_sequence_chars_max: int = Field(default=64, ge=1)  # characters of one stop sequence
    torch_threads: int = Field(default=2, ge=0)  # 0: leave torch's default

    @model_validator(mode="after")
    def _check_limits(self) -> EngineSettings:
        if self.prefill_chunk_tokens_max > self.step_tokens_max:
            raise ValueError("prefill_chunk_tokens_max must not exceed step_tokens_max")
        if self.step_tokens_max < self.running_sequences_max:
            raise ValueError("step_tokens_max must be at least running_sequences_max (one decode token each)")
        if self.kv_cache_block_count * self.kv_block_tokens < self.context_tokens_max:
            raise ValueError("kv_cache_tokens_max must hold at least one whole context (context_tokens_max)")
        return self

    @property
    def kv_cache_block_count(self) -> int:
        return self.kv_cache_tokens_max // self.kv_block_tokens

    # Each tier's queue level: the shared tiers' priority levels (WorkerSettings hands its tiers in with
    # `with_tiers`; an EngineSettings built alone has the default tiers'). Not a field: one definition.
    _tier_levels: dict[str, int] = PrivateAttr(default_factory=lambda: tier_levels_of(default_tiers()))

    @property
    def tier_levels(self) -> dict[str, int]:
        return self._tier_levels

    def with_tiers(self, tiers: dict[str, TierLimits]) -> EngineSettings:
        assert tiers, "at least one tier"
        engine = self.model_copy()
        engine._tier_levels = tier_levels_of(tiers)
        return engine


class WorkerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_WORKER_", env_nested_delimiter="__")

    # the model registry entry this worker serves (requests must name it)
    model_name: str = DEFAULT_MODEL_NAME
    engine: EngineSettings = Field(default_factory=EngineSettings)
    host: str = "127.0.0.1"  # the address the worker listens on (the gateways call it)
    port: int = Field(default=8100, ge=1, le=65535)  # the worker port
    retry_after_s: int = Field(default=1, ge=0)  # Retry-After on an overloaded answer
    prompt_chars_max: int = Field(default=65536, ge=1)  # request body limit on the prompt text
    # per UsageRecorded publish (the done line waits for it)
    usage_emit_timeout_ms: int = Field(default=10000, ge=1)
    shutdown_drain_timeout_ms: int = Field(default=10000, ge=1)  # waiting for pending usage emits at shutdown
    engine_restarts_max: int = Field(default=3, ge=0)  # engine loop rebuilds allowed within the window below
    engine_restart_window_ms: int = Field(default=60000, ge=1)  # past restarts_max in this window: stay down
    health_failed_exit_ms: int = Field(default=5000, ge=1)  # health failed this long: the process exits
    health_check_interval_ms: int = Field(default=250, ge=1)  # how often the watchdog reads health
    # a graceful stop after that exit is cut short past this
    fatal_exit_grace_ms: int = Field(default=60000, ge=1)
    # OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); None: no spans recorded
    otlp_traces_endpoint: str | None = None

    @model_validator(mode="after")
    def _check_model(self) -> WorkerSettings:
        if self.model_name not in self.models:
            raise ValueError(
                f"the model registry has no model {self.model_name!r} (it has {sorted(self.models)})"
            )
        self.engine = self.engine.with_tiers(self.tiers)
        return self

    @property
    def model(self) -> ModelSpec:
        """The registry entry this worker serves: its checkpoint, tokenizer, limits and price."""
        return self.models[self.model_name]

    @property
    def checkpoint_dir(self) -> Path:
        return self.model.checkpoint_dir
