"""Idempotency-Key on non-streaming requests: the first request with a key runs and its response is
stored in Postgres (table `idempotent_responses`, `storage.idempotency`); a repeat with the same key and
body gets the stored response back (header `Idempotent-Replayed: true`) and runs nothing, so it is
billed once.

    begin()    claims the key (a row with no response yet) or says what is there: the stored response,
               another request still running with it (409), or the key used for another body (400)
    complete() stores the response (only successful ones are stored)
    abandon()  frees the claim of a request that failed, so a retry may run

A claim older than `stale_after_ms` (its gateway died mid-request) may be taken over.
Keys are per tenant: one tenant's key never matches another's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import ApiError
from storage.idempotency import IdempotentResponse


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: bytes
    request_id: str


def request_digest(path: str, raw_body: bytes) -> bytes:
    return hashlib.sha256(path.encode() + b"\n" + raw_body).digest()


class IdempotencyStore:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession], stale_after_ms: int) -> None:
        self._session_factory = session_factory
        self._stale_after_ms = stale_after_ms

    async def begin(
        self, tenant_id: str, key: str, digest: bytes, request_id: str, now_ms: int
    ) -> StoredResponse | None:
        """None: the key is ours now, run the request. A StoredResponse: answer it instead."""
        table = IdempotentResponse.__table__
        async with self._session_factory() as session, session.begin():
            claimed = await session.scalar(
                insert(table)
                .values(
                    tenant_id=tenant_id,
                    idempotency_key=key,
                    request_sha256=digest,
                    request_id=request_id,
                    created_at_ms=now_ms,
                )
                .on_conflict_do_nothing(index_elements=[table.c.tenant_id, table.c.idempotency_key])
                .returning(table.c.request_id)
            )
            if claimed is not None:
                return None
            row = (
                await session.execute(
                    select(table)
                    .where(table.c.tenant_id == tenant_id, table.c.idempotency_key == key)
                    .with_for_update()
                )
            ).one()
            if row.request_sha256 != digest:
                raise ApiError(
                    400,
                    "This Idempotency-Key was already used with a different request body.",
                    param="Idempotency-Key",
                    code="idempotency_key_reused",
                )
            if row.status_code is not None:
                return StoredResponse(row.status_code, row.response_body, row.request_id)
            if row.created_at_ms > now_ms - self._stale_after_ms:
                raise ApiError(
                    409,
                    "A request with this Idempotency-Key is still running; retry when it has finished.",
                    param="Idempotency-Key",
                    code="idempotency_key_in_use",
                    headers={"Retry-After": "1"},
                )
            await session.execute(
                update(table)
                .where(table.c.tenant_id == tenant_id, table.c.idempotency_key == key)
                .values(request_id=request_id, created_at_ms=now_ms)
            )
            return None

    async def complete(
        self, tenant_id: str, key: str, request_id: str, status_code: int, body: bytes, now_ms: int
    ) -> None:
        table = IdempotentResponse.__table__
        async with self._session_factory() as session, session.begin():
            await session.execute(
                update(table)
                .where(_claim_of(tenant_id, key, request_id))
                .values(status_code=status_code, response_body=body, completed_at_ms=now_ms)
            )

    async def abandon(self, tenant_id: str, key: str, request_id: str) -> None:
        async with self._session_factory() as session, session.begin():
            await session.execute(delete(IdempotentResponse).where(_claim_of(tenant_id, key, request_id)))


def _claim_of(tenant_id: str, key: str, request_id: str):
    table = IdempotentResponse.__table__
    return and_(
        table.c.tenant_id == tenant_id,
        table.c.idempotency_key == key,
        table.c.request_id == request_id,
        table.c.status_code.is_(None),
    )
