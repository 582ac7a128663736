"""The admin API's tenant policy routes: a tenant's retention of stored conversations and responses and
its safety policy (gateway.safety), one row in `tenant_policies`.

    PUT /admin/v1/tenants/{tenant_id}/policy   {"retention_days": 30 | null, "safety": {...}}
    GET /admin/v1/tenants/{tenant_id}/policy

`retention_days: null` keeps stored text until the tenant deletes it. A gateway applies a change within
TOLLGATE_GATEWAY_POLICY_CACHE_TTL_MS; the next retention sweep deletes what the new retention has expired.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.dialects.postgresql import insert

from gateway.admin import commands
from gateway.admin.deps import Clock, Sessions, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminRoute
from gateway.safety import SafetyPolicy
from storage.conversations import TenantPolicy

RETENTION_DAYS_MAX = 36_500  # a hundred years: longer is "keep" (null)

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class TenantPolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retention_days: int | None = Field(
        default=None, ge=1, le=RETENTION_DAYS_MAX, description="null: keep stored text until deleted"
    )
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy)


class TenantPolicyView(TenantPolicyBody):
    tenant_id: str
    updated_at_ms: int


@router.put("/tenants/{tenant_id}/policy", response_model=TenantPolicyView)
async def put_policy(
    tenant_id: TenantIdPath, body: TenantPolicyBody, sessions: Sessions, clock: Clock
) -> TenantPolicyView:
    now_ms = clock()
    values = {
        "retention_days": body.retention_days,
        "safety_policy_json": body.safety.model_dump_json(),
        "updated_at_ms": now_ms,
    }
    async with sessions() as session, session.begin():
        await commands.existing_tenant(session, tenant_id)
        await session.execute(
            insert(TenantPolicy)
            .values(tenant_id=tenant_id, **values)
            .on_conflict_do_update(index_elements=[TenantPolicy.tenant_id], set_=values)
        )
    return TenantPolicyView(tenant_id=tenant_id, updated_at_ms=now_ms, **body.model_dump())


@router.get("/tenants/{tenant_id}/policy", response_model=TenantPolicyView)
async def get_policy(tenant_id: TenantIdPath, sessions: Sessions) -> TenantPolicyView:
    async with sessions() as session:
        await commands.existing_tenant(session, tenant_id)
        row = await session.get(TenantPolicy, tenant_id)
    if row is None:
        return TenantPolicyView(tenant_id=tenant_id, updated_at_ms=0)
    return TenantPolicyView(
        tenant_id=tenant_id,
        updated_at_ms=row.updated_at_ms,
        retention_days=row.retention_days,
        safety=SafetyPolicy.model_validate_json(row.safety_policy_json),
    )
