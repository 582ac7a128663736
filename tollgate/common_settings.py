"""Facts every component shares, each defined once: the deployment's environment, the admin token and
its minimum length, the tenant tiers, and where the model registry is.

The environment names: a component's own settings are `TOLLGATE_<COMPONENT>_<NAME>` (TOLLGATE_GATEWAY_PORT,
TOLLGATE_WORKER_PORT, TOLLGATE_ADMISSION_MODE); a shared fact is `TOLLGATE_<NAME>` (TOLLGATE_ENVIRONMENT,
TOLLGATE_ADMIN_TOKEN, TOLLGATE_TIERS, TOLLGATE_MODEL_REGISTRY_PATH), read under that one name by every
component. Each component's settings class inherits `CommonSettings`, so `GatewaySettings().environment`
and `AdminSettings().environment` are the same variable, never a second one under the component's prefix.
In code a shared setting is passed by its field name (`GatewaySettings(admin_token=...)`).

`python -m tollgate.settings_table` writes the README's table of every setting from these classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from inference.registry import ModelSpec, load_registry

SHARED_PREFIX = "TOLLGATE_"
ADMIN_TOKEN_LENGTH_MIN = 32  # characters; docker-compose.yml's message says the same (tested)


class TierLimits(BaseModel):
    """What one tenant tier gets: per-tenant rate limits at the gateway (tokens are prompt tokens +
    max_tokens, counted at admission) and its place in a worker's waiting queue."""

    requests_per_minute: int = Field(ge=1, description="requests per tenant per minute")
    tokens_per_minute: int = Field(ge=1, description="prompt + max_tokens per tenant per minute")
    priority_level: int = Field(default=0, ge=0, description="worker queue order: lower is served first")


def default_tiers() -> dict[str, TierLimits]:
    return {
        "free": TierLimits(requests_per_minute=60, tokens_per_minute=40_000, priority_level=3),
        "standard": TierLimits(requests_per_minute=500, tokens_per_minute=400_000, priority_level=2),
        "pro": TierLimits(requests_per_minute=3_000, tokens_per_minute=2_000_000, priority_level=1),
        "enterprise": TierLimits(requests_per_minute=10_000, tokens_per_minute=10_000_000, priority_level=0),
    }


def shared(default: Any = ..., *, description: str, **constraints: Any) -> Any:
    """A shared field: read from TOLLGATE_<NAME> whatever the inheriting class's prefix."""
    return Field(default, description=description, **constraints)


class CommonSettings(BaseSettings):
    """The shared facts (env TOLLGATE_<NAME>). Component settings classes inherit this class."""

    model_config = SettingsConfigDict(env_prefix=SHARED_PREFIX, env_nested_delimiter="__", extra="ignore")

    environment: Literal["development", "production"] = shared(
        "development",
        description="production refuses to start the gateway without an admin token of the minimum length",
    )
    admin_token: SecretStr | None = shared(
        None,
        description=f"the admin API's bearer token, {ADMIN_TOKEN_LENGTH_MIN}+ characters; "
        "generated and printed in development when unset",
    )
    tiers: dict[str, TierLimits] = shared(
        default_factory=default_tiers,
        description="tenant tiers (JSON): rate limits and worker queue priority; the tiers a tenant may have",
        min_length=1,
    )
    tier_default: str = shared("free", description="the limits of a tenant whose tier is not in tiers")
    model_registry_path: Path | None = shared(
        None, description="the model registry file (JSON or TOML); unset: the built-in default model"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """A component class reads its own fields under its prefix and the shared ones under
        TOLLGATE_<NAME> only (never TOLLGATE_<COMPONENT>_<NAME>); values passed in code win."""
        if settings_cls is CommonSettings:
            return init_settings, env_settings
        return init_settings, _OwnFields(settings_cls, env_settings), EnvSettingsSource(CommonSettings)

    @model_validator(mode="after")
    def _check_tiers(self) -> CommonSettings:
        if self.tier_default not in self.tiers:
            raise ValueError(
                f"tier_default {self.tier_default!r} is not one of the tiers {sorted(self.tiers)}"
            )
        return self

    @property
    def models(self) -> dict[str, ModelSpec]:
        """The model registry, by model name (read once per process and path)."""
        return load_registry(self.model_registry_path)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    def limits_of(self, tier: str) -> TierLimits:
        return self.tiers.get(tier) or self.tiers[self.tier_default]

    def admin_token_problem(self) -> str | None:
        """Why the admin token cannot be used (None when it can): a set token must be long enough, and
        production needs one. The message names the variable to set."""
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < ADMIN_TOKEN_LENGTH_MIN:
            return f"{SHARED_PREFIX}ADMIN_TOKEN must be at least {ADMIN_TOKEN_LENGTH_MIN} characters"
        if self.admin_token is None and self.environment == "production":
            return (
                f"{SHARED_PREFIX}ADMIN_TOKEN must be set in production ({ADMIN_TOKEN_LENGTH_MIN}+ characters)"
            )
        return None


SHARED_FIELDS = frozenset(CommonSettings.model_fields)


class _OwnFields(PydanticBaseSettingsSource):
    """A component's environment source without the shared fields (those have one name, TOLLGATE_<NAME>)."""

    def __init__(self, settings_cls: type[BaseSettings], environment: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._environment = environment

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError("called through __call__ only")

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in self._environment().items() if name not in SHARED_FIELDS}
