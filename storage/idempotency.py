"""The responses of requests sent with an Idempotency-Key (gateway.idempotency), migration 0003."""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Index, Integer, LargeBinary, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base


class IdempotentResponse(Base):
    """A tenant's Idempotency-Key: claimed by `request_id` while it runs (no status yet), then its
    response."""
    
    

    __tablename__ = "idempotent_responses"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(Text, primary_key=True)
    request_sha256: Mapped[bytes] = mapped_column(LargeBinary)  # to refuse a key reused for another body
    request_id: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None while the first request runs
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    completed_at_ms: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_idempotent_responses_created_at_ms", "created_at_ms"),
        CheckConstraint("octet_length(request_sha256) = 32", name="request_sha256_length"),
        CheckConstraint("(status_code IS NULL) = (response_body IS NULL)", name="response_complete"),
    )
