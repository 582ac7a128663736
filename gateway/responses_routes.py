"""The routes of the Responses, Conversations and Moderations APIs (`/v1/responses`, `/v1/conversations`,
`/v1/moderations`), on FastAPI's router: thin (authenticate -> call the service -> answer JSON), errors in
OpenAI's shape through the app's handlers. `start_conversation_service` builds the services these routes
read from `app.state` and starts the retention sweep (the app's lifespan calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.balancer import BalancedPool
from gateway.completion_layers import CompletionLayers
from gateway.completions import CompletionService
from gateway.conversations import ITEMS_PAGE_MAX, ConversationStore, RetentionSweep
from gateway.deps import AuthenticatedTenant
from gateway.errors import ApiError
from gateway.eval_gate import EvalGate
from gateway.metrics import GatewayMetrics
from gateway.moderations import moderate
from gateway.prompts import PromptStore
from gateway.responses import ResponsesService, input_items, refuse_nul
from gateway.router import ModelRouter, RouteStore
from gateway.settings import GatewaySettings
from gateway.sse import ClientLeft
from gateway.tracing import configure_tracing
from gateway.wire import encode_json
from gateway.workers import WorkerPool

router = APIRouter(prefix="/v1", tags=["openai"])

METADATA_ENTRIES_MAX = 16  # OpenAI's bound on a metadata object


class ConversationCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=METADATA_ENTRIES_MAX)


class ConversationUpdateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    metadata: dict[str, str] = Field(max_length=METADATA_ENTRIES_MAX)


class ItemsCreateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[dict[str, Any]] = Field(min_length=1)


class ModerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None


def _metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    for key, value in (metadata or {}).items():
        refuse_nul(key + value, "metadata")
    return metadata or {}


def _json(body: dict) -> Response:
    return Response(encode_json(body), media_type="application/json")


def _responses(request: Request) -> ResponsesService:
    return request.app.state.responses


def _store(request: Request) -> ConversationStore:
    return request.app.state.responses.store


def _now_ms(request: Request) -> int:
    return request.app.state.responses.wall_clock_ms()


def item_list(items: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


# ---- responses ---------------------------------------------------------------------------------------


@router.post("/responses", response_model=None)
async def create_response(request: Request, tenant: AuthenticatedTenant) -> Response:
    body = await request.body()
    if len(body) > request.app.state.runtime.settings.body_bytes_max:
        raise ApiError(400, "The request body is too large.", param="body", code="body_too_large")
    try:
        return await _responses(request).create(tenant, body, request.receive)
    except ClientLeft:
        return Response(status_code=499)  # nobody reads it: the generation was cancelled and settled


@router.get("/responses/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request, tenant: AuthenticatedTenant) -> Response:
    return _json((await _store(request).get_response(tenant.tenant_id, response_id)).response)


@router.get("/responses/{response_id}/input_items", response_model=None)
async def get_response_input_items(
    response_id: str, request: Request, tenant: AuthenticatedTenant
) -> Response:
    record = await _store(request).get_response(tenant.tenant_id, response_id)
    return _json(item_list(record.input_items, False))


@router.delete("/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request, tenant: AuthenticatedTenant) -> Response:
    return _json(await _store(request).delete_response(tenant.tenant_id, response_id))


# ---- conversations -----------------------------------------------------------------------------------


@router.post("/conversations", response_model=None)
async def create_conversation(
    body: ConversationCreateBody, request: Request, tenant: AuthenticatedTenant
) -> Response:
    items = input_items(body.items or [], param="items")
    return _json(
        await _store(request).create_conversation(
            tenant.tenant_id, _metadata(body.metadata), items, _now_ms(request)
        )
    )


@router.get("/conversations/{conversation_id}", response_model=None)
async def get_conversation(conversation_id: str, request: Request, tenant: AuthenticatedTenant) -> Response:
    return _json(await _store(request).get_conversation(tenant.tenant_id, conversation_id))


@router.post("/conversations/{conversation_id}", response_model=None)
async def update_conversation(
    conversation_id: str, body: ConversationUpdateBody, request: Request, tenant: AuthenticatedTenant
) -> Response:
    return _json(
        await _store(request).update_conversation(tenant.tenant_id, conversation_id, _metadata(body.metadata))
    )


@router.delete("/conversations/{conversation_id}", response_model=None)
async def delete_conversation(
    conversation_id: str, request: Request, tenant: AuthenticatedTenant
) -> Response:
    return _json(await _store(request).delete_conversation(tenant.tenant_id, conversation_id))


@router.post("/conversations/{conversation_id}/items", response_model=None)
async def create_items(
    conversation_id: str, body: ItemsCreateBody, request: Request, tenant: AuthenticatedTenant
) -> Response:
    items = input_items(body.items, param="items")
    added = await _store(request).add_items(tenant.tenant_id, conversation_id, items, _now_ms(request))
    return _json(item_list(added, False))


@router.get("/conversations/{conversation_id}/items", response_model=None)
async def list_items(
    conversation_id: str,
    request: Request,
    tenant: AuthenticatedTenant,
    limit: int = Query(default=20, ge=1, le=ITEMS_PAGE_MAX),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    items, has_more = await _store(request).list_items(
        tenant.tenant_id, conversation_id, limit, after, ascending=order == "asc"
    )
    return _json(item_list(items, has_more))


@router.get("/conversations/{conversation_id}/items/{item_id}", response_model=None)
async def get_item(
    conversation_id: str, item_id: str, request: Request, tenant: AuthenticatedTenant
) -> Response:
    return _json(await _store(request).get_item(tenant.tenant_id, conversation_id, item_id))


@router.delete("/conversations/{conversation_id}/items/{item_id}", response_model=None)
async def delete_item(
    conversation_id: str, item_id: str, request: Request, tenant: AuthenticatedTenant
) -> Response:
    return _json(await _store(request).delete_item(tenant.tenant_id, conversation_id, item_id))


# ---- moderations -------------------------------------------------------------------------------------


@router.post("/moderations", response_model=None)
async def create_moderation(body: ModerationBody, request: Request, tenant: AuthenticatedTenant) -> Response:
    service = _responses(request)
    policy = await service.store.policy(tenant.tenant_id)
    texts = [body.input] if isinstance(body.input, str) else body.input
    return _json(moderate(policy.safety, texts, service.metrics))


# ---- wiring --------------------------------------------------------------------------------------------


@dataclass
class ConversationServices:
    """What `start_conversation_service` started, stopped by `stop()`."""

    sweep: RetentionSweep
    pools: list[WorkerPool]

    async def stop(self) -> None:
        await self.sweep.stop()
        for pool in self.pools:
            await pool.close()


def start_conversation_service(
    app: FastAPI,
    settings: GatewaySettings,
    session_factory: async_sessionmaker[AsyncSession],
    metrics: GatewayMetrics,
    completions: CompletionService,
    internal_token: str,
) -> ConversationServices:
    """Put the responses service (with its model router) on `app.state.responses`, and start the retention
    sweep; a version named in `model_worker_urls` gets a worker pool of its own, the others share one
    over `worker_urls` (each a BalancedPool: workers picked by queue depth and observed latency)."""
    configure_tracing(settings)
    store = ConversationStore(session_factory, settings.policy_cache_ttl_ms)
    pools = {
        model: BalancedPool(settings.model_copy(update={"worker_urls": urls}), internal_token)
        for model, urls in settings.model_worker_urls.items()
    }
    default_pool = BalancedPool(settings, internal_token)  # the other versions: the gateway's workers
    for pool in (*pools.values(), default_pool):
        pool.start()

    def service_on(pool: WorkerPool) -> CompletionService:
        return CompletionService(
            settings, pool, completions.admission, metrics, None, completions.publish_usage
        )

    services = {model: service_on(pool) for model, pool in pools.items()}
    default_service = service_on(default_pool)
    router = ModelRouter(settings, RouteStore(session_factory), metrics, default_service, services)
    app.state.eval_gate = EvalGate(
        settings, router, session_factory, app.state.runtime.completions.wall_clock_ms
    )
    app.state.responses = ResponsesService(settings, router, store, PromptStore(session_factory), metrics)
    completions.layers = CompletionLayers(settings, router, store, metrics)  # the completion routes' layers

    def count(conversations: int, responses: int) -> None:
        metrics.retention_deleted.labels("conversation").inc(conversations)
        metrics.retention_deleted.labels("response").inc(responses)

    sweep = RetentionSweep(
        store, settings.retention_sweep_interval_ms, settings.retention_sweep_batch_max, count
    )
    sweep.start()
    return ConversationServices(sweep, [*pools.values(), default_pool])


__all__ = ["router", "start_conversation_service"]
