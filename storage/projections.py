"""The projections of the ledger, written by the projector from the log with its offsets in the same
transaction: ledger_events (archive of every event, unique on event id), ledger_entries (append-only),
balances (latest per tenant), projector_offsets."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Text,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base


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
    # Knowledge time: when the log accepted the event (its record's timestamp on ledger.events, stamped at
    # append; README "Audit"); `as_known_at` queries fold only events known by then. NULL for older rows.
    known_at_ms: Mapped[int | None] = mapped_column(BigInteger)

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
    # A usage entry's prompt tokens served from a prefix cache (billed at the cached price); else NULL.
    cached_prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # A usage entry's prompt version (`name@version`, the named system prompt it was built with); else NULL.
    prompt_version: Mapped[str | None] = mapped_column(Text)
    # A usage entry's API key id (per-key budgets sum usage by key and time, migration 0016); else NULL.
    api_key_id: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict] = mapped_column(JSONB)  # the entry as encode_entry wrote it
    source_topic: Mapped[str] = mapped_column(Text)
    source_partition: Mapped[int] = mapped_column(Integer)
    source_offset: Mapped[int] = mapped_column(BigInteger)
    recorded_at_ms: Mapped[int] = mapped_column(BigInteger)
    # The hash chain (ledger.chain, storage.audit): the entry's per-tenant sequence and hash, and its bytes
    # exactly as published (the hash is over them; JSONB reorders keys). NULL for entries of before it.
    chain_sequence: Mapped[int | None] = mapped_column(BigInteger)
    known_at_ms: Mapped[int | None] = mapped_column(BigInteger)  # when ledger.entries accepted the entry
    chain_hash: Mapped[str | None] = mapped_column(Text)
    record: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Finance (storage.finance, ledger.statement): when the entry is booked, what it does to the prepaid
    # balance (credits) and to deferred money, its model, whether it adjusts a closed period. NULL before.
    booked_at_ms: Mapped[int | None] = mapped_column(BigInteger)
    credits: Mapped[int | None] = mapped_column(BigInteger)
    money: Mapped[int | None] = mapped_column(BigInteger)
    model: Mapped[str | None] = mapped_column(Text)
    adjustment: Mapped[bool | None] = mapped_column(Boolean)

    __table_args__ = (
        Index(None, "tenant_id", "sequence"),
        Index(None, "booked_at_ms"),
        Index("ix_ledger_entries_tenant_id_chain_sequence", "tenant_id", "chain_sequence", unique=True),
        Index(
            "ix_ledger_entries_api_key_id_occurred_at_ms",
            "api_key_id",
            "occurred_at_ms",
            postgresql_where=text("api_key_id IS NOT NULL"),
        ),
    )


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


async def stored_offsets(session: AsyncSession, consumer_name: str) -> dict[tuple[str, int], int]:
    """A consumer's next offsets, by (topic, partition): the projector's, the webhook dispatcher's, the
    top-up agent's (each under its own name)."""
    rows = await session.execute(
        select(ProjectorOffset.topic, ProjectorOffset.partition, ProjectorOffset.next_offset).where(
            ProjectorOffset.projector_name == consumer_name
        )
    )
    return {(topic, partition): next_offset for topic, partition, next_offset in rows}


async def write_offsets(
    session: AsyncSession, consumer_name: str, next_offsets: Mapping[tuple[str, int], int]
) -> None:
    """In the caller's transaction: the consumer's next offsets, so they advance only with its rows."""
    if not next_offsets:
        return
    rows = [
        {"projector_name": consumer_name, "topic": topic, "partition": partition, "next_offset": offset}
        for (topic, partition), offset in next_offsets.items()
    ]
    statement = insert(ProjectorOffset).values(rows)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[ProjectorOffset.projector_name, ProjectorOffset.topic, ProjectorOffset.partition],
            set_={"next_offset": statement.excluded.next_offset},
        )
    )
