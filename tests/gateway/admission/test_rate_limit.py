"""Token buckets per tenant and tier, and the x-ratelimit-* headers OpenAI clients read."""

from __future__ import annotations

import pytest

from gateway.admission.base import RateLimited
from gateway.admission.rate_limit import RateLimiter, TokenBucket, format_duration
from gateway.admission.settings import AdmissionSettings, TierLimits

T0 = 1_800_000_000_000


def limiter(rpm: int = 60, tpm: int = 6_000) -> RateLimiter:
    tiers = {"free": TierLimits(requests_per_minute=rpm, tokens_per_minute=tpm),
             "pro": TierLimits(requests_per_minute=10 * rpm, tokens_per_minute=10 * tpm)}
    return RateLimiter(AdmissionSettings(tiers=tiers, tier_default="free"))


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0ms"), (120, "120ms"), (1_000, "1s"), (1_500, "1.5s"), (59_999, "59.999s"),
    (60_000, "1m0s"), (360_000, "6m0s"), (3_723_000, "1h2m3s"),
])
def test_durations_are_written_like_openai(ms, text):
    assert format_duration(ms) == text


def test_bucket_bursts_a_minute_then_refills_evenly():
    bucket = TokenBucket(60, T0)
    for _ in range(60):
        assert bucket.wait_ms(1) == 0
        bucket.take(1)
    assert bucket.remaining() == 0 and bucket.wait_ms(1) == 1_000 and bucket.reset_ms() == 60_000
    bucket.refill(T0 + 999)
    assert bucket.remaining() == 0
    bucket.refill(T0 + 1_000)
    assert bucket.remaining() == 1
    bucket.refill(T0 + 10 * 60_000)
    assert bucket.is_full() and bucket.remaining() == 60


def test_headers_count_requests_and_tokens():
    limits = limiter(rpm=60, tpm=6_000)
    headers = limits.acquire("acme", "free", 1_500, T0)
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "4500",
        "x-ratelimit-reset-tokens": "15s",
    }


def test_over_the_token_limit_refuses_with_retry_after_until_enough_tokens_refill():
    limits = limiter(rpm=60, tpm=6_000)
    limits.acquire("acme", "free", 5_000, T0)
    with pytest.raises(RateLimited) as refused:
        limits.acquire("acme", "free", 2_000, T0)  # 1000 left; 1000 more take 10 s at 100/s
    assert refused.value.reason == "tokens_per_minute"
    assert refused.value.headers["retry-after"] == "10"
    assert refused.value.headers["retry-after-ms"] == "10000"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "1000"
    limits.acquire("acme", "free", 2_000, T0 + 10_000)


def test_over_the_request_limit_refuses_and_takes_nothing():
    limits = limiter(rpm=2, tpm=6_000)
    limits.acquire("acme", "free", 10, T0)
    limits.acquire("acme", "free", 10, T0)
    with pytest.raises(RateLimited) as refused:
        limits.acquire("acme", "free", 10, T0 + 1)
    assert refused.value.reason == "requests_per_minute"
    assert refused.value.headers["retry-after"] == "30"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "5980"


def test_a_request_larger_than_a_minute_of_tokens_is_refused_for_good():
    limits = limiter(rpm=60, tpm=6_000)
    with pytest.raises(RateLimited) as refused:
        limits.acquire("acme", "free", 6_001, T0)
    assert refused.value.reason == "request_too_large"
    assert refused.value.headers["x-should-retry"] == "false"
    assert "retry-after" not in refused.value.headers


def test_tenants_and_tiers_are_separate_and_unknown_tiers_get_the_default():
    limits = limiter(rpm=1, tpm=6_000)
    limits.acquire("acme", "free", 1, T0)
    limits.acquire("globex", "free", 1, T0)
    assert limits.acquire("initech", "pro", 1, T0)["x-ratelimit-limit-requests"] == "10"
    assert limits.acquire("umbrella", "no-such-tier", 1, T0)["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(RateLimited):
        limits.acquire("acme", "free", 1, T0)


def test_give_back_undoes_an_acquire_and_sweep_forgets_idle_tenants():
    limits = limiter(rpm=1, tpm=6_000)
    limits.acquire("acme", "free", 100, T0)
    assert limits.give_back("acme", 100, T0)["x-ratelimit-remaining-requests"] == "1"
    limits.acquire("acme", "free", 100, T0)
    assert limits.sweep(T0 + 1_000) == 0
    assert limits.sweep(T0 + 60_000) == 1
    assert limits.tenants_tracked() == 0


def test_a_tier_change_keeps_what_was_used():
    limits = limiter(rpm=10, tpm=6_000)
    for _ in range(5):
        limits.acquire("acme", "free", 1, T0)
    assert limits.acquire("acme", "pro", 1, T0)["x-ratelimit-remaining-requests"] == "94"
