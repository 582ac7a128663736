"""A small ledger written through the embedded log, processor and projector into Postgres, with seeded
checkpoint settings and a key of its own: the material the audit tests verify and tamper with."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from streams.audit_checkpoints import CheckpointPolicy, key_id
from streams.embedded_log import PostgresLog
from streams.embedded_processor import EmbeddedProcessor
from streams.embedded_projector import EmbeddedProjector

TENANTS = ("acme", "globex")
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"tests.audit").digest())


def policy(entries_max: int = 4) -> CheckpointPolicy:
    return CheckpointPolicy(entries_max, 10**12, KEY, key_id(KEY.public_key()))


def ledger_events(seed: int = 3, usage: int = 30) -> list:
    rng = random.Random(seed)
    events: list = []
    for tenant in TENANTS:
        events.append(
            CreditGranted(
                event_id=f"{tenant}-g1",
                tenant_id=tenant,
                grant_id=f"{tenant}-g1",
                amount=1_000,
                effective_at=0,
                expires_at=None,
                priority=0,
            )
        )
        events.append(
            CreditGranted(
                event_id=f"{tenant}-g2",
                tenant_id=tenant,
                grant_id=f"{tenant}-g2",
                amount=500,
                effective_at=0,
                expires_at=None,
                priority=1,
            )
        )
        for i in range(usage):
            events.append(
                UsageRecorded(
                    event_id=f"{tenant}-u{i}",
                    tenant_id=tenant,
                    amount=rng.randint(1, 40),
                    occurred_at=1_000 + i * 10,
                    model="tollgate-tiny",
                    prompt_tokens=3,
                    completion_tokens=4,
                )
            )
        events.append(
            CreditGranted(
                event_id=f"{tenant}-g3",
                tenant_id=tenant,
                grant_id=f"{tenant}-g3",
                amount=50,
                effective_at=0,
                expires_at=1_100,
                priority=2,
            )
        )
        events.append(
            GrantVoided(event_id=f"{tenant}-v2", tenant_id=tenant, grant_id=f"{tenant}-g2", voided_at=1_150)
        )
    return events


@dataclass
class Ledger:
    log: PostgresLog
    session_factory: async_sessionmaker[AsyncSession]


async def write_ledger(log: PostgresLog, session_factory, events, batch_max: int = 7) -> None:
    processor = EmbeddedProcessor(log, batch_max=batch_max)
    processor.processor.checkpoints = policy()
    await processor.start()
    for index, event in enumerate(events):
        await log.publish(event)
        if index % 11 == 10:
            while await processor.step():
                pass
    while await processor.step():
        pass
    projector = EmbeddedProjector(log, session_factory, batch_max=50)
    while await projector.step():
        pass
