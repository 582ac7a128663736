"""The admin API's control plane of the model router (gateway.router): an alias's stable and canary
versions, promotion and rollback; and the prompt versions (gateway.prompts).

    PUT  /admin/v1/models/{alias}/route     {"stable_model": "tiny-v1", "canary_model": "tiny-v2",
                                             "canary_percent": 10}   (start or change a rollout)
    POST /admin/v1/models/{alias}/promote   the canary becomes the stable version, if the eval gate passes
    GET  /admin/v1/models/{alias}/evals     the stored eval results of its stable and canary versions
    POST /admin/v1/models/{alias}/rollback  {"reason": "..."}: the canary gets no more traffic
    GET  /admin/v1/models/{alias}/route
    PUT  /admin/v1/prompts/{name}/versions/{version}   {"text": "You are ..."}  (immutable once written)
    GET  /admin/v1/prompts/{name}/versions/{version}

Versions are model registry entries (every gateway and worker reads the same registry); a gateway
follows a change within TOLLGATE_GATEWAY_ROUTE_CACHE_TTL_MS.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.admin.deps import Clock, Sessions, Settings, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from gateway.admin.models import IdentifierText, PlainText
from gateway.errors import ApiError
from gateway.eval_gate import EvalGate
from gateway.prompts import PromptStore
from gateway.router import RouteStore

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)

PROMPT_CHARS_MAX = 32_768  # characters of one prompt version's text


def alias_path():
    """A fresh Path() per parameter."""
    return Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/-]+$")


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
    body: RouteBody, sessions: Sessions, settings: Settings, clock: Clock, alias: str = alias_path()
) -> RouteView:
    for field, model in (("stable_model", body.stable_model), ("canary_model", body.canary_model)):
        if model is not None and model not in settings.models:
            raise AdminError(422, field, f"no model {model!r} in the model registry")
    route = await RouteStore(sessions).set_route(
        alias, body.stable_model, body.canary_model, body.canary_percent, clock()
    )
    return RouteView(**route.view())


@router.get("/models/{alias}/route", response_model=RouteView)
async def get_route(sessions: Sessions, alias: str = alias_path()) -> RouteView:
    route = await RouteStore(sessions).get(alias)
    if route is None:
        raise AdminError(404, "alias", f"no route for {alias!r}")
    return RouteView(**route.view())


@router.post("/models/{alias}/promote", response_model=RouteView)
async def promote(request: Request, sessions: Sessions, clock: Clock, alias: str = alias_path()) -> RouteView:
    """The canary becomes the stable version, once the eval gate passes (409 `eval_gate_failed` with
    both scores when it does not)."""
    store = RouteStore(sessions)
    route = await store.get(alias)
    if route is None or route.canary_model is None:
        raise AdminError(404 if route is None else 409, "alias", f"{alias!r} has no canary to promote")
    gate: EvalGate | None = getattr(request.app.state, "eval_gate", None)
    if gate is None:
        raise AdminError(503, "alias", "the eval gate runs on a gateway (with workers); promote there")
    allowed, stable, canary = await gate.check(route.stable_model, route.canary_model)
    if not allowed:
        raise AdminError(
            409,
            "eval_gate",
            f"{canary.model} scored {canary.score_percent}% on the evaluation set, {stable.model} "
            f"{stable.score_percent}%: more than {gate.settings.eval_margin_percent} points below",
        )
    try:
        return RouteView(**(await store.promote(alias, clock())).view())
    except ApiError as error:
        raise _admin_error(error) from None


@router.get("/models/{alias}/evals")
async def get_evals(request: Request, sessions: Sessions, alias: str = alias_path()) -> list[dict]:
    """The stored eval results of the alias's stable and canary versions on the current set."""
    route = await RouteStore(sessions).get(alias)
    if route is None:
        raise AdminError(404, "alias", f"no route for {alias!r}")
    gate: EvalGate | None = getattr(request.app.state, "eval_gate", None)
    if gate is None:
        return []
    models = [model for model in (route.stable_model, route.canary_model) if model is not None]
    return [result.view() for result in await gate.stored(models)]


@router.post("/models/{alias}/rollback", response_model=RouteView)
async def rollback(
    body: RollbackBody, sessions: Sessions, clock: Clock, alias: str = alias_path()
) -> RouteView:
    try:
        return RouteView(
            **(await RouteStore(sessions).rollback(alias, f"manual: {body.reason}", clock())).view()
        )
    except ApiError as error:
        raise _admin_error(error) from None


# ---- prompt versions (gateway.prompts) --------------------------------------------------------------

PROMPT_NAME_PATTERN = r"^[A-Za-z0-9._:@-]+$"


def prompt_name_path():
    """A fresh Path() per parameter (one FieldInfo shared by two parameters mixes them up)."""
    return Path(min_length=1, max_length=128, pattern=PROMPT_NAME_PATTERN)


class PromptBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=PROMPT_CHARS_MAX, pattern=r"^[^\x00]+$")


class PromptView(BaseModel):
    name: str
    version: str
    text: str


@router.put("/prompts/{name}/versions/{version}", response_model=PromptView)
async def put_prompt_version(
    body: PromptBody,
    sessions: Sessions,
    clock: Clock,
    name: str = prompt_name_path(),
    version: str = prompt_name_path(),
) -> PromptView:
    try:
        prompt = await PromptStore(sessions).put(name, version, body.text, clock())
    except ApiError as error:
        raise AdminError(error.status_code, "version", error.message) from None
    return PromptView(name=prompt.name, version=prompt.version, text=prompt.text)


@router.get("/prompts/{name}/versions/{version}", response_model=PromptView)
async def get_prompt_version(
    sessions: Sessions, name: str = prompt_name_path(), version: str = prompt_name_path()
) -> PromptView:
    try:
        prompt = await PromptStore(sessions).get(name, version)
    except ApiError as error:
        raise AdminError(error.status_code, "version", error.message) from None
    return PromptView(name=prompt.name, version=prompt.version, text=prompt.text)
