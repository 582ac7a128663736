"""Named admin credentials and their roles: who may call the admin API, and what they may do.

    operator  every admin action
    finance   read-only: balances, entries, statements, exports, the audit key, proofs and log

A credential is `tga_<43 characters>` (32 random bytes, URL-safe base64), shown once when created; only
its SHA-256 is kept (`admin_credentials.secret_hash`, unique: the lookup index), for the reasons
`gateway.api_keys` gives for API keys. Revoked credentials stop working on the next request (no cache).
`TOLLGATE_ADMIN_TOKEN` stays the bootstrap operator credential, named `bootstrap`: it creates the
first named ones (`tollgate admin credentials create NAME --role operator`).

    POST /admin/v1/credentials                  {"name", "role"} -> the secret, once (operator)
    POST /admin/v1/credentials/{name}/revoke    (operator)
    GET  /admin/v1/credentials                  names, roles, created and revoked times
"""

from __future__ import annotations

import secrets
from typing import Literal

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.admin.deps import Clock, Identifier, Sessions, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from gateway.admin.models import IdentifierText
from gateway.admin.principals import BOOTSTRAP_NAME, CREDENTIAL_SCHEME, SECRET_BYTES, hash_credential
from storage.audit import AdminCredential

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class CredentialCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: IdentifierText
    role: Literal["operator", "finance"]


class CredentialView(BaseModel):
    name: str
    role: str
    created_at: int
    revoked_at: int | None


class CredentialCreated(CredentialView):
    secret: str = Field(description="the credential to present as a bearer token; shown once, never stored")


def view(row: AdminCredential) -> CredentialView:
    return CredentialView(
        name=row.name, role=row.role, created_at=row.created_at_ms, revoked_at=row.revoked_at_ms
    )


@router.post("/credentials", status_code=status.HTTP_201_CREATED, response_model=CredentialCreated)
async def create_credential(body: CredentialCreate, sessions: Sessions, clock: Clock) -> CredentialCreated:
    if body.name == BOOTSTRAP_NAME:
        raise AdminError(422, "name", f"{BOOTSTRAP_NAME!r} is the name of TOLLGATE_ADMIN_TOKEN")
    secret = CREDENTIAL_SCHEME + secrets.token_urlsafe(SECRET_BYTES)
    row = AdminCredential(
        name=body.name,
        role=body.role,
        secret_hash=hash_credential(secret),
        created_at_ms=clock(),
        revoked_at_ms=None,
    )
    try:
        async with sessions() as session, session.begin():
            session.add(row)
    except IntegrityError:
        raise AdminError(409, "name", f"a credential named {body.name!r} exists") from None
    return CredentialCreated(**view(row).model_dump(), secret=secret)


@router.post("/credentials/{name}/revoke", response_model=CredentialView)
async def revoke_credential(name: Identifier, sessions: Sessions, clock: Clock) -> CredentialView:
    async with sessions() as session, session.begin():
        row = (
            await session.execute(
                select(AdminCredential).where(AdminCredential.name == name).with_for_update()
            )
        ).scalar_one_or_none()
        if row is None:
            raise AdminError(404, "name", f"no credential named {name!r}")
        if row.revoked_at_ms is None:
            row.revoked_at_ms = clock()
    return view(row)


@router.get("/credentials", response_model=list[CredentialView])
async def list_credentials(sessions: Sessions) -> list[CredentialView]:
    async with sessions() as session:
        rows = (await session.execute(select(AdminCredential).order_by(AdminCredential.name))).scalars()
        return [view(row) for row in rows]
