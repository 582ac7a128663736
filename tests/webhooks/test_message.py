"""The message and the retry schedule, without I/O: a signature the standardwebhooks verifier accepts and
a tampered one it refuses; during a rotation's overlap two signatures, either secret verifying, and only
the current one from the overlap's end; full-jitter delays within their doubling caps; giving up on time."""

from __future__ import annotations

import time
from typing import get_args

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from ledger.alerts import AlertKind
from storage.webhooks import DEAD, DELIVERED, PENDING, Claimed
from streams.webhooks.message import EVENT_TYPES, after_attempt, body_of, retry_delay_ms, signed_headers
from streams.webhooks.settings import WebhookSettings
from tests.webhooks.conftest import alert, new_secret

SETTINGS = WebhookSettings(first_retry_delay_ms=1_000, retry_delay_max_ms=60_000, give_up_after_ms=3_600_000)


def test_every_alert_kind_has_a_webhook_type():
    assert set(EVENT_TYPES) == set(get_args(AlertKind))


def test_a_signed_message_verifies_and_a_tampered_one_does_not():
    secret, item = new_secret(), alert("acme", 3)
    body = body_of(item)
    headers = signed_headers([secret], item.alert_id, body, int(time.time() * 1000))
    assert headers["webhook-id"] == "acme:low:3"
    assert Webhook(secret).verify(body, headers)["data"]["alert_id"] == item.alert_id
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body.replace('"balance":97', '"balance":98'), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    stale = signed_headers([secret], item.alert_id, body, int(time.time() * 1000) - 600_000)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)


def claimed(secret: str, previous: str | None, expires_at_ms: int | None) -> Claimed:
    return Claimed(
        "we_1", "acme:low:1", "acme", "{}", 0, 0, 0, 0, "http://x/", secret, True, previous, expires_at_ms
    )


def test_during_an_overlap_both_secrets_sign_and_either_verifies_after_it_only_the_current():
    current, previous, stranger = new_secret(), new_secret(), new_secret()
    now = int(time.time() * 1000)
    delivery = claimed(current, previous, now + 1)
    assert delivery.signing_secrets(now) == (current, previous)
    assert delivery.signing_secrets(now + 1) == (current,)  # the overlap ends at its expiry
    assert claimed(current, None, None).signing_secrets(now) == (current,)

    item = alert("acme", 1)
    body = body_of(item)
    headers = signed_headers(delivery.signing_secrets(now), item.alert_id, body, now)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(signature.startswith("v1,") for signature in signatures)
    for secret in (current, previous):
        assert Webhook(secret).verify(body, headers)["data"]["alert_id"] == item.alert_id
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(body, headers)
    after = signed_headers(delivery.signing_secrets(now + 1), item.alert_id, body, now + 1)
    assert Webhook(current).verify(body, after)
    with pytest.raises(WebhookVerificationError):
        Webhook(previous).verify(body, after)


def test_delays_are_full_jitter_under_a_doubling_cap():
    for attempts, cap in ((1, 1_000), (2, 2_000), (3, 4_000), (6, 32_000), (7, 60_000), (40, 60_000)):
        assert retry_delay_ms(attempts, SETTINGS, 0.0) == 0
        assert retry_delay_ms(attempts, SETTINGS, 0.5) == cap // 2
        assert cap - 1 <= retry_delay_ms(attempts, SETTINGS, 0.999_999_9) < cap


def test_success_delivers_failure_retries_and_the_deadline_dead_letters():
    assert after_attempt(True, 5, 0, 10, SETTINGS, 0.5) == (DELIVERED, None)
    assert after_attempt(False, 1, 0, 10, SETTINGS, 0.5) == (PENDING, 510)
    deadline = SETTINGS.give_up_after_ms
    assert after_attempt(False, 9, 0, deadline - 30_000, SETTINGS, 0.5) == (PENDING, deadline)
    assert after_attempt(False, 9, 0, deadline - 29_999, SETTINGS, 0.5) == (DEAD, None)
