"""Ledger rows in Postgres as the projector writes them, for gateway tests without a broker: input events
folded by the pure ledger, then the events (archive) and their entries projected by the projector's own
code (streams.projector.rows_of_batch and write_batch)."""

from __future__ import annotations

import itertools

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.codec import encode_event
from ledger.entries import encode_entry
from ledger.tenant import Book
from streams.projector import rows_of_batch, write_batch
from streams.records import LogRecord
from streams.settings import StreamSettings
from streams.topics import LedgerTopics

TOPICS = LedgerTopics.from_settings(StreamSettings())
PROJECTOR = "gateway-tests"

_offsets = itertools.count()


async def project_events(sessions: async_sessionmaker[AsyncSession], events, now_ms: int) -> None:
    """Archive `events` and project the entries the fold derives from them (in this order, one tenant book
    per call, so pass every event of a tenant in one call)."""
    book = Book()
    records = []
    for event in events:
        key = event.tenant_id.encode()
        records.append(LogRecord(TOPICS.events, 0, next(_offsets), key, encode_event(event), now_ms))
        for entry in book.apply(event):
            records.append(LogRecord(TOPICS.entries, 0, next(_offsets), key, encode_entry(entry), now_ms))
    rows = rows_of_batch(TOPICS, records, now_ms)
    assert not rows.dead_letters, rows.dead_letters
    async with sessions() as session, session.begin():
        await write_batch(session, PROJECTOR, rows)
