"""The gateway app factory: the OpenAI routes, the admin API, /metrics and /health.

    app = create_app(settings, internal_token=token, log=log, admission=admission, session_factory=sessions)

`internal_token` is the gateway <-> worker shared secret (inference.internal_auth), sent on every worker
call. `log` (an `EventLog`, Kafka or embedded) publishes the admin API's ledger events and the usage of
worker streams that broke before the worker could bill them; `admission` admits and
settles requests (gateway.admission); `session_factory` reaches Postgres (API keys, idempotency, admin).
The caller starts and stops those; the app's lifespan owns the worker clients. `collectors` are extra
Prometheus collectors (admission's open reservations, ledger consumer lag) served at /metrics.

Every error of every path is in OpenAI's shape: an unknown URL is a 404 `unknown_url`, a wrong method a
405 with Allow (the admin API keeps its own `detail` shape for the errors it raises itself).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admin import AdminSettings, build_admin_router, resolve_admin_token
from gateway.admission.base import Admission, Rejection
from gateway.auth import KeyRevocationFeed, TenantKeyCache
from gateway.billing_routes import router as billing_router
from gateway.completion_routes import CompletionRoutes, add_completion_routes_to, refusal_response
from gateway.completions import CompletionService
from gateway.console.mount import mount_console
from gateway.errors import ApiError, handle_validation_error
from gateway.idempotency import IdempotencyStore
from gateway.metrics import GatewayMetrics
from gateway.responses_routes import router as responses_router
from gateway.responses_routes import start_conversation_service
from gateway.routes import router as openai_router
from gateway.runtime import GatewayRuntime
from gateway.settings import GatewaySettings
from gateway.workers import WorkerPool
from streams.log import EventLog


def create_app(
    settings: GatewaySettings,
    *,
    internal_token: str,
    log: EventLog,
    admission: Admission,
    session_factory: async_sessionmaker[AsyncSession],
    collectors: Iterable[Collector] = (),
    admin_settings: AdminSettings | None = None,
) -> FastAPI:
    metrics = GatewayMetrics(collectors)
    lifespan = _lifespan(
        settings,
        internal_token=internal_token,
        log=log,
        admission=admission,
        session_factory=session_factory,
        metrics=metrics,
    )
    app = FastAPI(title="Tollgate gateway", lifespan=lifespan)
    app.state.session_factory = session_factory
    app.state.event_log = log
    _add_error_handlers(app, metrics)
    app.add_middleware(CompletionRoutes)  # POST /v1/chat/completions and /v1/completions, the hot path
    app.include_router(openai_router)
    app.include_router(responses_router)  # /v1/responses, /v1/conversations, /v1/moderations
    app.include_router(billing_router)  # /v1/dashboard/billing/credit_grants: a tenant's own credit
    _include_admin_router(app, settings, admin_settings or AdminSettings())
    _document_completion_routes(app)
    _add_health_and_metrics(app, metrics)
    return app


def _lifespan(
    settings: GatewaySettings,
    *,
    internal_token: str,
    log: EventLog,
    admission: Admission,
    session_factory: async_sessionmaker[AsyncSession],
    metrics: GatewayMetrics,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: builds the worker clients, the key cache and its revocation feed, and the
    runtime the routes read; stops them on the way out."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = WorkerPool(settings, internal_token)
        idempotency = IdempotencyStore(session_factory, stale_after_ms=settings.request_timeout_ms)
        key_cache = TenantKeyCache(
            session_factory, settings.auth_cache_ttl_ms, settings.auth_cache_entries_max
        )
        # Evicts revoked keys at once; the TTL is the fallback.
        revocations = KeyRevocationFeed(log, key_cache)
        await revocations.start()
        app.state.runtime = GatewayRuntime(
            settings=settings,
            admission=admission,
            metrics=metrics,
            pool=pool,
            key_cache=key_cache,
            completions=CompletionService(
                settings, pool, admission, metrics, idempotency, publish_usage=log.publish
            ),
        )
        conversation_services = start_conversation_service(
            app, settings, session_factory, metrics, app.state.runtime.completions, internal_token
        )
        # What start-up built lives as long as the process: move it out of the collector's way, so a
        # full collection scans only what requests allocate (else it walks ~140k objects: ~70 ms pauses).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await conversation_services.stop()
            await revocations.stop()
            await pool.close()

    return lifespan


def unknown_route_error(method: str, path: str, error: StarletteHTTPException) -> ApiError | None:
    """The router's own 404 and 405 in OpenAI's shape; None for any other HTTPException (the admin API's,
    with their `detail`)."""
    if error.status_code == 404 and error.detail == "Not Found":
        return ApiError(
            404,
            f"Unknown request URL: {method} {path}. Please check the URL for typos.",
            code="unknown_url",
        )
    if error.status_code == 405 and error.detail == "Method Not Allowed":
        return ApiError(
            405,
            f"Method {method} is not allowed for {path}.",
            code="method_not_allowed",
            headers=error.headers,
        )
    return None


def _add_error_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    """Every error in OpenAI's shape, each refusal counted."""

    async def count_and_answer_refusal(_request: Request, error: ApiError | Rejection) -> Response:
        return refusal_response(metrics, error)

    async def count_and_answer_validation(request: Request, error: RequestValidationError) -> Response:
        metrics.rejections.labels("invalid_value").inc()
        return await handle_validation_error(request, error)

    async def answer_unknown_route(request: Request, error: StarletteHTTPException) -> Response:
        api_error = unknown_route_error(request.method, request.url.path, error)
        if api_error is None:
            return await http_exception_handler(request, error)
        return refusal_response(metrics, api_error)

    app.add_exception_handler(StarletteHTTPException, answer_unknown_route)
    app.add_exception_handler(ApiError, count_and_answer_refusal)
    app.add_exception_handler(Rejection, count_and_answer_refusal)
    app.add_exception_handler(RequestValidationError, count_and_answer_validation)


def _include_admin_router(app: FastAPI, settings: GatewaySettings, admin_settings: AdminSettings) -> None:
    """The admin API, reading the session factory and the event log from the app's state."""

    def app_session_factory(request: Request) -> async_sessionmaker[AsyncSession]:
        return request.app.state.session_factory

    def app_event_log(request: Request) -> EventLog:
        return request.app.state.event_log

    configured = settings.admin_token
    token = configured.get_secret_value() if configured else resolve_admin_token(admin_settings)
    app.include_router(
        build_admin_router(
            settings=admin_settings,
            session_factory_dependency=app_session_factory,
            publisher_dependency=app_event_log,
            admin_token=token,
        )
    )
    mount_console(app, admin_settings, token, settings.worker_urls)  # /console and /portal (issue 17)


def _document_completion_routes(app: FastAPI) -> None:
    """The OpenAPI document lists the completion routes, which the middleware serves outside the router."""

    def openapi_with_completion_routes() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = add_completion_routes_to(document)
        return app.openapi_schema

    app.openapi = openapi_with_completion_routes  # type: ignore[method-assign]


def _add_health_and_metrics(app: FastAPI, metrics: GatewayMetrics) -> None:
    @app.get("/health", include_in_schema=False)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
