"""The inference worker: the engine served to the gateway over an internal streaming HTTP endpoint.

Every route but /health and /metrics needs `Authorization: Bearer <TOLLGATE_INTERNAL_TOKEN>`
(inference.internal_auth); without it the answer is 401 {"error": "unauthorized", ...}.

    POST /internal/v1/generate   {request_id, tenant_id, tier, model, prompt | prompt_tokens, max_tokens,
                                  stop, temperature, top_p, seed, logprobs, top_logprobs, logit_bias,
                                  presence_penalty, frequency_penalty, admitted_at_ms}
        -> 200 application/x-ndjson, one JSON object per line:
           {"type": "token", "text": "...", "token_id": 17}            (one per completion token; with
                                                                        "logprob" and "top_logprobs"
                                                                        when logprobs was asked)
           then exactly one last line, sent only once the request's UsageRecorded is durably accepted:
           {"type": "done", "finish_reason": "stop" | "length" | "cancelled",
            "prompt_tokens": N, "completion_tokens": M, "cached_prompt_tokens": C}
           or {"type": "error", "error": "request_failed" | "engine_failed" | "usage_not_recorded",
            "message": ..., "retryable": false, "prompt_tokens": N, "completion_tokens": M,
            "cached_prompt_tokens": C}
           (C: of the N prompt tokens, those served from the prefix cache, billed at the cached price)
        -> 503 {"error": "overloaded", "retryable": true} with Retry-After when the queue is full
        -> 400 {"error": "invalid_request", "message": ...}; 404 {"error": "model_not_found", ...}
       A client disconnect cancels the request.
    POST /internal/v1/tokenize   {text} -> {"token_ids": [...], "count": N}
    GET  /health                 -> 200 {"status": "ok", ...} or 503 when the engine loop is down
    GET  /metrics                -> Prometheus text

Billing. Every request, finished, stopped, failed or cancelled, emits exactly one UsageRecorded through
the injected `emit_usage` (event id = request id, which is the gateway's attempt id; the prompt and
completion tokens actually processed, and the cached prompt tokens among them; occurred_at =
admitted_at_ms when given). The publish starts the moment the request ends, whether or not its client is
still there, and the stream's last line waits for it: a client never sees the end of a response whose
usage could be lost by a crash. When the publish fails or times out (`usage_emit_timeout_ms`) the last
line is `usage_not_recorded` instead of done.
Publishes still pending at shutdown are waited for (`shutdown_drain_timeout_ms`).

Self-healing. A dead engine loop is rebuilt (inference.engine_loop); when health stays failed for
`health_failed_exit_ms` (restarts used up), the process ends so its supervisor starts a fresh one.
Run it with `python -m inference.worker` (publishes usage through streams.producer.EventProducer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Annotated

import msgspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.engine_loop import EngineFailed, EngineLoop, RequestStream
from inference.internal_auth import InternalAuthSettings, InternalTokenMissing, check_token, token_matches
from inference.metrics import WorkerMetrics
from inference.request import SEED_MAX, SEED_MIN, FinishReason, InvalidRequest, TokenLogprob, WaitingQueueFull
from inference.sampler import LOGPROB_MIN
from inference.settings import WorkerSettings
from inference.usage import build_usage_event
from ledger.events import IDENTIFIER_LENGTH_MAX, TIMESTAMP_MAX_MS, UsageRecorded
from tollgate.tracing_setup import install_otlp_provider

log = logging.getLogger(__name__)

EmitUsage = Callable[[UsageRecorded], Awaitable[object]]
NDJSON_MEDIA_TYPE = "application/x-ndjson"
OPEN_PATHS = frozenset({"/health", "/metrics"})  # every other path needs the internal token
TOKEN_ID_PATTERN = re.compile(r"[0-9]{1,9}")  # a logit_bias key: a token id in ASCII decimal digits
VALIDATION_ERRORS_SHOWN_MAX = 3  # a 400 for a malformed body names at most this many fields
_tracer = trace.get_tracer("tollgate.worker")  # a proxy: the installed provider's, or one that does nothing
_propagator = TraceContextTextMapPropagator()
FATAL_EXIT_CODE = 70  # EX_SOFTWARE: when a graceful stop after a fatal health failure takes too long


TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"  # W3C trace-context, version 00


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)  # the gateway's attempt id
    tenant_id: str = Field(min_length=1, max_length=IDENTIFIER_LENGTH_MAX)
    tier: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    max_tokens: int = Field(ge=1)
    stop: list[str] | str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # SEED_MIN..SEED_MAX, checked in the route (a 400 naming seed)
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[str, float] | None = None  # token id (decimal string) -> bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    admitted_at_ms: int | None = Field(
        default=None, ge=0, le=TIMESTAMP_MAX_MS
    )  # when the gateway admitted it
    # The prompt version (`name@version`) the request was built with: its usage event names it.
    prompt_version: str | None = Field(default=None, min_length=1, max_length=IDENTIFIER_LENGTH_MAX)
    # W3C trace context of the gateway's span (only when the gateway traces): the worker's spans join its
    # trace and the usage event carries the trace id.
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)
    # The id of the API key the request was made with: its usage event names it (per-key budgets).
    api_key_id: str | None = Field(default=None, min_length=1, max_length=IDENTIFIER_LENGTH_MAX)


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str


def logit_bias_by_token_id(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """The wire's string keys as token ids; InvalidRequest for a key that is not a decimal integer."""
    if logit_bias is None:
        return None
    by_token_id: dict[int, float] = {}
    for key, bias in logit_bias.items():
        if TOKEN_ID_PATTERN.fullmatch(key) is None:
            raise InvalidRequest(f"logit_bias key {key[:32]!r} is not a token id (a decimal integer)")
        by_token_id[int(key)] = bias
    return by_token_id


class UsageEmitter:
    """Publishes UsageRecorded events, each bounded by a timeout, and keeps them until done so shutdown can
    wait."""

    def __init__(self, emit_usage: EmitUsage, timeout_ms: int, metrics: WorkerMetrics) -> None:
        self._emit_usage = emit_usage
        self._timeout_s = timeout_ms / 1000
        self._metrics = metrics
        self._pending: set[asyncio.Task[bool]] = set()

    def emit(self, event: UsageRecorded) -> asyncio.Task[bool]:
        """Start publishing now; the task's result says whether the event was durably accepted."""
        task = asyncio.get_running_loop().create_task(self._publish(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _publish(self, event: UsageRecorded) -> bool:
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._emit_usage(event), self._timeout_s)
        except Exception:
            self._metrics.usage_emit_failures.inc()
            log.exception(
                "UsageRecorded %s for tenant %s could not be published", event.event_id, event.tenant_id
            )
            return False
        self._metrics.usage_emit_seconds.observe(time.monotonic() - started)
        return True

    async def drain(self, timeout_ms: int) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_ms / 1000)


class RequestUsage:
    """One request's UsageRecorded: published once when the request ends, awaited before its last line."""

    def __init__(self, emitter: UsageEmitter, build: Callable[[RequestOutput], UsageRecorded]) -> None:
        self._emitter = emitter
        self._build = build
        self._published: asyncio.Task[bool] | None = None

    def on_finished(self, output: RequestOutput) -> None:
        assert self._published is None, f"request {output.request_id} finished twice"
        self._published = self._emitter.emit(self._build(output))

    async def recorded(self) -> bool:
        """Whether the usage was durably accepted; waits for the publish (bounded by its timeout)."""
        if self._published is None:  # a bug: the engine ended the stream without reporting the request
            log.error("a request's stream ended before its usage was emitted")
            return False
        # shield: a client that leaves while we wait must not cancel the publish itself
        return await asyncio.shield(self._published)


class WorkerRuntime:
    """Everything the routes need, built in the app's lifespan."""

    def __init__(self, settings: WorkerSettings, engine: Engine, emit_usage: EmitUsage) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(kv_cache_bytes=engine.cache.bytes_total)
        self.engine_loop = EngineLoop(
            engine,
            self.metrics,
            restarts_max=settings.engine_restarts_max,
            restart_window_ms=settings.engine_restart_window_ms,
        )
        self.usage = UsageEmitter(emit_usage, settings.usage_emit_timeout_ms, self.metrics)

    @property
    def engine(self) -> Engine:
        """The engine serving now (a restart replaces it)."""
        return self.engine_loop.engine

    def submit(self, body: GenerateBody) -> tuple[RequestStream, RequestUsage]:
        price = self.settings.model.price

        def build_event(output: RequestOutput) -> UsageRecorded:
            event = build_usage_event(
                request_id=body.request_id,
                tenant_id=body.tenant_id,
                model=body.model,
                price=price,
                prompt_tokens=output.prompt_tokens,
                completion_tokens=output.completion_tokens,
                cached_prompt_tokens=output.cached_prompt_tokens,
                occurred_at_ms=body.admitted_at_ms,
                api_key_id=body.api_key_id,
            )
            if body.prompt_version is None and body.traceparent is None:
                return event
            context = body.traceparent  # 00-<trace id>-<parent span id>-<flags>
            trace_id, span_id = (context[3:35], context[36:52]) if context is not None else (None, None)
            return msgspec.structs.replace(
                event, prompt_version=body.prompt_version, trace_id=trace_id, parent_span_id=span_id
            )

        if body.seed is not None and not SEED_MIN <= body.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be in {SEED_MIN}..{SEED_MAX}")
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
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs,
            logit_bias=logit_bias_by_token_id(body.logit_bias),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
        )
        usage = RequestUsage(self.usage, build_event)
        return self.engine_loop.submit(generation, on_finished=usage.on_finished), usage


class CancellingStreamingResponse(StreamingResponse):
    """Cancels the request when the response ends for any reason, including a client disconnect."""

    def __init__(
        self,
        request_stream: RequestStream,
        usage: RequestUsage,
        logprobs: bool,
        traced: GenerateBody | None = None,
    ) -> None:
        super().__init__(ndjson_events(request_stream, usage, logprobs, traced), media_type=NDJSON_MEDIA_TYPE)
        self._request_stream = request_stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.cancel()


async def ndjson_events(
    request_stream: RequestStream, usage: RequestUsage, logprobs: bool, traced: GenerateBody | None = None
) -> AsyncIterator[bytes]:
    """`traced`: the request's body when the gateway sent its trace context (the spans are recorded at
    the end); None (tracing off) costs nothing."""
    try:
        async for output in request_stream:
            if output.token_id is not None:
                yield _line(_token_line(output, logprobs))
            if output.finished:
                if traced is not None:
                    record_spans(traced, request_stream, output)
                yield _line(await _last_line(usage, output, _finished_line(output)))
    except EngineFailed as error:
        assert error.output is not None, "a stream's EngineFailed carries the request's final counts"
        failed = {"type": "error", "error": "engine_failed", "message": str(error), "retryable": False}
        yield _line(await _last_line(usage, error.output, failed))
    finally:
        request_stream.cancel()


def record_spans(body: GenerateBody, request_stream: RequestStream, output: RequestOutput) -> None:
    """The worker's spans of one finished request, children of the gateway's span named by its
    `traceparent`: `worker.request` over the whole request, then `worker.queue` (the scheduler's waiting
    queue), `worker.prefill` (first step to first token) and `worker.decode` (first token to the end).
    Timed from the stream's monotonic clock, placed on the wall clock when recorded."""
    assert body.traceparent is not None, "a traced request carries its trace context"
    parent = _propagator.extract({"traceparent": body.traceparent})
    now_s = time.monotonic()
    now_ns = time.time_ns()

    def wall_ns(monotonic_s: float) -> int:
        return now_ns - int((now_s - monotonic_s) * 1e9)

    arrived_s = request_stream.submitted_at
    scheduled_s = arrived_s + output.queued_ms / 1000 if output.queued_ms is not None else now_s
    first_token_s = request_stream.first_token_at
    root = _tracer.start_span(
        "worker.request",
        context=parent,
        kind=SpanKind.SERVER,
        start_time=wall_ns(arrived_s),
        attributes={
            "gen_ai.request.model": body.model,
            "tollgate.request_id": body.request_id,
            "gen_ai.usage.input_tokens": output.prompt_tokens,
            "gen_ai.usage.output_tokens": output.completion_tokens,
            "tollgate.cached_prompt_tokens": output.cached_prompt_tokens,
            "tollgate.finish_reason": output.finish_reason.value if output.finish_reason else "",
        },
    )
    inside = set_span_in_context(root)
    steps = [("worker.queue", arrived_s, scheduled_s)]
    if output.queued_ms is not None:
        steps.append(("worker.prefill", scheduled_s, first_token_s if first_token_s is not None else now_s))
    if first_token_s is not None:
        steps.append(("worker.decode", first_token_s, now_s))
    for name, start_s, end_s in steps:
        _tracer.start_span(name, context=inside, start_time=wall_ns(start_s)).end(end_time=wall_ns(end_s))
    root.end(end_time=now_ns)


def _token_line(output: RequestOutput, logprobs: bool) -> dict:
    line = {"type": "token", "text": output.text, "token_id": output.token_id}
    if logprobs and output.logprob is not None:  # the engine gives it with every sampled token when asked
        line["logprob"] = _logprob_payload(output.logprob)
        line["top_logprobs"] = [_logprob_payload(candidate) for candidate in output.top_logprobs]
    return line


def _logprob_payload(logprob: TokenLogprob) -> dict:
    # The engine floors every logprob at LOGPROB_MIN, so each is a finite JSON number.
    assert LOGPROB_MIN <= logprob.logprob <= 0, f"logprob {logprob.logprob} out of range"
    return {
        "token_id": logprob.token_id,
        "token": logprob.token,
        "bytes": list(logprob.bytes),
        "logprob": logprob.logprob,
    }


def _finished_line(output: RequestOutput) -> dict:
    if output.finish_reason is FinishReason.ERROR:
        message = output.error or "the request failed in the engine"
        return {"type": "error", "error": "request_failed", "message": message, "retryable": False}
    return {"type": "done", "finish_reason": output.finish_reason.value}


async def _last_line(usage: RequestUsage, output: RequestOutput, line: dict) -> dict:
    """`line` once the usage is durably recorded, else usage_not_recorded; with the request's counts."""
    counts = {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "cached_prompt_tokens": output.cached_prompt_tokens,
    }
    if await usage.recorded():
        return line | counts
    return {
        "type": "error",
        "error": "usage_not_recorded",
        "message": "the usage of this request could not be recorded; the response is not complete",
        "retryable": False,
    } | counts


def _line(payload: dict) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def _error(status_code: int, error: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": error, "message": message, "retryable": status_code == 503}, status_code, headers
    )


class InternalAuthMiddleware:
    """401 for any path but OPEN_PATHS unless the request carries the internal token (before the body is
    read)."""

    def __init__(self, app, internal_token: str) -> None:
        self.app = app
        self._internal_token = internal_token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            presented = next((value for name, value in scope["headers"] if name == b"authorization"), None)
            if not token_matches(
                self._internal_token, None if presented is None else presented.decode("latin-1")
            ):
                refusal = JSONResponse(
                    {
                        "error": "unauthorized",
                        "message": "a valid internal token is required",
                        "retryable": False,
                    },
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def watch_health(
    is_healthy: Callable[[], bool],
    failed_exit_ms: int,
    interval_ms: int,
    on_fatal: Callable[[], None],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Call on_fatal once health has read failed for failed_exit_ms without a break; then return."""
    failed_since: float | None = None
    while True:
        await asyncio.sleep(interval_ms / 1000)
        if is_healthy():
            failed_since = None
            continue
        now = clock()
        if failed_since is None:
            failed_since = now
        if (now - failed_since) * 1000 >= failed_exit_ms:
            log.critical(
                "worker health has failed for %d ms: ending the process so it is restarted", failed_exit_ms
            )
            on_fatal()
            return


def terminate_process(grace_ms: int) -> None:
    """The default on_fatal: SIGTERM to ourselves (a graceful stop that drains usage; uvicorn then dies of the
    signal, a non-zero status), and a hard exit if that stop takes longer than grace_ms."""
    timer = threading.Timer(grace_ms / 1000, os._exit, args=(FATAL_EXIT_CODE,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def _runtime(request: Request) -> WorkerRuntime:
    return request.app.state.runtime


Runtime = Annotated[WorkerRuntime, Depends(_runtime)]


def create_app(
    settings: WorkerSettings,
    emit_usage: EmitUsage,
    engine: Engine | None = None,
    *,
    internal_token: str,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The worker app. `engine` defaults to one loaded from settings.checkpoint_dir; `internal_token` is the
    shared secret the gateway sends; `on_fatal` is called when health stays failed (default: end the
    process)."""
    check_token(internal_token)
    fatal = on_fatal or partial(terminate_process, settings.fatal_exit_grace_ms)
    app = FastAPI(title="Tollgate inference worker", lifespan=_lifespan(settings, emit_usage, engine, fatal))
    app.add_middleware(InternalAuthMiddleware, internal_token=internal_token)
    app.add_exception_handler(RequestValidationError, invalid_body)
    _add_generation_routes(app, settings)
    _add_health_and_metrics(app, settings)
    return app


def _lifespan(
    settings: WorkerSettings, emit_usage: EmitUsage, engine: Engine | None, fatal: Callable[[], None]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Loads the engine (unless given one), starts its loop and the health watchdog; on the way out stops
    the watchdog, then the loop, then drains the pending usage emits."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine or await asyncio.to_thread(
            Engine.from_checkpoint, settings.checkpoint_dir, settings.engine
        )
        runtime = WorkerRuntime(settings, loaded, emit_usage)
        await runtime.engine_loop.start()
        app.state.runtime = runtime
        watchdog = asyncio.create_task(
            watch_health(
                lambda: runtime.engine_loop.healthy,
                settings.health_failed_exit_ms,
                settings.health_check_interval_ms,
                fatal,
            )
        )
        try:
            yield
        finally:
            watchdog.cancel()  # first: stopping the engine makes health fail on purpose
            await runtime.engine_loop.stop()
            await runtime.usage.drain(settings.shutdown_drain_timeout_ms)

    return lifespan


async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [
        f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'body'}: {problem['msg']}"
        for problem in error.errors()[:VALIDATION_ERRORS_SHOWN_MAX]
    ]
    return _error(400, "invalid_request", "; ".join(problems))


def generate_refusal(body: GenerateBody, settings: WorkerSettings) -> JSONResponse | None:
    """The answer to a generate request this worker refuses before the engine sees it, else None."""
    if body.model != settings.model_name:
        return _error(
            404,
            "model_not_found",
            f"model {body.model!r} is not served here ({settings.model_name!r} is)",
        )
    if body.prompt is not None and len(body.prompt) > settings.prompt_chars_max:
        return _error(400, "invalid_request", f"prompt is longer than {settings.prompt_chars_max} characters")
    return None


def _add_generation_routes(app: FastAPI, settings: WorkerSettings) -> None:
    @app.post("/internal/v1/generate", response_model=None)
    async def generate(body: GenerateBody, runtime: Runtime) -> Response:
        refusal = generate_refusal(body, settings)
        if refusal is not None:
            return refusal
        try:
            request_stream, usage = runtime.submit(body)
        except WaitingQueueFull as error:
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
        traced = body if body.traceparent is not None else None
        return CancellingStreamingResponse(request_stream, usage, body.logprobs, traced)

    @app.post("/internal/v1/tokenize", response_model=None)
    async def tokenize(body: TokenizeBody, runtime: Runtime) -> dict | JSONResponse:
        if len(body.text) > settings.prompt_chars_max:
            return _error(
                400, "invalid_request", f"text is longer than {settings.prompt_chars_max} characters"
            )
        token_ids = runtime.engine.tokenizer.encode(body.text)
        return {"token_ids": token_ids, "count": len(token_ids)}


def health_report(runtime: WorkerRuntime, settings: WorkerSettings) -> dict:
    engine = runtime.engine
    waiting, running = engine.queue_depth()
    return {
        "status": "ok" if runtime.engine_loop.healthy else "failed",
        "model": settings.model_name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "kv_cache_bytes": engine.cache.bytes_total,
        "waiting": waiting,
        "running": running,
        "waiting_queue_depth_max": settings.engine.waiting_queue_depth_max,
        "running_sequences_max": settings.engine.running_sequences_max,
        "engine_restarts": runtime.engine_loop.restarts,
    }


def _add_health_and_metrics(app: FastAPI, settings: WorkerSettings) -> None:
    @app.get("/health", response_model=None)
    async def health(runtime: Runtime) -> JSONResponse:
        report = health_report(runtime, settings)
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics(runtime: Runtime) -> Response:
        waiting, running = runtime.engine.queue_depth()
        runtime.metrics.waiting.set(waiting)
        runtime.metrics.running.set(running)
        runtime.metrics.refresh_throughput()
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def main() -> None:
    import uvicorn

    from streams.producer import EventProducer
    from streams.settings import StreamSettings
    from tollgate.logging_setup import configure_logging

    configure_logging()
    try:
        internal_token = InternalAuthSettings().required_token()
    except InternalTokenMissing as error:
        sys.exit(f"inference worker not started: {error}")
    settings = WorkerSettings()
    install_otlp_provider(settings.otlp_traces_endpoint, "tollgate-worker")
    producer = EventProducer(StreamSettings())
    app = create_app(settings, emit_usage=producer.publish, internal_token=internal_token)
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
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", log_config=None)  # our format


if __name__ == "__main__":
    main()
