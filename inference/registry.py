"""The model registry: one description of each served model, read by the gateway and the workers alike.

Each entry names the model (the `model` of a request), its checkpoint directory, its tokenizer and chat
template, its context and output limits, and its integer prices (`ledger.pricing.Price`). The gateway
counts a prompt's tokens with the model's own tokenizer and template, checks the limits, and prices the
estimate and the settle; a worker loads the checkpoint of the entry it serves (TOLLGATE_WORKER_MODEL_NAME)
and prices its UsageRecorded with the same entry.

Where it comes from: the file named by TOLLGATE_MODEL_REGISTRY_PATH (JSON, or TOML when the name ends in
.toml), the same file for every gateway and worker; unset, the built-in registry of one model, the
committed default checkpoint (`DEFAULT_REGISTRY`). A file holds a list of models:

    {"models": [{"name": "my-gpt2", "checkpoint_dir": "/models/my-gpt2",
                 "context_tokens_max": 1024, "max_tokens_max": 512,
                 "price": {"prompt_token_credits": 1, "completion_token_credits": 3,
                           "cached_prompt_token_credits": 1}}]}

Relative paths in a file are relative to the file's directory.
"""

from __future__ import annotations

import functools
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inference.chat import CHAT_TEMPLATES, ChatTemplate
from inference.tokenizer import DEFAULT_MODEL_DIR, TOKENIZER_FILE_NAME, TextTokenizer, load_tokenizer
from ledger.pricing import Price

DEFAULT_MODEL_NAME = "tollgate-tiny"
MODELS_MAX = 1024  # entries in one registry file


class ModelSpec(BaseModel):
    """One served model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="the model id requests name")
    # The worker loads the weights and tokenizer.json from here; the gateway only tokenizer.json (so a
    # gateway host needs at least that file at this path).
    checkpoint_dir: Path = Field(description="config.json + model.safetensors + tokenizer.json")
    chat_template: Literal["tollgate", "chatml"] = Field(
        default="tollgate", description="how chat messages become one prompt (inference.chat)"
    )
    context_tokens_max: int = Field(default=512, ge=2, description="prompt + completion tokens")
    max_tokens_max: int = Field(default=256, ge=1, description="the largest max_tokens a request may ask for")
    owned_by: str = Field(default="tollgate", description="owned_by in /v1/models")
    price: Price = Field(description="integer credit units per prompt, completion and cached prompt token")

    @field_validator("price", mode="before")
    @classmethod
    def _cached_price_defaults_to_the_prompt_price(cls, price: object) -> object:
        """The worker's prefix cache serves prompt tokens for every model: an entry that names no cached
        price bills them at its prompt price (no discount unless the registry says so), never free."""
        if isinstance(price, dict) and "cached_prompt_token_credits" not in price:
            return {**price, "cached_prompt_token_credits": price.get("prompt_token_credits")}
        return price

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.price.cached_prompt_token_credits > self.price.prompt_token_credits:
            raise ValueError(f"{self.name}: a cached prompt token must not cost more than a prompt token")
        if self.max_tokens_max >= self.context_tokens_max:
            raise ValueError(
                f"{self.name}: max_tokens_max must leave room for a prompt (be below context_tokens_max)"
            )
        return self

    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer, the checkpoint's tokenizer.json the worker loads too (once per process)."""
        return load_tokenizer(self.checkpoint_dir / TOKENIZER_FILE_NAME)

    @property
    def template(self) -> ChatTemplate:
        return CHAT_TEMPLATES[self.chat_template]


class ModelRegistry(BaseModel):
    """Every served model, by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[ModelSpec] = Field(min_length=1, max_length=MODELS_MAX)

    @model_validator(mode="after")
    def _check(self) -> ModelRegistry:
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"the model registry names a model twice: {sorted(names)}")
        return self

    def by_name(self) -> dict[str, ModelSpec]:
        return {model.name: model for model in self.models}


DEFAULT_REGISTRY = ModelRegistry(
    models=[
        ModelSpec(
            name=DEFAULT_MODEL_NAME,
            checkpoint_dir=DEFAULT_MODEL_DIR,
            context_tokens_max=512,
            max_tokens_max=256,
            # The worker's prefix cache serves cached prompt tokens; at one credit unit per prompt token
            # (the smallest integer price) a discount would make them free, so they cost the same here.
            price=Price(prompt_token_credits=1, completion_token_credits=2, cached_prompt_token_credits=1),
        )
    ]
)


def read_registry(path: Path) -> ModelRegistry:
    """A registry file (JSON, or TOML for *.toml); relative paths resolved against its directory."""
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    registry = ModelRegistry.model_validate(raw)
    base = path.resolve().parent
    return ModelRegistry(
        models=[
            model.model_copy(update={"checkpoint_dir": base / model.checkpoint_dir})
            for model in registry.models
        ]
    )


@functools.cache
def load_registry(path: Path | None) -> dict[str, ModelSpec]:
    """The models by name: from the file at `path`, or the built-in registry when None (read once per
    process and path)."""
    registry = DEFAULT_REGISTRY if path is None else read_registry(path)
    return registry.by_name()
