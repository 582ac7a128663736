"""Console and tenant-portal settings (environment prefix `TOLLGATE_CONSOLE_`)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from tollgate.common_settings import CommonSettings


class ConsoleSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_CONSOLE_", extra="ignore")

    session_ttl_s: int = Field(
        default=8 * 3600, ge=60, le=7 * 86_400, description="a console sign-in lasts this long"
    )
    portal_link_ttl_s: int = Field(
        default=3600,
        ge=60,
        le=30 * 86_400,
        description="a tenant portal link (and its session) is valid this long",
    )
    signing_secret: SecretStr | None = Field(
        default=None,
        description="signs console sessions, CSRF tokens and portal links (HMAC-SHA256); unset: derived from "
        "the admin token, so rotating that token signs every session and link out",
    )
    chart_points_max: int = Field(
        default=800, ge=16, le=4_000, description="points of one chart series (the widest chart's pixels)"
    )
    history_page_size: int = Field(default=50, ge=5, le=500, description="history rows in one page")
    burn_rate_window_s: int = Field(
        default=86_400, ge=60, description="the recent window whose consumption projects when credit runs out"
    )
    worker_health_timeout_ms: int = Field(
        default=500, ge=10, description="the overview's wait for each worker's /health"
    )
