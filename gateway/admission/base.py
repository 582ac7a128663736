"""The admission contract between the API layer (gateway.routes) and the credit/rate-limit logic.

Life of a request:
    reservation = await admission.admit(AdmissionRequest(...))     # may raise a Rejection
    ... stream tokens ...
    await admission.finish(reservation, actual_cost)   # the worker emitted UsageRecorded(actual_cost)
    or
    await admission.release(reservation)               # nothing was produced, nothing is owed

After finish() the reservation keeps holding `actual_cost` until the fold has applied the request's
UsageRecorded (seen as its `usage_allocated` entry on `ledger.entries`, event id = request id); then
the balance view already reflects it and the hold is dropped. So available credit is always
    balance (from ledger.balances) - open holds.

Rejections carry what the API needs to answer in OpenAI's shape: an HTTP status, a type, a code, a
message, and the headers (Retry-After, x-ratelimit-*, x-should-retry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.admission.budgets import KeyBudget


@dataclass(frozen=True)
class AdmissionRequest:
    request_id: str
    tenant_id: str
    tier: str
    model: str
    prompt_tokens: int
    max_tokens: int
    estimated_cost: int  # prompt tokens + max_tokens at the model's integer prices
    budget: KeyBudget | None = None  # the API key's spend limits, when it has any (gateway.admission.budgets)


@dataclass
class Reservation:
    request_id: str
    tenant_id: str
    amount: int  # credit held now
    tokens: int  # tokens counted against the tokens-per-minute limit
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response


class Rejection(Exception):
    """The request is not admitted. Maps 1:1 onto an OpenAI error response."""

    status_code: int = 429
    error_type: str = "rate_limit_exceeded"
    code: str = "rate_limit_exceeded"
    param: str | None = None  # the limit that refused it, where one is named (a key's budget)

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class CreditExhausted(Rejection):
    status_code = 429
    error_type = "insufficient_quota"
    code = "credit_balance_exhausted"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "x-should-retry": "false"})


class RateLimited(Rejection):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class Overloaded(Rejection):
    """Backpressure: the workers' queues are full. Retryable."""

    status_code = 503
    error_type = "server_error"
    code = "overloaded"


class Admission(Protocol):
    async def admit(self, request: AdmissionRequest) -> Reservation: ...

    async def finish(self, reservation: Reservation, actual_cost: int) -> None: ...

    async def release(self, reservation: Reservation) -> None: ...
