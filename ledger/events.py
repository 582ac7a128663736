"""Ledger events: immutable, versioned facts. Integer credit units, integer epoch milliseconds.

Inputs to the fold (published on `ledger.events`, keyed by tenant id):
    CreditGranted, GrantVoided, UsageRecorded, PeriodClosed
Facts the fold derives and publishes (on `ledger.entries`):
    CreditExpired and the entries in `ledger.entries`.

Every event validates itself on construction and on decode (see `ledger.codec`); a violation raises
`InvalidEvent` naming the field.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

# 2: grants carry money (category, price, currency, reference), entries carry the money they move, and
# PeriodClosed exists. Version 1 records (no money fields) still decode: a v1 grant is promotional.
SCHEMA_VERSION = 2

IDENTIFIER_LENGTH_MAX = 128
MODEL_NAME_LENGTH_MAX = 128
GRANT_MODELS_MAX = 16  # models one grant may name (CreditGranted.models: a grant scoped to models)
AMOUNT_MAX = 2**62  # far above any real grant; keeps every sum inside a signed 64-bit column
# A tenant's credit granted over its whole life (voided and expired grants included) is at most this, so
# its balance, its totals and their sums stay inside a signed 64-bit column (Postgres bigint).
TENANT_CREDIT_MAX = 2**62
TIMESTAMP_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)]
# Tenant ids key Kafka records and state: letters, digits and . _ : - only (no "/").
TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TenantId = Annotated[str, msgspec.Meta(pattern=TENANT_ID_PATTERN)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=MODEL_NAME_LENGTH_MAX)]
TraceId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]  # W3C trace-context: 16 bytes, lowercase hex
SpanId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{16}$")]  # W3C trace-context: 8 bytes, lowercase hex
PositiveAmount = Annotated[int, msgspec.Meta(gt=0, le=AMOUNT_MAX)]
NonNegativeAmount = Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_MAX)]
TimestampMs = Annotated[int, msgspec.Meta(ge=0, le=TIMESTAMP_MAX_MS)]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31)]
# Money is integer minor units of an ISO 4217 currency (cents for USD); a grant's price is at most this.
PRICE_MAX = 2**62
MoneyAmount = Annotated[int, msgspec.Meta(ge=0, le=PRICE_MAX)]
CurrencyCode = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
REFERENCE_LENGTH_MAX = 256
Reference = Annotated[str, msgspec.Meta(max_length=REFERENCE_LENGTH_MAX)]
PAID = "paid"
PROMOTIONAL = "promotional"
Category = Literal["paid", "promotional"]


class InvalidEvent(ValueError):
    """A record that is not a valid ledger event. `reason` says what is wrong, naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CreditGranted(msgspec.Struct, frozen=True, tag="credit_granted", tag_field="type", kw_only=True):
    """A block of credit that counts at t iff effective_at <= t < expires_at (None: never expires).

    A paid grant was bought for `price` minor units of `currency`; a promotional one has no price (its
    currency, if given, only says what it would be counted in). `reference` is finance's own id for it
    (an invoice or order). A version 1 grant has none of these: it is promotional."""

    event_id: Identifier
    tenant_id: TenantId
    grant_id: Identifier
    amount: PositiveAmount
    effective_at: TimestampMs
    expires_at: TimestampMs | None = None
    priority: Priority = 0  # lower is drawn first
    schema_version: int = SCHEMA_VERSION
    category: Category = PROMOTIONAL
    price: MoneyAmount | None = None
    currency: CurrencyCode | None = None
    reference: Reference = ""
    # The models this grant's credit pays for (ledger.scoped); empty: any model.
    models: tuple[ModelName, ...] = ()

    kind_order: ClassVar[int] = 0

    def __post_init__(self) -> None:
        if len(self.models) > GRANT_MODELS_MAX:
            raise InvalidEvent(f"models: at most {GRANT_MODELS_MAX} models a grant")
        if len(set(self.models)) != len(self.models):
            raise InvalidEvent("models: a model is named twice")
        if self.expires_at is not None and self.expires_at <= self.effective_at:
            raise InvalidEvent("expires_at must be after effective_at")
        if self.category == PAID and (self.price is None or self.currency is None):
            raise InvalidEvent("price: a paid grant needs a price and a currency")
        if self.category == PROMOTIONAL and self.price is not None:
            raise InvalidEvent("price: a promotional grant has no price")

    @property
    def timestamp(self) -> int:
        return self.effective_at


class GrantVoided(msgspec.Struct, frozen=True, tag="grant_voided", tag_field="type", kw_only=True):
    """The grant's remainder is removed from voided_at on."""

    event_id: Identifier
    tenant_id: TenantId
    grant_id: Identifier
    voided_at: TimestampMs
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 1

    @property
    def timestamp(self) -> int:
        return self.voided_at


class UsageRecorded(msgspec.Struct, frozen=True, tag="usage_recorded", tag_field="type", kw_only=True):
    """Credit used by one inference request. event_id is the request id."""

    event_id: Identifier
    tenant_id: TenantId
    amount: NonNegativeAmount
    occurred_at: TimestampMs
    model: ModelName
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    # Of prompt_tokens, those served from a prefix cache (priced at the model's cached rate); absent in
    # events written before it existed, which read as 0.
    cached_prompt_tokens: TokenCount = 0
    schema_version: int = SCHEMA_VERSION
    # The prompt version (a named system prompt's `name@version`) the request was built with; None when
    # it used none, and in events written before it existed.
    prompt_version: Identifier | None = None
    # The W3C trace id (32 hex digits) of the request's trace when it was traced: the fold's entry is found
    # from the trace by this event's id. None when tracing was off.
    trace_id: TraceId | None = None
    # The span (in `trace_id`) the request's generation ran under: the fold's span is its child
    # (streams.fold_tracing). None when tracing was off.
    parent_span_id: SpanId | None = None
    # The API key the request was made with (its key id, never the key): per-key budgets count usage by
    # it. None for usage without a key (tools, tests) and in events written before it existed.
    api_key_id: Identifier | None = None

    kind_order: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.cached_prompt_tokens > self.prompt_tokens:
            raise InvalidEvent("cached_prompt_tokens: cached prompt tokens are a part of prompt_tokens")

    @property
    def timestamp(self) -> int:
        return self.occurred_at


class PeriodClosed(msgspec.Struct, frozen=True, tag="period_closed", tag_field="type", kw_only=True):
    """The tenant's books are closed for everything before `closed_until`: an entry the fold derives
    later for an earlier time is booked at the close, as an adjustment (ledger.entries `booked_at`),
    so a closed period's statement never changes. A close never moves back (an earlier one is a no-op)."""

    event_id: Identifier
    tenant_id: TenantId
    closed_until: TimestampMs
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 4

    @property
    def timestamp(self) -> int:
        return self.closed_until


class CreditExpired(msgspec.Struct, frozen=True, tag="credit_expired", tag_field="type", kw_only=True):
    """Derived: a block's remainder forfeited at its expiry. Published by the fold, never an input."""

    event_id: str
    tenant_id: TenantId
    grant_id: Identifier
    expired_at: TimestampMs
    amount: NonNegativeAmount
    schema_version: int = SCHEMA_VERSION
    money: int = 0  # breakage: the forfeited credits' share of a paid grant's price
    booked_at: int | None = None  # set when expired_at fell in a closed period (ledger.entries)

    kind_order: ClassVar[int] = 3

    @property
    def timestamp(self) -> int:
        return self.expired_at

    @property
    def entry_id(self) -> str:
        return self.event_id


# Alert and auto top-up rules (ledger.rules): facts on the log, so every replay folds the same rules. The
# account's fold ignores them; the processor keeps each tenant's rules beside its account. Rule ids are
# shorter than identifiers: alert ids and top-up grant ids are built from them.
RULE_ID_LENGTH_MAX = 64
RULE_ID_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{RULE_ID_LENGTH_MAX - 1}}}$"
RuleId = Annotated[str, msgspec.Meta(pattern=RULE_ID_PATTERN)]
AlertRuleKind = Literal["balance_below", "balance_below_percent", "depleted", "grant_expiring"]
PERCENT_MAX = 100
WINDOW_MAX_MS = 366 * 24 * 3600 * 1000  # a grant_expiring rule looks at most a year ahead
MONTHLY_COUNT_MAX = 10_000  # top-ups of one rule in a month
MonthlyCount = Annotated[int, msgspec.Meta(ge=1, le=MONTHLY_COUNT_MAX)]


class AlertRuleSet(msgspec.Struct, frozen=True, tag="alert_rule_set", tag_field="type", kw_only=True):
    """Rule `rule_id` of the tenant is (from now on) this one: balance_below `threshold` credits,
    balance_below_percent `threshold` percent of the credit granted, depleted (no threshold), or
    grant_expiring (a grant with credit left expires within `window_ms`). Setting it again replaces it."""

    event_id: Identifier
    tenant_id: TenantId
    rule_id: RuleId
    kind: AlertRuleKind
    set_at: TimestampMs
    threshold: NonNegativeAmount | None = None
    window_ms: Annotated[int, msgspec.Meta(gt=0, le=WINDOW_MAX_MS)] | None = None
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 5

    def __post_init__(self) -> None:
        needs_threshold = self.kind in ("balance_below", "balance_below_percent")
        if needs_threshold != (self.threshold is not None):
            verb = "needs" if needs_threshold else "has no"
            raise InvalidEvent(f"threshold: a {self.kind} rule {verb} threshold")
        if self.kind == "balance_below_percent" and not 0 < self.threshold <= PERCENT_MAX:  # type: ignore[operator]
            raise InvalidEvent(f"threshold: a percent in 1..{PERCENT_MAX}")
        if (self.kind == "grant_expiring") != (self.window_ms is not None):
            raise InvalidEvent("window_ms: a grant_expiring rule, and only it, has a window")

    @property
    def timestamp(self) -> int:
        return self.set_at


class AlertRuleRemoved(msgspec.Struct, frozen=True, tag="alert_rule_removed", tag_field="type", kw_only=True):
    """Alert rule `rule_id` no longer fires (removing one that does not exist changes nothing)."""

    event_id: Identifier
    tenant_id: TenantId
    rule_id: RuleId
    removed_at: TimestampMs
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 5

    @property
    def timestamp(self) -> int:
        return self.removed_at


class TopUpRuleSet(msgspec.Struct, frozen=True, tag="top_up_rule_set", tag_field="type", kw_only=True):
    """Auto top-up: when the settled balance falls below `threshold`, grant `amount` credits, or enough to
    reach `target`, with the category, price and currency of a grant (`price` is that of `amount`, or of
    `target` credits for a target rule, prorated and rounded down), at most `monthly_count_max` times and
    for at most `monthly_price_max` money per calendar month (UTC). At least one cap is required."""

    event_id: Identifier
    tenant_id: TenantId
    rule_id: RuleId
    threshold: PositiveAmount
    set_at: TimestampMs
    amount: PositiveAmount | None = None
    target: PositiveAmount | None = None
    category: Category = PAID
    price: MoneyAmount | None = None
    currency: CurrencyCode | None = None
    monthly_count_max: MonthlyCount | None = None
    monthly_price_max: MoneyAmount | None = None
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 5

    def __post_init__(self) -> None:
        if (self.amount is None) == (self.target is None):
            raise InvalidEvent("amount: a top-up rule grants either a fixed amount or up to a target")
        if self.target is not None and self.target <= self.threshold:
            raise InvalidEvent("target: must be above the threshold")
        if self.monthly_count_max is None and self.monthly_price_max is None:
            raise InvalidEvent("monthly_count_max: a top-up rule needs a monthly cap (count or price)")
        if self.category == PAID and (self.price is None or self.currency is None):
            raise InvalidEvent("price: a paid top-up needs a price and a currency")
        if self.category == PROMOTIONAL and (self.price is not None or self.monthly_price_max is not None):
            raise InvalidEvent("price: a promotional top-up has no price (cap it by count)")

    @property
    def timestamp(self) -> int:
        return self.set_at


class TopUpRuleRemoved(
    msgspec.Struct, frozen=True, tag="top_up_rule_removed", tag_field="type", kw_only=True
):
    """Top-up rule `rule_id` no longer grants (removing one that does not exist changes nothing)."""

    event_id: Identifier
    tenant_id: TenantId
    rule_id: RuleId
    removed_at: TimestampMs
    schema_version: int = SCHEMA_VERSION

    kind_order: ClassVar[int] = 5

    @property
    def timestamp(self) -> int:
        return self.removed_at


RuleEvent = AlertRuleSet | AlertRuleRemoved | TopUpRuleSet | TopUpRuleRemoved
RULE_EVENT_TYPES = frozenset((AlertRuleSet, AlertRuleRemoved, TopUpRuleSet, TopUpRuleRemoved))


InputEvent = CreditGranted | GrantVoided | UsageRecorded | PeriodClosed | RuleEvent
Event = CreditGranted | GrantVoided | UsageRecorded | PeriodClosed | CreditExpired | RuleEvent


def validated(event: Event) -> Event:
    """Run the declared constraints on an event built in code (msgspec checks them only on decode)."""
    from ledger.codec import decode_event, encode_event

    return decode_event(encode_event(event))


def event_order_key(event: Event) -> tuple[int, int, str]:
    """The deterministic order of events: by time, then grant < void < usage, then event id."""
    return (event.timestamp, event.kind_order, event.event_id)
