"""Admin API settings (environment prefix `TOLLGATE_ADMIN_`) and the admin token.

The admin token, the environment and the tenant tiers are shared facts (`tollgate.common_settings`:
TOLLGATE_ADMIN_TOKEN, TOLLGATE_ENVIRONMENT, TOLLGATE_TIERS), inherited here and defined there once.
"""

from __future__ import annotations

import logging
import secrets
import sys

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ledger.events import AMOUNT_MAX
from storage.webhooks import SECRET_OVERLAP_MAX_MS
from tollgate.common_settings import CommonSettings

logger = logging.getLogger(__name__)


class AdminSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_ADMIN_", extra="ignore")

    grant_amount_max: int = Field(
        default=10**15, ge=1, le=AMOUNT_MAX, description="credit units in one grant"
    )
    entries_page_size_max: int = Field(
        default=500, ge=1, le=10_000, description="ledger entries in one page of the entries route"
    )
    entries_page_size_default: int = Field(
        default=100, ge=1, le=10_000, description="ledger entries in a page when the request names no limit"
    )
    publish_timeout_ms: int = Field(
        default=10_000, ge=1, description="one admin command's publish to the event log"
    )
    balance_events_max: int = Field(
        default=1_000_000, ge=1, description="events folded to answer one balance query"
    )
    webhook_secret_overlap_ms: int = Field(
        default=86_400_000,
        ge=0,
        le=SECRET_OVERLAP_MAX_MS,
        description="how long a webhook endpoint's rotated-out secret keeps signing when the rotation names "
        "no overlap_ms (0: it stops at once)",
    )

    @property
    def tenant_tiers(self) -> tuple[str, ...]:
        """The tiers a tenant may be created with: the names of the shared tiers."""
        return self.tier_names


class AdminTokenMissing(RuntimeError):
    """No usable admin token (unset in production, or too short)."""


def resolve_admin_token(settings: CommonSettings) -> str:
    """The configured token; in development a random one when none is set, printed once to stderr.

    A short token, or none in production, fails start-up instead of running unprotected.
    """
    problem = settings.admin_token_problem()
    if problem is not None:
        raise AdminTokenMissing(problem)
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    token = secrets.token_urlsafe(32)
    print(f"tollgate: development admin token (set TOLLGATE_ADMIN_TOKEN to fix it): {token}", file=sys.stderr)
    return token
