"""Request and response bodies of the admin API. Amounts are integer credit units; times are accepted
as epoch milliseconds or ISO 8601 with a timezone, and returned as epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
    field_validator,
)

from ledger.events import (
    GRANT_MODELS_MAX,
    IDENTIFIER_LENGTH_MAX,
    MODEL_NAME_LENGTH_MAX,
    PRICE_MAX,
    REFERENCE_LENGTH_MAX,
    TENANT_CREDIT_MAX,
    TENANT_ID_PATTERN,
    TIMESTAMP_MAX_MS,
)

TENANT_NAME_LENGTH_MAX = 200
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
SEQUENCE_MAX = 2**63 - 1  # an entry's `sequence` is a Postgres bigint
TIER_LENGTH_MAX = 64
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)


def without_control_characters(value: str) -> str:
    """Text Postgres and log readers can hold: no NUL (Postgres refuses it) and no other control character."""
    if any(character < " " or character == "\x7f" for character in value):
        raise ValueError("must not contain control characters (such as NUL)")
    return value


PlainText = Annotated[str, AfterValidator(without_control_characters)]


def parse_time_ms(value: object) -> int:
    """Epoch milliseconds from an int, a string of ASCII digits, or an ISO 8601 string with a timezone."""
    if isinstance(value, bool):
        raise ValueError("must be epoch milliseconds or an ISO 8601 time, not a boolean")
    # int() and fromisoformat() take other scripts' digits, and fromisoformat() stops at a NUL
    if isinstance(value, str) and not (value.isascii() and value.isprintable()):
        raise ValueError("must be printable ASCII: epoch milliseconds or an ISO 8601 time")
    if isinstance(value, int):
        milliseconds = value
    elif isinstance(value, str) and value.isdigit():
        milliseconds = int(value)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is neither epoch milliseconds nor an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise ValueError(f"{value!r} has no timezone; add one, e.g. 'Z' or '+00:00'")
        since_epoch = moment - EPOCH
        if since_epoch % MILLISECOND:
            raise ValueError(f"{value!r} is finer than a millisecond")
        milliseconds = since_epoch // MILLISECOND
    else:
        raise ValueError("must be epoch milliseconds (integer) or an ISO 8601 time (string)")
    if not 0 <= milliseconds <= TIMESTAMP_MAX_MS:
        raise ValueError(f"must be between 0 and {TIMESTAMP_MAX_MS} epoch milliseconds")
    return milliseconds


TimeMs = Annotated[
    int,
    BeforeValidator(parse_time_ms),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "format": "date-time"}],
            "description": "epoch milliseconds, or ISO 8601 with a timezone",
        }
    ),
]


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: PlainText = Field(min_length=1, max_length=TENANT_NAME_LENGTH_MAX)
    tier: PlainText = Field(min_length=1, max_length=TIER_LENGTH_MAX)


class TenantView(BaseModel):
    tenant_id: str
    name: str
    tier: str
    created_at: int


class KeyBudgetFields(BaseModel):
    """An API key's spend limits in credits per UTC day and UTC calendar month; null: no limit."""

    model_config = ConfigDict(extra="forbid")

    daily_credits: StrictInt | None = Field(default=None, ge=0, le=TENANT_CREDIT_MAX)
    monthly_credits: StrictInt | None = Field(default=None, ge=0, le=TENANT_CREDIT_MAX)


class KeyCreated(BaseModel):
    key_id: str
    key: str = Field(description="the full key; shown only in this response, stored hashed")
    prefix: str
    tenant_id: str
    created_at: int
    daily_credits: int | None = None
    monthly_credits: int | None = None


class KeyBudgetView(BaseModel):
    key_id: str
    tenant_id: str
    daily_credits: int | None
    monthly_credits: int | None


class KeyRevoked(BaseModel):
    key_id: str
    tenant_id: str
    revoked_at: int


class GrantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: StrictInt = Field(gt=0, description="credit units, at most the configured grant_amount_max")
    effective_at: TimeMs | None = Field(default=None, description="default: now")
    expires_at: TimeMs | None = Field(default=None, description="default: never; must be after effective_at")
    priority: StrictInt = Field(
        default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="lower is drawn first"
    )
    category: Literal["paid", "promotional"] = Field(
        default="promotional", description="paid: bought for `price`; promotional: no price"
    )
    price: StrictInt | None = Field(
        default=None, ge=0, le=PRICE_MAX, description="integer minor units of `currency`; paid grants only"
    )
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$", description="ISO 4217")
    reference: PlainText = Field(
        default="", max_length=REFERENCE_LENGTH_MAX, description="finance's id for it: an invoice or order"
    )
    models: list[Annotated[PlainText, Field(min_length=1, max_length=MODEL_NAME_LENGTH_MAX)]] = Field(
        default=[],
        max_length=GRANT_MODELS_MAX,
        description="the models its credit pays for, each at most once; empty: any model. Usage of a "
        "model draws the grants scoped to it before the unscoped ones",
    )

    @field_validator("models")
    @classmethod
    def models_once_each(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("names a model twice")
        return models


class GrantView(BaseModel):
    grant_id: str
    tenant_id: str
    event_id: str
    amount: int
    effective_at: int
    expires_at: int | None
    priority: int
    category: str
    price: int | None
    currency: str | None
    reference: str
    created_at: int
    voided_at: int | None
    void_event_id: str | None
    models: list[str] = []  # empty: any model


class CreditBlockView(BaseModel):
    grant_id: str
    amount: int
    remaining: int
    effective_at: int
    expires_at: int | None
    priority: int
    models: list[str] = []  # the models it pays for; empty: any


class PendingGrantView(BaseModel):
    grant_id: str
    amount: int
    effective_at: int
    expires_at: int | None


class BalanceView(BaseModel):
    """The three balances (README "Three balances"), in credits."""

    tenant_id: str
    at: int
    balance: int = Field(description="the settled balance (same as `settled`; kept for compatibility)")
    settled: int = Field(description="the fold of the ledger at `at`: credit of the grants in effect, unused")
    live: int | None = Field(
        default=None,
        description="settled minus the open holds of admitted requests: what admission spends against. "
        "Only for now (no `at`, no `as_known_at`) and where the admission runs (else null)",
    )
    held: int | None = Field(default=None, description="the open holds `live` subtracts (null with live)")
    pending_total: int = Field(description="credit of the grants not yet effective at `at`")
    pending: list[PendingGrantView] = Field(description="the grants not yet effective at `at`, soonest first")
    overage: int
    blocks: list[CreditBlockView]


class EntriesPage(BaseModel):
    tenant_id: str
    entries: list[dict[str, Any]] = Field(
        description="ledger entries in the order recorded, each with its `sequence` and `type`"
    )
    next_since: int = Field(
        description="pass as `since` for the next page (or to poll for new entries later)"
    )
    has_more: bool = Field(description="whether entries after this page exist now")


IdempotencyKey = Annotated[
    str, Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX, pattern=r"^[\x21-\x7e]+$")
]
# Path ids: a tenant id as the ledger accepts it (it keys Kafka records), other ids as printable text.
TenantIdText = Annotated[
    str, Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX, pattern=TENANT_ID_PATTERN)
]
IdentifierText = Annotated[PlainText, Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)]
