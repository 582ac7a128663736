"""Typed dependency aliases of the admin routes, as `gateway/deps.py` has for the OpenAI routes.

`gateway.admin.router.build_admin_router(...)` binds an `AdminRuntime` (the settings, the admin token, the
clock, and the app's session factory and event publisher) to each admin request first; the routes then
take what they need from it through the aliases below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.errors import AdminError
from gateway.admin.models import IdentifierText, TenantIdText
from gateway.admin.principals import Principal, authenticate
from gateway.admin.publisher import EventPublisher
from gateway.admin.settings import AdminSettings

RUNTIME_STATE = "admin_runtime"  # the request.state attribute holding the bound AdminRuntime
PRINCIPAL_STATE = "admin_principal"  # ... and the one holding who is calling (require_admin)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class AdminRuntime:
    """Everything an admin request needs, bound to it by the router before any route runs."""

    settings: AdminSettings
    token: bytes  # the admin token every request must present
    clock_ms: Callable[[], int]
    sessions: async_sessionmaker[AsyncSession]
    publisher: EventPublisher


def admin_runtime(request: Request) -> AdminRuntime:
    runtime = getattr(request.state, RUNTIME_STATE, None)
    assert runtime is not None, (
        "the admin routes are mounted through build_admin_router, which binds a runtime"
    )
    return runtime


Runtime = Annotated[AdminRuntime, Depends(admin_runtime)]


def admin_settings(runtime: Runtime) -> AdminSettings:
    return runtime.settings


def session_factory(runtime: Runtime) -> async_sessionmaker[AsyncSession]:
    return runtime.sessions


def event_publisher(runtime: Runtime) -> EventPublisher:
    return runtime.publisher


def clock(runtime: Runtime) -> Callable[[], int]:
    return runtime.clock_ms


Settings = Annotated[AdminSettings, Depends(admin_settings)]
Sessions = Annotated[async_sessionmaker[AsyncSession], Depends(session_factory)]
Publisher = Annotated[EventPublisher, Depends(event_publisher)]
Clock = Annotated[Callable[[], int], Depends(clock)]

bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="TOLLGATE_ADMIN_TOKEN")


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    runtime: Runtime,
) -> Principal:
    """A 401 unless the bearer token is the admin token (compared in constant time) or a named credential
    that is not revoked (gateway.admin.principals); a 403 when its role may not make this request (finance
    is read-only). The principal is kept on the request for the audit log."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise AdminError(401, "Authorization", "an admin bearer token is required", headers=challenge)
    principal = await authenticate(credentials.credentials, runtime.token, runtime.sessions)
    if principal is None:
        raise AdminError(401, "Authorization", "the admin token is wrong", headers=challenge)
    if not principal.may(request.method):
        raise AdminError(
            403,
            "Authorization",
            f"credential {principal.name!r} has the {principal.role} role, which is read-only",
        )
    setattr(request.state, PRINCIPAL_STATE, principal)
    return principal


# Checked here, at the boundary: a NUL byte or an out-of-range number never reaches Postgres.
TenantIdPath = Annotated[TenantIdText, Path()]
Identifier = Annotated[IdentifierText, Path()]
