"""The append-only admin audit log: every admin action that changed something, with who did it.

After a mutating admin request succeeds (`AdminRoute` calls `record_action`), one row goes into
`admin_audit_log`: the credential's name and role, the time, the request id (the `X-Request-Id` header,
or one generated and returned in it), the action (method and route), its target (the path's ids), what
changed (the request body and the status) and the event ids the request published on `ledger.events`.

Covered by the chain's checkpoints: the rows form a hash chain of their own, `admin-audit`, linked
exactly like a tenant's entries (`ledger.chain`: the row's JSON body, its sequence and the previous hash),
and every row carries the signed checkpoint over it (the same Ed25519 key and format as
`ledger.checkpoints`), so `tollgate audit verify` checks that no row was altered, removed or reordered.
Rows are appended under a transaction-scoped advisory lock, so gateways append one at a time.

    GET /admin/v1/audit/log?since=&limit=   the rows after sequence `since`, oldest first
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from sqlalchemy import func, select, text

from gateway.admin.deps import PRINCIPAL_STATE, RUNTIME_STATE, Sessions, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminRoute
from gateway.admin.principals import READ_ONLY_METHODS
from ledger.chain import ADMIN_CHAIN, GENESIS_HASH, ChainState, append_entries, checkpoint_body
from ledger.events import Event
from storage.audit import AdminAuditRecord
from streams.audit_checkpoints import AuditSettings, CheckpointPolicy

REQUEST_ID_HEADER = "x-request-id"
AUDIT_LOCK = 0x7A0D17  # pg_advisory_xact_lock key: one append at a time, across gateways
LOG_PAGE_MAX = 500


class AdminAction(msgspec.Struct, frozen=True, kw_only=True):
    """A row's hashed body (its columns say the same; `tollgate audit verify` compares them)."""

    at: int
    credential: str
    role: str
    request_id: str
    action: str
    target: str
    details: dict[str, Any]
    event_ids: list[str]


@dataclass
class CapturingPublisher:
    """The request's publisher, noting the ids of the events it published."""

    inner: Any
    event_ids: list[str] = field(default_factory=list)

    @property
    def topics(self):
        return self.inner.topics

    async def publish(self, event: Event) -> object:
        result = await self.inner.publish(event)
        self.event_ids.append(event.event_id)
        return result

    async def append(self, topic: str, key: bytes, value: bytes) -> object:
        return await self.inner.append(topic, key, value)


@lru_cache(maxsize=4)
def _signer(path: Path) -> CheckpointPolicy:
    return CheckpointPolicy.from_settings(AuditSettings(signing_key_path=path))


def signer() -> CheckpointPolicy:
    return _signer(AuditSettings().signing_key_path)


def request_id(request: Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


async def record_action(request: Request, response: Response, event_ids: list[str]) -> None:
    """Append the row of a request that changed something (a mutating method that succeeded)."""
    if request.method in READ_ONLY_METHODS or response.status_code >= 400:
        return
    runtime, principal = getattr(request.state, RUNTIME_STATE), getattr(request.state, PRINCIPAL_STATE)
    identifier = response.headers.get(REQUEST_ID_HEADER) or request_id(request)
    response.headers[REQUEST_ID_HEADER] = identifier
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    route = request.scope.get("route")
    action = AdminAction(
        at=runtime.clock_ms(),
        credential=principal.name,
        role=principal.role,
        request_id=identifier,
        action=f"{request.method} {getattr(route, 'path', request.url.path)}",
        target=",".join(f"{k}={v}" for k, v in sorted(request.path_params.items())),
        details={"body": body, "status": response.status_code},
        event_ids=list(event_ids),
    )
    await append(runtime.sessions, action, signer())


async def append(sessions, action: AdminAction, policy: CheckpointPolicy) -> int:
    """Link the action onto the log's chain and insert it with its signed checkpoint; its sequence."""
    async with sessions() as session, session.begin():
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK})
        last = (
            await session.execute(
                select(AdminAuditRecord).order_by(AdminAuditRecord.sequence.desc()).limit(1)
            )
        ).scalar_one_or_none()
        count = 0 if last is None else last.sequence
        head = GENESIS_HASH if last is None else bytes.fromhex(last.chain_hash)
        chain = ChainState(count, head, [], count, count, action.at)
        records: list[bytes] = []
        body = msgspec.json.encode(action)
        (checkpoint,) = append_entries(
            chain, [body], records, 1, ADMIN_CHAIN, (0, action.at, 0), policy.key_id
        )
        session.add(
            AdminAuditRecord(
                sequence=chain.sequence,
                at_ms=action.at,
                credential_name=action.credential,
                role=action.role,
                request_id=action.request_id,
                action=action.action,
                target=action.target,
                details=action.details,
                event_ids=action.event_ids,
                chain_previous=head.hex(),
                chain_hash=chain.head.hex(),
                record=records[0],
                checkpoint=policy.sign(checkpoint_body(checkpoint)),
            )
        )
    return chain.sequence


router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class AuditLogRow(BaseModel):
    sequence: int
    at: int
    credential_name: str
    role: str
    request_id: str
    action: str
    target: str
    details: dict[str, Any]
    event_ids: list[str]
    hash: str


class AuditLogPage(BaseModel):
    rows: list[AuditLogRow]
    next_since: int
    total: int


@router.get("/audit/log", response_model=AuditLogPage)
async def get_audit_log(
    sessions: Sessions,
    since: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=LOG_PAGE_MAX)] = 100,
) -> AuditLogPage:
    async with sessions() as session:
        rows = (
            (
                await session.execute(
                    select(AdminAuditRecord)
                    .where(AdminAuditRecord.sequence > since)
                    .order_by(AdminAuditRecord.sequence)
                    .limit(limit)
                )
            )
            .scalars()
            .all()
        )
        total = (await session.execute(select(func.count()).select_from(AdminAuditRecord))).scalar_one()
    views = [
        AuditLogRow(
            sequence=r.sequence,
            at=r.at_ms,
            credential_name=r.credential_name,
            role=r.role,
            request_id=r.request_id,
            action=r.action,
            target=r.target,
            details=r.details,
            event_ids=r.event_ids,
            hash=r.chain_hash,
        )
        for r in rows
    ]
    return AuditLogPage(rows=views, next_since=views[-1].sequence if views else since, total=total)
