"""Typed dependency aliases of the OpenAI routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import TenantIdentity, bearer_key
from gateway.logs import tenant_id_var
from gateway.runtime import GatewayRuntime


def gateway_runtime(request: Request) -> GatewayRuntime:
    return request.app.state.runtime


Runtime = Annotated[GatewayRuntime, Depends(gateway_runtime)]


async def authenticated_tenant(request: Request, runtime: Runtime) -> TenantIdentity:
    """The tenant owning the bearer key, or a 401."""
    tenant = await runtime.key_cache.tenant_of(bearer_key(request.headers.get("authorization")))
    tenant_id_var.set(tenant.tenant_id)
    return tenant


AuthenticatedTenant = Annotated[TenantIdentity, Depends(authenticated_tenant)]
