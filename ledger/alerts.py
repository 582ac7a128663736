"""Alerts: what the fold publishes on `ledger.alerts` when a tenant's balance crosses one of its rules.

The wire contract between the processor (which evaluates rules as it folds) and the consumers of the
topic (the webhook dispatcher, the auto top-up agent). Keyed by the tenant id.

`alert_id` is derived from the rule and the crossing (`{tenant_id}:{rule_id}:{crossing}`, `crossing`
counting that rule's crossings from 1), never from a clock or a random source: a replay or a
redelivery of the same events derives the same id, so a consumer drops repeats by id and an alert
fires once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ledger.events import Identifier, InvalidEvent, TenantId, TimestampMs

ALERT_SCHEMA_VERSION = 1

# balance_below: the settled balance fell below `threshold` credits;
# balance_below_percent: ... below `threshold` percent of the credit granted (threshold is the percent);
# depleted: it reached 0; recovered: it went back above the rule's threshold (or above 0 for depleted);
# grant_expiring: grant `grant_id` with `remaining` credits expires at `expires_at`, within the rule's
# window; top_up: an auto top-up rule decided to grant (the top-up agent grants `top_up_amount`).
AlertKind = Literal[
    "balance_below", "balance_below_percent", "depleted", "recovered", "grant_expiring", "top_up"
]


class AlertFired(msgspec.Struct, frozen=True, tag="alert_fired", tag_field="type", kw_only=True):
    alert_id: str
    tenant_id: TenantId
    rule_id: Identifier
    kind: AlertKind
    crossing: int  # this rule's crossings so far, this one included (>= 1)
    fired_at: TimestampMs  # the stream time at which the fold saw the crossing
    balance: int  # the settled balance then
    threshold: int | None = None  # credits, or percent for balance_below_percent
    grant_id: str | None = None  # grant_expiring
    expires_at: TimestampMs | None = None  # grant_expiring
    remaining: int | None = None  # grant_expiring: the grant's remaining credit
    top_up_amount: int | None = None  # top_up: the credits to grant
    schema_version: int = ALERT_SCHEMA_VERSION
    # top_up: the grant's terms, from the rule (the agent grants exactly these; price of top_up_amount)
    top_up_category: str | None = None
    top_up_price: int | None = None
    top_up_currency: str | None = None

    def __post_init__(self) -> None:
        if self.crossing < 1:
            raise InvalidEvent("crossing: counts from 1")
        if self.alert_id != alert_id_of(self.tenant_id, self.rule_id, self.crossing):
            raise InvalidEvent("alert_id: derived from the tenant, the rule and the crossing")


def alert_id_of(tenant_id: str, rule_id: str, crossing: int) -> str:
    return f"{tenant_id}:{rule_id}:{crossing}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AlertFired)


def encode_alert(alert: AlertFired) -> bytes:
    return _encoder.encode(alert)


def decode_alert(data: bytes) -> AlertFired:
    """Raises InvalidEvent on anything that is not a valid alert."""
    try:
        return _decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise InvalidEvent(f"invalid alert: {error}") from None
