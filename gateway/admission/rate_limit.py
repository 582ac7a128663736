"""Token-aware rate limits per tenant: requests per minute and tokens per minute, by the tenant's tier.

Each limit is a token bucket that holds at most one minute's allowance and refills evenly (a tenant
with 60 rpm may send 60 at once, then one per second). A request counts 1 request and
`prompt_tokens + max_tokens` tokens, taken at admission (as OpenAI counts them) and given back only
when the request is refused for credit.

The buckets live in this process's memory: with N gateway processes a tenant can get up to N times
its limits. A cluster-wide limit would need the strict-mode trick (one owner row per tenant).

Headers are OpenAI's: x-ratelimit-{limit,remaining,reset}-{requests,tokens}, where reset is the time
until the bucket is full again written like OpenAI does ("1s", "6m0s", "120ms"). A refusal adds
Retry-After (whole seconds, rounded up) and retry-after-ms.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.admission.base import RateLimited
from gateway.admission.metrics import (
    REASON_REQUEST_TOO_LARGE,
    REASON_REQUESTS_PER_MINUTE,
    REASON_TOKENS_PER_MINUTE,
)
from gateway.admission.settings import AdmissionSettings, TierLimits

WINDOW_MS = 60_000


class RequestsPerMinuteExceeded(RateLimited):
    reason = REASON_REQUESTS_PER_MINUTE


class TokensPerMinuteExceeded(RateLimited):
    reason = REASON_TOKENS_PER_MINUTE


class RequestTooLarge(RateLimited):
    """More tokens than a whole minute's allowance: waiting will not help."""

    reason = REASON_REQUEST_TOO_LARGE


class TokenBucket:
    """`limit` units per minute. The level is kept in units x WINDOW_MS so that refill is integer:
    each millisecond adds `limit` to it, and one unit costs WINDOW_MS."""

    __slots__ = ("limit", "level", "updated_ms")

    def __init__(self, limit: int, now_ms: int) -> None:
        assert limit >= 1, f"bucket limit must be positive, got {limit}"
        self.limit = limit
        self.level = limit * WINDOW_MS
        self.updated_ms = now_ms

    @property
    def capacity(self) -> int:
        return self.limit * WINDOW_MS

    def refill(self, now_ms: int) -> None:
        if now_ms > self.updated_ms:
            self.level = min(self.capacity, self.level + (now_ms - self.updated_ms) * self.limit)
            self.updated_ms = now_ms

    def resize(self, limit: int) -> None:
        """A new tier: keep what was used, clamped to the new capacity."""
        used = self.capacity - self.level
        self.limit = limit
        self.level = max(0, self.capacity - used)

    def remaining(self) -> int:
        return self.level // WINDOW_MS

    def is_full(self) -> bool:
        return self.level >= self.capacity

    def wait_ms(self, units: int) -> int:
        """How long until `units` can be taken (0: now)."""
        missing = units * WINDOW_MS - self.level
        return 0 if missing <= 0 else -(-missing // self.limit)

    def reset_ms(self) -> int:
        """How long until the bucket is full again."""
        return -(-(self.capacity - self.level) // self.limit)

    def take(self, units: int) -> None:
        assert self.level >= units * WINDOW_MS, "take() without room: call wait_ms() first"
        self.level -= units * WINDOW_MS

    def give_back(self, units: int) -> None:
        self.level = min(self.capacity, self.level + units * WINDOW_MS)


def format_duration(ms: int) -> str:
    """OpenAI's reset format: "120ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    if ms < 1_000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1_000)
    second_text = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{second_text}"
    if minutes:
        return f"{minutes}m{second_text}"
    return second_text


@dataclass
class _TenantBuckets:
    requests: TokenBucket
    tokens: TokenBucket


class RateLimiter:
    """Requests and tokens per minute per tenant, limits by tier. Not thread-safe: one event loop."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self._buckets: dict[str, _TenantBuckets] = {}

    def acquire(self, tenant_id: str, tier: str, tokens: int, now_ms: int) -> dict[str, str]:
        """Take 1 request and `tokens` tokens; return the x-ratelimit-* headers. Raises RateLimited."""
        assert tokens >= 0, f"token count must be non-negative, got {tokens}"
        limits = self.settings.limits_of(tier)
        buckets = self._tenant_buckets(tenant_id, limits, now_ms)
        if tokens > limits.tokens_per_minute:
            raise RequestTooLarge(
                f"Request too large: it needs {tokens} tokens (prompt + max_tokens), more than the "
                f"{limits.tokens_per_minute} tokens per minute of tier {tier!r}. Lower max_tokens or the prompt.",  # noqa: E501
                headers={**_headers(buckets), "x-should-retry": "false"},
            )
        wait_requests_ms = buckets.requests.wait_ms(1)
        wait_tokens_ms = buckets.tokens.wait_ms(tokens)
        if wait_requests_ms or wait_tokens_ms:
            wait_ms = max(wait_requests_ms, wait_tokens_ms)
            which = "requests" if wait_requests_ms >= wait_tokens_ms else "tokens"
            limit = limits.requests_per_minute if which == "requests" else limits.tokens_per_minute
            refusal = RequestsPerMinuteExceeded if which == "requests" else TokensPerMinuteExceeded
            raise refusal(
                f"Rate limit reached for {which} per minute: limit {limit}, tier {tier!r}. "
                f"Try again in {format_duration(wait_ms)}.",
                headers={
                    **_headers(buckets),
                    "retry-after": str(-(-wait_ms // 1_000)),
                    "retry-after-ms": str(wait_ms),
                },
            )
        buckets.requests.take(1)
        buckets.tokens.take(tokens)
        return _headers(buckets)

    def peek_headers(self, tenant_id: str, tier: str, now_ms: int) -> dict[str, str]:
        """The headers as they stand, taking nothing (for responses refused for another reason)."""
        return _headers(self._tenant_buckets(tenant_id, self.settings.limits_of(tier), now_ms))

    def give_back(self, tenant_id: str, tokens: int, now_ms: int) -> dict[str, str]:
        """Undo an acquire() whose request was then refused (for credit). Returns the headers after it."""
        buckets = self._buckets.get(tenant_id)
        if buckets is None:
            return {}
        for bucket in (buckets.requests, buckets.tokens):
            bucket.refill(now_ms)
        buckets.requests.give_back(1)
        buckets.tokens.give_back(tokens)
        return _headers(buckets)

    def sweep(self, now_ms: int) -> int:
        """Forget tenants whose buckets are full again (a fresh bucket is the same). Returns how many."""
        idle = []
        for tenant_id, buckets in self._buckets.items():
            buckets.requests.refill(now_ms)
            buckets.tokens.refill(now_ms)
            if buckets.requests.is_full() and buckets.tokens.is_full():
                idle.append(tenant_id)
        for tenant_id in idle:
            del self._buckets[tenant_id]
        return len(idle)

    def tenants_tracked(self) -> int:
        return len(self._buckets)

    def _tenant_buckets(self, tenant_id: str, limits: TierLimits, now_ms: int) -> _TenantBuckets:
        buckets = self._buckets.get(tenant_id)
        if buckets is None:
            buckets = self._buckets[tenant_id] = _TenantBuckets(
                TokenBucket(limits.requests_per_minute, now_ms), TokenBucket(limits.tokens_per_minute, now_ms)
            )
            return buckets
        buckets.requests.refill(now_ms)
        buckets.tokens.refill(now_ms)
        if buckets.requests.limit != limits.requests_per_minute:
            buckets.requests.resize(limits.requests_per_minute)
        if buckets.tokens.limit != limits.tokens_per_minute:
            buckets.tokens.resize(limits.tokens_per_minute)
        return buckets


def _headers(buckets: _TenantBuckets) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(buckets.requests.limit),
        "x-ratelimit-remaining-requests": str(buckets.requests.remaining()),
        "x-ratelimit-reset-requests": format_duration(buckets.requests.reset_ms()),
        "x-ratelimit-limit-tokens": str(buckets.tokens.limit),
        "x-ratelimit-remaining-tokens": str(buckets.tokens.remaining()),
        "x-ratelimit-reset-tokens": format_duration(buckets.tokens.reset_ms()),
    }
