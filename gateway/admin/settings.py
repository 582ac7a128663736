"""Admin API settings (environment prefix `TOLLGATE_`) and the admin token."""

from __future__ import annotations

import logging
import secrets
import sys
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from ledger.events import AMOUNT_MAX

logger = logging.getLogger(__name__)

ADMIN_TOKEN_LENGTH_MIN = 24


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    admin_token: SecretStr | None = None  # TOLLGATE_ADMIN_TOKEN; generated and printed in development
    grant_amount_max: int = Field(default=10**15, ge=1, le=AMOUNT_MAX)  # credit units in one grant
    entries_page_size_max: int = Field(default=500, ge=1, le=10_000)
    entries_page_size_default: int = Field(default=100, ge=1, le=10_000)
    tenant_tiers: tuple[str, ...] = ("free", "pro", "enterprise")
    publish_timeout_ms: int = Field(default=10_000, ge=1)
    balance_events_max: int = Field(default=1_000_000, ge=1)  # events folded to answer one balance query


class AdminTokenMissing(RuntimeError):
    """No usable admin token outside development."""


def resolve_admin_token(settings: AdminSettings) -> str:
    """The configured token; in development a random one when none is set, printed once to stderr.

    Outside development a missing or short token fails start-up instead of running unprotected.
    """
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value()
        if len(token) < ADMIN_TOKEN_LENGTH_MIN:
            raise AdminTokenMissing(
                f"TOLLGATE_ADMIN_TOKEN must be at least {ADMIN_TOKEN_LENGTH_MIN} characters"
            )
        return token
    if settings.environment != "development":
        raise AdminTokenMissing("TOLLGATE_ADMIN_TOKEN must be set outside development")
    token = secrets.token_urlsafe(32)
    print(f"tollgate: development admin token (set TOLLGATE_ADMIN_TOKEN to fix it): {token}", file=sys.stderr)
    return token
