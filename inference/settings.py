"""Worker settings from the environment (prefix TOLLGATE_WORKER_). Every limit is named with its unit last.

Dict-valued settings are JSON in the environment, e.g.
    TOLLGATE_WORKER_PRICES='{"tollgate-tiny": {"prompt_token_credits": 1, "completion_token_credits": 2}}'
    TOLLGATE_WORKER_TIER_LEVELS='{"enterprise": 0, "pro": 1, "standard": 2, "free": 3}'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference.tokenizer import DEFAULT_MODEL_DIR

DEFAULT_MODEL_NAME = "tollgate-tiny"


class ModelPrice(BaseModel):
    """Integer credit units per token processed."""

    prompt_token_credits: int = Field(ge=0)
    completion_token_credits: int = Field(ge=0)


class EngineSettings(BaseModel):
    """What the engine and its scheduler need; the worker settings carry one of these."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = "auto"  # auto: fp16 on cuda, fp32 on cpu
    running_sequences_max: int = Field(default=32, ge=1)  # also the number of KV cache slots
    step_tokens_max: int = Field(default=512, ge=1)  # token budget of one engine step
    prefill_chunk_tokens_max: int = Field(default=256, ge=1)  # longest prompt chunk one sequence feeds per step
    context_tokens_max: int = Field(default=512, ge=2)  # prompt + completion tokens per sequence (cache slot size)
    waiting_queue_depth_max: int = Field(default=256, ge=1)  # beyond this, new requests are refused (overloaded)
    queue_policy: Literal["priority", "fcfs"] = "priority"
    tier_levels: dict[str, int] = Field(
        default_factory=lambda: {"enterprise": 0, "pro": 1, "standard": 2, "free": 3}
    )  # lower level is served first
    aging_ms_per_tier_level: int = Field(default=2000, ge=1)  # waiting this long lifts a request one tier level
    stop_sequences_max: int = Field(default=4, ge=0)
    stop_sequence_chars_max: int = Field(default=64, ge=1)
    torch_threads: int = Field(default=2, ge=0)  # 0: leave torch's default

    @model_validator(mode="after")
    def _check_limits(self) -> EngineSettings:
        if self.prefill_chunk_tokens_max > self.step_tokens_max:
            raise ValueError("prefill_chunk_tokens_max must not exceed step_tokens_max")
        if self.step_tokens_max < self.running_sequences_max:
            raise ValueError("step_tokens_max must be at least running_sequences_max (one decode token each)")
        if not self.tier_levels:
            raise ValueError("tier_levels must name at least one tier")
        return self


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_WORKER_", env_nested_delimiter="__")

    checkpoint_dir: Path = DEFAULT_MODEL_DIR  # config.json + model.safetensors + tokenizer.json
    model_name: str = DEFAULT_MODEL_NAME  # the model id this worker serves (requests must name it)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: {
            DEFAULT_MODEL_NAME: ModelPrice(prompt_token_credits=1, completion_token_credits=2)
        }
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    retry_after_s: int = Field(default=1, ge=0)  # Retry-After on an overloaded answer
    prompt_chars_max: int = Field(default=65536, ge=1)  # request body limit on the prompt text
    usage_emit_timeout_ms: int = Field(default=10000, ge=1)  # per UsageRecorded publish (the done line waits for it)
    shutdown_drain_timeout_ms: int = Field(default=10000, ge=1)  # waiting for pending usage emits at shutdown
    engine_restarts_max: int = Field(default=3, ge=0)  # engine loop rebuilds allowed within the window below
    engine_restart_window_ms: int = Field(default=60000, ge=1)  # past restarts_max in this window: stay down
    health_failed_exit_ms: int = Field(default=5000, ge=1)  # health failed this long: the process exits
    health_check_interval_ms: int = Field(default=250, ge=1)  # how often the watchdog reads health
    fatal_exit_grace_ms: int = Field(default=60000, ge=1)  # a graceful stop after that exit is cut short past this

    @model_validator(mode="after")
    def _check_price(self) -> WorkerSettings:
        if self.model_name not in self.prices:
            raise ValueError(f"prices has no entry for the served model {self.model_name!r}")
        return self
