"""The command side, written by the admin API: tenants, their API keys, and the credit grants it accepted."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, LargeBinary, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base


class Tenant(Base):
    __tablename__ = "tenants"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    tier: Mapped[str] = mapped_column(Text)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    # Overage (usage no credit covered) is priced on statements at this many minor units of
    # overage_currency per million credits; NULL: reported, not priced (ledger.statement).
    overage_rate_per_million_credits: Mapped[int | None] = mapped_column(BigInteger)
    overage_currency: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("length(name) BETWEEN 1 AND 200", name="name_length"),
        CheckConstraint("length(tier) BETWEEN 1 AND 64", name="tier_length"),
    )


class ApiKey(Base):
    """A tenant's API key `tg_<prefix>_<secret>`: the prefix is public, only sha256(secret) is kept."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(Text, unique=True)
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # Spend limits in credits per UTC day and per UTC calendar month (migration 0016); NULL: no limit.
    # Admission enforces them (gateway.admission.budgets) from the usage entries carrying the key's id.
    daily_credits: Mapped[int | None] = mapped_column(BigInteger)
    monthly_credits: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("octet_length(secret_sha256) = 32", name="secret_sha256_length"),
        CheckConstraint("daily_credits IS NULL OR daily_credits >= 0", name="daily_credits_non_negative"),
        CheckConstraint(
            "monthly_credits IS NULL OR monthly_credits >= 0", name="monthly_credits_non_negative"
        ),
    )


class Grant(Base):
    """A credit grant as the admin API accepted it, and its void. The event it emitted is event_id."""

    __tablename__ = "grants"

    grant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True
    )
    event_id: Mapped[str] = mapped_column(Text, unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    effective_at_ms: Mapped[int] = mapped_column(BigInteger)
    expires_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    priority: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(Text)
    request_sha256: Mapped[bytes] = mapped_column(LargeBinary)  # to refuse a key reused for another body
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    published_at_ms: Mapped[int | None] = mapped_column(BigInteger)  # None: CreditGranted not yet acked
    voided_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    void_event_id: Mapped[str | None] = mapped_column(Text, unique=True)
    void_published_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    # Money terms (ledger.events.CreditGranted); grants recorded before them are promotional.
    category: Mapped[str] = mapped_column(Text, server_default="promotional")
    price: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text, server_default="")
    # The models its credit pays for (CreditGranted.models); empty: any model. Migration 0013.
    models: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "expires_at_ms IS NULL OR expires_at_ms > effective_at_ms", name="expiry_after_effective"
        ),
        CheckConstraint("(voided_at_ms IS NULL) = (void_event_id IS NULL)", name="void_complete"),
    )
