"""SQLAlchemy models of the PostgreSQL projections. Money is BIGINT credit units; every time is BIGINT
epoch milliseconds (`*_at_ms`), like the ledger.

Command side (written by the admin API): tenants, api_keys, grants.
Projections (written by the projector from Kafka, with its offsets in the same transaction):
ledger_events (archive of every event, unique on event id), ledger_entries (append-only),
balances (latest per tenant), projector_offsets.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    tier: Mapped[str] = mapped_column(Text)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)

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

    __table_args__ = (CheckConstraint("octet_length(secret_sha256) = 32", name="secret_sha256_length"),)


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

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint(
            "expires_at_ms IS NULL OR expires_at_ms > effective_at_ms", name="expiry_after_effective"
        ),
        CheckConstraint("(voided_at_ms IS NULL) = (void_event_id IS NULL)", name="void_complete"),
    )


class LedgerEvent(Base):
    """Archive of every ledger event (inputs and derived), exactly once per event id."""

    __tablename__ = "ledger_events"

    event_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    occurred_at_ms: Mapped[int] = mapped_column(BigInteger)  # the event's own time (event.timestamp)
    payload: Mapped[dict] = mapped_column(JSONB)  # the event as encode_event wrote it
    source_topic: Mapped[str] = mapped_column(Text)
    source_partition: Mapped[int] = mapped_column(Integer)
    source_offset: Mapped[int] = mapped_column(BigInteger)
    recorded_at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "tenant_id", "occurred_at_ms"),)


class LedgerEntry(Base):
    """Finance entries (allocations, forfeits, corrections), append-only, in the order recorded."""

    __tablename__ = "ledger_entries"

    sequence: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    entry_id: Mapped[str] = mapped_column(Text, unique=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    entry_type: Mapped[str] = mapped_column(Text)
    occurred_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    amount: Mapped[int | None] = mapped_column(BigInteger)
    payload: Mapped[dict] = mapped_column(JSONB)  # the entry as encode_entry wrote it
    source_topic: Mapped[str] = mapped_column(Text)
    source_partition: Mapped[int] = mapped_column(Integer)
    source_offset: Mapped[int] = mapped_column(BigInteger)
    recorded_at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "tenant_id", "sequence"),)


class Balance(Base):
    """The latest balance record per tenant from the compacted `ledger.balances` topic."""

    __tablename__ = "balances"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger)
    overage: Mapped[int] = mapped_column(BigInteger)
    as_of_ms: Mapped[int] = mapped_column(BigInteger)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class ProjectorOffset(Base):
    """The next Kafka offset a projector will read, written in the transaction of the rows it produced."""

    __tablename__ = "projector_offsets"

    projector_name: Mapped[str] = mapped_column(Text, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("next_offset >= 0", name="next_offset_non_negative"),)


APPEND_ONLY_TABLES = ("ledger_events", "ledger_entries")


# --- The embedded event log (streams.embedded_log) and the embedded processor's state ------------------
# Only `make run`'s single-process mode uses them; with Kafka they stay empty.

log_records = Table(
    "log_records",
    Base.metadata,
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("log_offset", BigInteger, nullable=False),
    Column("key", LargeBinary, nullable=True),
    Column("value", LargeBinary, nullable=True),
    Column("timestamp_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition", "log_offset", name="pk_log_records"),
)

log_partition_heads = Table(
    "log_partition_heads",
    Base.metadata,
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("next_offset", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "partition", name="pk_log_partition_heads"),
    CheckConstraint("next_offset >= 0", name="next_offset_non_negative"),
)

processor_state = Table(
    "processor_state",
    Base.metadata,
    Column("processor_name", Text, nullable=False),
    Column("key", LargeBinary, nullable=False),
    Column("value", LargeBinary, nullable=False),
    PrimaryKeyConstraint("processor_name", "key", name="pk_processor_state"),
)
