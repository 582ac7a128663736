"""Strict admission's tables (gateway.admission.strict_store, migration 0004): the tenant's owner row
and the open holds.

    admission_accounts  one row per tenant: the newest ledger balance any gateway's view has brought
                        (by applied_offset, then as_of), with its expiring blocks. Reservations lock it.
    admission_holds     one row per admitted request until its usage is folded into that balance,
                        it is released, or it expires.
    admission_key_unprojected  a settled hold of a key with a budget until its usage entry is projected
                        (migration 0019): the key's budget counts it meanwhile.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base

# A settled usage whose entry was not projected within this long stops counting against its key's budget
# (the projector is that far behind, or the fold refused the usage): its entry, once projected, counts.
UNPROJECTED_COUNTED_MAX_MS = 3_600_000


class AdmissionAccount(Base):
    __tablename__ = "admission_accounts"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)  # credit left at as_of_ms
    applied_offset: Mapped[int] = mapped_column(BigInteger)  # -1: no balance seen yet
    as_of_ms: Mapped[int] = mapped_column(BigInteger)
    expiring: Mapped[list] = mapped_column(JSONB)  # [[expires_at_ms, remaining], ...] of blocks in balance
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class AdmissionHold(Base):
    __tablename__ = "admission_holds"

    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text, index=True)
    amount: Mapped[int] = mapped_column(
        BigInteger
    )  # the estimate while running, the actual cost once finished
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int] = mapped_column(
        BigInteger
    )  # hold_timeout_ms, then settle_timeout_ms once finished
    finished_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # The API key of the request when the key has a budget (migration 0016): its holds count against it.
    api_key_id: Mapped[str | None] = mapped_column(Text, index=True)

    __table_args__ = (CheckConstraint("amount >= 0", name="amount_non_negative"),)


class AdmissionKeyUnprojected(Base):
    """A key's usage folded (its hold settled) whose entry the projector has not written yet."""

    __tablename__ = "admission_key_unprojected"

    entry_id: Mapped[str] = mapped_column(Text, primary_key=True)  # ledger.entries.usage_entry_id
    api_key_id: Mapped[str] = mapped_column(Text, index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    settled_at_ms: Mapped[int] = mapped_column(BigInteger)
