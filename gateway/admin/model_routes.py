"""The admin API's control plane of the model router (gateway.router): an alias's stable and canary
versions, promotion and rollback.

    PUT  /admin/v1/models/{alias}/route     {"stable_model": "tiny-v1", "canary_model": "tiny-v2",
                                             "canary_percent": 10}   (start or change a rollout)
    POST /admin/v1/models/{alias}/promote   the canary becomes the stable version
    POST /admin/v1/models/{alias}/rollback  {"reason": "..."}: the canary gets no more traffic
    GET  /admin/v1/models/{alias}/route

Versions are model registry entries (every gateway and worker reads the same registry); a gateway
follows a change within TOLLGATE_GATEWAY_ROUTE_CACHE_TTL_MS.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field

from gateway.admin.deps import Clock, Sessions, Settings, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from gateway.admin.models import IdentifierText, PlainText
from gateway.errors import ApiError
from gateway.router import RouteStore

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)

AliasPath = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/-]+$")


class RouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stable_model: IdentifierText
    canary_model: IdentifierText | None = None
    canary_percent: int = Field(default=0, ge=0, le=100)


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: PlainText = Field(default="manual", min_length=1, max_length=500)


class RouteView(BaseModel):
    alias: str
    stable_model: str
    canary_model: str | None
    canary_percent: int
    state: str
    reason: str | None


def _admin_error(error: ApiError) -> AdminError:
    return AdminError(error.status_code, error.param or "alias", error.message)


@router.put("/models/{alias}/route", response_model=RouteView)
async def put_route(
    body: RouteBody, sessions: Sessions, settings: Settings, clock: Clock, alias: str = AliasPath
) -> RouteView:
    for field, model in (("stable_model", body.stable_model), ("canary_model", body.canary_model)):
        if model is not None and model not in settings.models:
            raise AdminError(422, field, f"no model {model!r} in the model registry")
    route = await RouteStore(sessions).set_route(
        alias, body.stable_model, body.canary_model, body.canary_percent, clock()
    )
    return RouteView(**route.view())


@router.get("/models/{alias}/route", response_model=RouteView)
async def get_route(sessions: Sessions, alias: str = AliasPath) -> RouteView:
    route = await RouteStore(sessions).get(alias)
    if route is None:
        raise AdminError(404, "alias", f"no route for {alias!r}")
    return RouteView(**route.view())


@router.post("/models/{alias}/promote", response_model=RouteView)
async def promote(sessions: Sessions, clock: Clock, alias: str = AliasPath) -> RouteView:
    try:
        return RouteView(**(await RouteStore(sessions).promote(alias, clock())).view())
    except ApiError as error:
        raise _admin_error(error) from None


@router.post("/models/{alias}/rollback", response_model=RouteView)
async def rollback(body: RollbackBody, sessions: Sessions, clock: Clock, alias: str = AliasPath) -> RouteView:
    try:
        return RouteView(
            **(await RouteStore(sessions).rollback(alias, f"manual: {body.reason}", clock())).view()
        )
    except ApiError as error:
        raise _admin_error(error) from None
