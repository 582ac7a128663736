"""Typed dependency aliases of the OpenAI routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.auth import TenantIdentity, authenticate
from gateway.runtime import GatewayRuntime


def gateway_runtime(request: Request) -> GatewayRuntime:
    return request.app.state.runtime


Runtime = Annotated[GatewayRuntime, Depends(gateway_runtime)]


async def authenticated_tenant(request: Request, runtime: Runtime) -> TenantIdentity:
    """The tenant owning the bearer key, or a 401."""
    return await authenticate(runtime.key_cache, request.headers.get("authorization"))


AuthenticatedTenant = Annotated[TenantIdentity, Depends(authenticated_tenant)]
