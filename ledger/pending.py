"""Pending credit: grants recorded but not yet effective at a time t (the third balance, beside settled
and live; README "Three balances"). A grant voided before it starts never becomes effective, so it is
not pending."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ledger.account import CreditBlock


class PendingGrant(NamedTuple):
    grant_id: str
    effective_at: int  # epoch ms
    amount: int
    expires_at: int | None  # epoch ms; None: never


def pending_grants(blocks: Iterable[CreditBlock], t: int) -> tuple[PendingGrant, ...]:
    """The blocks not yet effective at t, soonest first (then by grant id)."""
    pending = [
        PendingGrant(block.grant_id, block.effective_at, block.amount, block.expires_at)
        for block in blocks
        if block.effective_at > t and block.end > block.effective_at
    ]
    pending.sort(key=lambda grant: (grant.effective_at, grant.grant_id))
    return tuple(pending)


def pending_total(pending: Iterable[PendingGrant]) -> int:
    return sum(grant.amount for grant in pending)
