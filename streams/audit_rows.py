"""The projection rows of the hash chain: an entry's chain columns and a checkpoint's row (pure)."""

from __future__ import annotations

from ledger.chain import BrokenRecord, split_record, split_signed
from ledger.events import InvalidEvent
from streams.records import LogRecord


def chain_columns(value: bytes) -> dict:
    """An entry row's chain columns: its sequence and hash, and its bytes as published. An entry without a
    link (published before the chain existed) gets none."""
    try:
        _, link = split_record(value)
    except BrokenRecord:
        return {"chain_sequence": None, "chain_hash": None, "record": value}
    return {"chain_sequence": link.sequence, "chain_hash": link.hash, "record": value}


def checkpoint_row(record: LogRecord, now_ms: int) -> dict:
    assert record.value is not None, "an empty checkpoint record is refused before this"
    try:
        _, checkpoint, signature = split_signed(record.value)
    except BrokenRecord as error:
        raise InvalidEvent(f"invalid checkpoint: {error}") from None
    return {
        "tenant_id": checkpoint.tenant_id,
        "number": checkpoint.number,
        "first_sequence": checkpoint.first_sequence,
        "last_sequence": checkpoint.last_sequence,
        "head_hash": checkpoint.head_hash,
        "merkle_root": checkpoint.merkle_root,
        "stream_time_ms": checkpoint.stream_time,
        "key_id": checkpoint.key_id,
        "signature": signature.hex(),
        "record": record.value,
        "source_partition": record.partition,
        "source_offset": record.offset,
        "recorded_at_ms": now_ms,
    }
