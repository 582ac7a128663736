"""An alert as a Standard Webhooks message, and the retry schedule. No I/O.

The message (https://www.standardwebhooks.com):

    webhook-id          the alert id (derived from the tenant, the rule and the crossing: the same on every
                        attempt, every replay and every redelivery, so a receiver drops repeats by it)
    webhook-timestamp   the attempt's time, epoch seconds
    webhook-signature   v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" with the endpoint's secret>;
                        during a secret rotation's overlap a second one, space-delimited, with the
                        previous secret (a receiver accepts the message if any signature verifies)
    body                {"type": "balance.below", "timestamp": "<ISO 8601 of fired_at>", "data": {...}}

The body is built once, when the delivery is scheduled, and stored: every attempt sends the same bytes.
Signing is the `standardwebhooks` package's own `Webhook.sign`, the code receivers verify with.

Retries: exponential backoff with full jitter (AWS's "Exponential Backoff And Jitter"): after the n-th
failed attempt the wait is uniform in [0, min(retry_delay_max_ms, first_retry_delay_ms * 2^(n-1))), so
many deliveries failing together do not retry together. No attempt starts later than give_up_after_ms
after the delivery was scheduled: the one that would is not made, and the delivery is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec
from standardwebhooks import Webhook

from ledger.alerts import AlertFired
from storage.webhooks import DEAD, DELIVERED, PENDING
from streams.webhooks.settings import WebhookSettings

# The body's "type" of each alert kind (ledger.alerts.AlertKind): one definition, read by the admin API too
EVENT_TYPES = {
    "balance_below": "balance.below",
    "balance_below_percent": "balance.below_percent",
    "depleted": "balance.depleted",
    "recovered": "balance.recovered",
    "grant_expiring": "grant.expiring",
    "top_up": "balance.top_up",
}
USER_AGENT = "tollgate-webhooks/1"
ERROR_CHARS_MAX = 500  # of an error's text kept on the attempt row


def iso_ms(epoch_ms: int) -> str:
    """2026-11-29T14:05:54.123Z"""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def event_type(alert: AlertFired) -> str:
    return EVENT_TYPES[alert.kind]


def body_of(alert: AlertFired) -> str:
    """The JSON body: the alert's fields (those set) under "data"."""
    data = {
        name: value
        for name, value in msgspec.structs.asdict(alert).items()
        if value is not None and name != "schema_version"
    }
    data["fired_at_iso"] = iso_ms(alert.fired_at)
    return msgspec.json.encode(
        {"type": event_type(alert), "timestamp": iso_ms(alert.fired_at), "data": data}
    ).decode()


def signed_headers(secrets: Sequence[str], message_id: str, body: str, now_ms: int) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt at `now_ms`, signed with each of the endpoint's
    signing secrets (storage.webhooks.Claimed.signing_secrets: the current one first, then the previous
    one during a rotation's overlap), the signatures space-delimited as the specification has it."""
    assert secrets and not isinstance(secrets, str), "a sequence of whsec_ secrets"
    timestamp = datetime.fromtimestamp(now_ms // 1000, tz=UTC)
    signatures = [Webhook(secret).sign(message_id, timestamp, body) for secret in secrets]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(now_ms // 1000),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def retry_delay_ms(attempts_made: int, settings: WebhookSettings, fraction: float) -> int:
    """The wait after the `attempts_made`-th failed attempt; `fraction` uniform in [0, 1) (full jitter)."""
    assert attempts_made >= 1, attempts_made
    assert 0.0 <= fraction < 1.0, fraction
    exponent = min(attempts_made - 1, 62)  # beyond that the cap has long won
    ceiling = min(settings.retry_delay_max_ms, settings.first_retry_delay_ms * 2**exponent)
    return int(ceiling * fraction)


def after_attempt(
    succeeded: bool,
    attempts_made: int,
    scheduled_at_ms: int,
    now_ms: int,
    settings: WebhookSettings,
    fraction: float,
) -> tuple[str, int | None]:
    """(state, next attempt time) after an attempt: delivered, pending until the next, or dead."""
    if succeeded:
        return DELIVERED, None
    next_at = now_ms + retry_delay_ms(attempts_made, settings, fraction)
    if next_at > scheduled_at_ms + settings.give_up_after_ms:
        return DEAD, None
    return PENDING, next_at


def is_success(status_code: int) -> bool:
    """2xx; a redirect is not followed and counts as a failure (Standard Webhooks)."""
    return 200 <= status_code < 300
