"""The audit tables: the signed checkpoints of the entries' hash chains (projected from
`ledger.checkpoints`), the named admin credentials with their roles, and the append-only admin audit log.

    ledger_checkpoints  one row per (tenant, checkpoint number), with the signed record as published
    admin_credentials   named credentials (operator, finance), stored as a SHA-256 of the secret like API
                        keys; revoked, never deleted
    admin_audit_log     every admin action: who (credential name, role), when, the request id, what
                        changed and the resulting event ids; hash-chained like a tenant's entries
                        (`ledger.chain`), each row signed as a checkpoint of the chain `admin-audit`
                        (rows are only ever inserted)

The entries' chain fields live on `ledger_entries` (storage.projections): `chain_sequence`,
`chain_hash` and `record`, the entry's bytes exactly as published (JSONB does not keep bytes).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Index, Integer, LargeBinary, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base

ADMIN_ROLES = ("operator", "finance")


class LedgerCheckpoint(Base):
    """A tenant's signed checkpoint as published on `ledger.checkpoints` (`record` holds its bytes)."""

    __tablename__ = "ledger_checkpoints"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    first_sequence: Mapped[int] = mapped_column(BigInteger)
    last_sequence: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(Text)
    merkle_root: Mapped[str] = mapped_column(Text)
    stream_time_ms: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(Text)
    record: Mapped[bytes] = mapped_column(LargeBinary)
    source_partition: Mapped[int] = mapped_column(Integer)
    source_offset: Mapped[int] = mapped_column(BigInteger)
    recorded_at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "tenant_id", "last_sequence"),)


class AdminCredential(Base):
    """A named admin credential. The secret is shown once at creation; only its SHA-256 is kept."""

    __tablename__ = "admin_credentials"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    role: Mapped[str] = mapped_column(Text)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_at_ms: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("role IN ('operator', 'finance')", name="known_role"),)


class AdminAuditRecord(Base):
    """One admin action. `sequence` is the position on the log's hash chain; `record` the hashed body."""

    __tablename__ = "admin_audit_log"

    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    credential_name: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)  # what changed: a tenant, grant, key or credential id
    details: Mapped[dict] = mapped_column(JSONB)
    event_ids: Mapped[list] = mapped_column(JSONB)
    chain_previous: Mapped[str] = mapped_column(Text)
    chain_hash: Mapped[str] = mapped_column(Text, unique=True)
    record: Mapped[bytes] = mapped_column(LargeBinary)  # the hashed body (ledger.chain's entry hash)
    checkpoint: Mapped[bytes] = mapped_column(LargeBinary)  # the signed checkpoint over this row
