"""The embedded event log (streams.embedded_log) and the embedded processor's state. Only `make run`'s
single-process mode uses them; with Kafka they stay empty.

    log_records          (topic, partition, log_offset) -> key, value, timestamp_ms
    log_partition_heads  (topic, partition) -> next_offset
    processor_state      (processor_name, key) -> value
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Integer, LargeBinary, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base


class EmbeddedLogRecord(Base):
    """One record appended to a partition of the embedded log, at `log_offset`."""

    __tablename__ = "log_records"

    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    log_offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    value: Mapped[bytes | None] = mapped_column(LargeBinary)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)


class EmbeddedLogHead(Base):
    """The offset the next record appended to a partition of the embedded log gets."""

    __tablename__ = "log_partition_heads"

    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("next_offset >= 0", name="next_offset_non_negative"),)


class ProcessorStateItem(Base):
    """One key of the embedded processor's state (account records, seen usage ids), by processor name."""

    __tablename__ = "processor_state"

    processor_name: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
