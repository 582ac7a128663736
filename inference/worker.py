"""The inference worker: the engine served to the gateway over an internal streaming HTTP endpoint.

    POST /internal/v1/generate   {request_id, tenant_id, tier, model, prompt | prompt_tokens, max_tokens,
                                  stop, temperature, top_p, seed}
        -> 200 application/x-ndjson, one JSON object per line:
           {"type": "token", "text": "...", "token_id": 17}            (one per completion token)
           {"type": "done", "finish_reason": "stop" | "length" | "cancelled",
            "prompt_tokens": N, "completion_tokens": M}                 (always last)
        -> 503 {"error": "overloaded", "retryable": true} with Retry-After when the queue is full
        -> 400 {"error": "invalid_request", "message": ...}; 404 {"error": "model_not_found", ...}
       A client disconnect cancels the request.
    POST /internal/v1/tokenize   {text} -> {"token_ids": [...], "count": N}
    GET  /health                 -> 200 {"status": "ok", ...} or 503 when the engine loop is down
    GET  /metrics                -> Prometheus text

Every request, finished, stopped or cancelled, emits exactly one UsageRecorded through the injected
`emit_usage` (event id = request id; the prompt and completion tokens actually processed).
Run it with `python -m inference.worker` (publishes usage through streams.producer.EventProducer).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from inference.async_engine import AsyncEngine, EngineFailed, RequestStream
from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.metrics import WorkerMetrics
from inference.request import InvalidRequest, Overloaded
from inference.settings import WorkerSettings
from inference.usage import build_usage_event
from ledger.events import IDENTIFIER_LENGTH_MAX, UsageRecorded

log = logging.getLogger(__name__)

EmitUsage = Callable[[UsageRecorded], Awaitable[object]]
NDJSON_MEDIA_TYPE = "application/x-ndjson"


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)
    tenant_id: str = Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)
    tier: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = Field(ge=1)
    stop: list[str] | str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


class UsageEmitter:
    """Publishes UsageRecorded events in the background; each publish bounded by a timeout."""

    def __init__(self, emit_usage: EmitUsage, timeout_ms: int, metrics: WorkerMetrics) -> None:
        self._emit_usage = emit_usage
        self._timeout_s = timeout_ms / 1000
        self._metrics = metrics
        self._pending: set[asyncio.Task] = set()

    def emit(self, event: UsageRecorded) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, event: UsageRecorded) -> None:
        try:
            await asyncio.wait_for(self._emit_usage(event), self._timeout_s)
        except Exception:
            self._metrics.usage_emit_failures.inc()
            log.exception("UsageRecorded %s for tenant %s could not be published", event.event_id, event.tenant_id)

    async def drain(self, timeout_ms: int) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_ms / 1000)


class WorkerRuntime:
    """Everything the routes need, built in the app's lifespan."""

    def __init__(self, settings: WorkerSettings, engine: Engine, emit_usage: EmitUsage) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = WorkerMetrics(kv_cache_bytes=engine.cache.bytes_total)
        self.async_engine = AsyncEngine(engine, self.metrics)
        self.usage = UsageEmitter(emit_usage, settings.usage_emit_timeout_ms, self.metrics)

    def submit(self, body: GenerateBody) -> RequestStream:
        price = self.settings.prices[self.settings.model_name]

        def on_finished(output: RequestOutput) -> None:
            self.usage.emit(
                build_usage_event(
                    request_id=body.request_id,
                    tenant_id=body.tenant_id,
                    model=body.model,
                    price=price,
                    prompt_tokens=output.prompt_tokens,
                    completion_tokens=output.completion_tokens,
                )
            )

        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        generation = GenerationRequest(
            request_id=body.request_id,
            max_tokens=body.max_tokens,
            prompt=body.prompt,
            prompt_token_ids=body.prompt_tokens,
            tier=body.tier,
            stop=stop,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        return self.async_engine.submit(generation, on_finished=on_finished)


class CancellingStreamingResponse(StreamingResponse):
    """Cancels the request when the response ends for any reason, including a client disconnect."""

    def __init__(self, request_stream: RequestStream) -> None:
        super().__init__(ndjson_events(request_stream), media_type=NDJSON_MEDIA_TYPE)
        self._request_stream = request_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.cancel()


async def ndjson_events(request_stream: RequestStream) -> AsyncIterator[bytes]:
    try:
        async for output in request_stream:
            if output.token_id is not None:
                yield _line({"type": "token", "text": output.text, "token_id": output.token_id})
            if output.finished:
                yield _line(
                    {
                        "type": "done",
                        "finish_reason": output.finish_reason.value,
                        "prompt_tokens": output.prompt_tokens,
                        "completion_tokens": output.completion_tokens,
                    }
                )
    except EngineFailed as error:
        yield _line({"type": "error", "error": "engine_failed", "message": str(error), "retryable": False})
    finally:
        request_stream.cancel()


def _line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def _error(status_code: int, error: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, "retryable": status_code == 503}, status_code, headers)


def _runtime(request: Request) -> WorkerRuntime:
    return request.app.state.runtime


Runtime = Annotated[WorkerRuntime, Depends(_runtime)]


def create_app(settings: WorkerSettings, emit_usage: EmitUsage, engine: Engine | None = None) -> FastAPI:
    """The worker app. `engine` defaults to one loaded from settings.checkpoint_dir."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine or await asyncio.to_thread(Engine.from_checkpoint, settings.checkpoint_dir, settings.engine)
        runtime = WorkerRuntime(settings, loaded, emit_usage)
        await runtime.async_engine.start()
        app.state.runtime = runtime
        try:
            yield
        finally:
            await runtime.async_engine.stop()
            await runtime.usage.drain(settings.shutdown_drain_timeout_ms)

    app = FastAPI(title="Tollgate inference worker", lifespan=lifespan)

    @app.post("/internal/v1/generate", response_model=None)
    async def generate(body: GenerateBody, runtime: Runtime) -> Response:
        if body.model != settings.model_name:
            return _error(404, "model_not_found", f"model {body.model!r} is not served here ({settings.model_name!r} is)")
        if body.prompt is not None and len(body.prompt) > settings.prompt_chars_max:
            return _error(400, "invalid_request", f"prompt is longer than {settings.prompt_chars_max} characters")
        try:
            request_stream = runtime.submit(body)
        except Overloaded as error:
            runtime.metrics.overloaded.inc()
            return JSONResponse(
                {"error": "overloaded", "message": str(error), "retryable": True},
                status_code=503,
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        except (InvalidRequest, ValueError) as error:
            return _error(400, "invalid_request", str(error))
        except EngineFailed as error:
            return _error(503, "engine_failed", str(error))
        return CancellingStreamingResponse(request_stream)

    @app.post("/internal/v1/tokenize", response_model=None)
    async def tokenize(body: TokenizeBody, runtime: Runtime) -> dict | JSONResponse:
        if len(body.text) > settings.prompt_chars_max:
            return _error(400, "invalid_request", f"text is longer than {settings.prompt_chars_max} characters")
        token_ids = runtime.engine.tokenizer.encode(body.text)
        return {"token_ids": token_ids, "count": len(token_ids)}

    @app.get("/health", response_model=None)
    async def health(runtime: Runtime) -> JSONResponse:
        waiting, running = runtime.engine.queue_depth()
        healthy = runtime.async_engine.healthy
        return JSONResponse(
            {
                "status": "ok" if healthy else "failed",
                "model": settings.model_name,
                "device": str(runtime.engine.device),
                "dtype": str(runtime.engine.dtype).removeprefix("torch."),
                "kv_cache_bytes": runtime.engine.cache.bytes_total,
                "waiting": waiting,
                "running": running,
                "waiting_queue_depth_max": settings.engine.waiting_queue_depth_max,
                "running_sequences_max": settings.engine.running_sequences_max,
            },
            status_code=200 if healthy else 503,
        )

    @app.get("/metrics")
    async def metrics(runtime: Runtime) -> Response:
        waiting, running = runtime.engine.queue_depth()
        runtime.metrics.waiting.set(waiting)
        runtime.metrics.running.set(running)
        runtime.metrics.refresh_throughput()
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> None:
    import uvicorn

    from streams.producer import EventProducer
    from streams.settings import StreamSettings

    logging.basicConfig(level=logging.INFO)
    settings = WorkerSettings()
    producer = EventProducer(StreamSettings())
    app = create_app(settings, emit_usage=producer.publish)
    engine_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def with_producer(app_: FastAPI) -> AsyncIterator[None]:
        await producer.start()
        try:
            async with engine_lifespan(app_):
                yield
        finally:
            await producer.stop()

    app.router.lifespan_context = with_producer
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
