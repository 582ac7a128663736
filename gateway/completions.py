"""Serving one completion: admit -> place on a worker -> stream or collect -> settle the reservation.

The worker's UsageRecorded event is what bills the tenant; the gateway settles its reservation with the
same price (`ledger.pricing.usage_amount`) over the tokens it saw: the worker's own counts when its
done (or error) line arrived, else (the client went away, the worker broke, the budget ran out) the prompt
and the tokens produced so far. The worker stops generating when the gateway drops its connection, so a
tenant pays for what was produced and no more; a non-streaming client that leaves is watched for as a
streaming one is (`gateway.sse.run_until_client_leaves`). A reservation is always settled exactly once:
`finish` when a worker started the request, `release` when none did.

When a worker breaks its stream after tokens were relayed, with no done or error line (it died, its
connection broke), the gateway publishes the UsageRecorded itself: the attempt's id as event id (the one
the worker would have used, so whichever arrives first counts once), the prompt and the tokens relayed,
billed at the admission time. The same for an error line saying the worker could not record the usage.

`Idempotency-Key` works on both kinds of request: the first request with a key runs and its complete
response (the JSON, or the whole SSE body once the stream finished) is stored; a repeat gets it back and
runs nothing; a repeat while the first is still running gets 409.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import msgspec
from fastapi.responses import Response

from gateway.admission.base import Admission, AdmissionRequest, Reservation
from gateway.auth import TenantIdentity
from gateway.errors import ApiError, invalid_param
from gateway.idempotency import IdempotencyStore, StoredResponse, request_digest
from gateway.logs import model_var, request_id_var
from gateway.metrics import GatewayMetrics
from gateway.safety import OutputGuard
from gateway.schemas import ChatCompletionBody, PreparedRequest, SamplingFields, prepare
from gateway.settings import GatewaySettings
from gateway.sse import SSE_MEDIA_TYPE, SseResponse, run_until_client_leaves
from gateway.tracing import RequestTrace, traceparent_of, tracing_enabled
from gateway.wire import (
    DONE_LINE,
    ChunkWriter,
    chat_completion,
    chat_logprobs,
    encode_json,
    finish_reason_of,
    legacy_logprobs,
    text_completion,
)
from gateway.workers import (
    BudgetExhausted,
    DoneEvent,
    ErrorEvent,
    GenerateCall,
    TokenEvent,
    WorkerFailed,
    WorkerPool,
    WorkerRequestFailed,
    WorkerStream,
)
from inference.usage import build_usage_event
from ledger.events import UsageRecorded
from ledger.pricing import usage_amount

if TYPE_CHECKING:
    from gateway.completion_layers import CompletionLayers

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
USAGE_NOT_RECORDED = "usage_not_recorded"  # the worker's error line: it could not record the usage itself
CONTENT_FILTER = "content_filter"  # OpenAI's finish reason for output the tenant's safety policy stopped

PublishUsage = Callable[[UsageRecorded], Awaitable[object]]


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def new_request_id() -> str:
    return uuid.uuid4().hex


def worker_error(event: ErrorEvent) -> ApiError:
    """The client's answer for a request that failed on its worker (never retried elsewhere)."""
    if event.error == "request_failed":
        return ApiError(
            500,
            "the request failed in the inference engine",
            error_type="server_error",
            code="request_failed",
        )
    return ApiError(
        502, f"the inference worker failed ({event.error})", error_type="server_error", code="worker_failed"
    )


@dataclass(frozen=True, slots=True)
class GenerationContext:
    """What a running generation needs from the gateway: handed to it, so it never calls back into the
    service that started it."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    admission: Admission
    publish_usage: PublishUsage  # the event log's publish: usage the workers could not bill


class Generation:
    """One admitted request running on a worker: what it produced so far, and its settlement.

    `relay()` is the one walk over the worker's event batches: it counts the tokens, records the done or
    error line (billing what the worker could not) and the outcome, and hands each batch's tokens and its
    last event to the caller, which only renders them (SSE chunks, or one JSON body).
    """

    def __init__(
        self,
        context: GenerationContext,
        tenant: TenantIdentity,
        prepared: PreparedRequest,
        request_id: str,
        reservation: Reservation,
        stream: WorkerStream,
        started_ms: float,
        deadline_ms: float,
        admitted_at_ms: int,
    ) -> None:
        self.context = context
        self.tenant = tenant
        self.prepared = prepared
        self.request_id = request_id
        self.reservation = reservation
        self.stream = stream
        self.started_ms = started_ms
        self.deadline_ms = deadline_ms
        self.admitted_at_ms = admitted_at_ms  # wall clock: the usage is billed at this time
        self.tokens_seen = 0
        self.done: DoneEvent | None = None
        self.error: ErrorEvent | None = None  # the worker's error line, with its token counts
        self.outcome = "disconnected"  # until the stream ends one way or another
        self.first_token_ms: float | None = None  # monotonic
        self.guard: OutputGuard | None = None  # the tenant's output check (gateway.completion_layers)
        self.on_settled: Callable[[Generation], Awaitable[None]] | None = None  # the router's watch
        self.usage_fields: dict | None = None  # the usage event's prompt_version and trace_id, when set
        self.trace: RequestTrace | None = None  # the completion route's trace, ended when settled
        self._settled = False

    async def relay(self) -> AsyncIterator[tuple[list[TokenEvent], DoneEvent | ErrorEvent | None]]:
        """Each batch of worker events as (its tokens, its last event when that is the done or error line).

        Raises WorkerFailed when the worker broke the stream (after billing the tokens relayed),
        BudgetExhausted when the request's budget ran out; the outcome is recorded either way."""
        try:
            async for batch in self.stream.batches():
                last = batch[-1]
                if type(last) is TokenEvent:
                    self.on_tokens(len(batch))
                    yield batch, None  # type: ignore[misc]  (every event of the batch is a token)
                    continue
                tokens: list[TokenEvent] = batch[:-1]  # type: ignore[assignment]  (all but the last are tokens)
                if tokens:
                    self.on_tokens(len(tokens))
                if type(last) is DoneEvent:
                    self.done = last
                    self.outcome = "ok"
                else:
                    assert type(last) is ErrorEvent, "a batch ends with a token, done or error event"
                    self.error = last
                    self.outcome = "worker_failed"
                    await self.publish_unrecorded_usage()
                yield tokens, last
        except BudgetExhausted:
            self.outcome = "timeout"
            raise
        except WorkerFailed:
            self.outcome = "worker_failed"
            await self.publish_unrecorded_usage()
            raise

    def on_tokens(self, count: int) -> None:
        assert count > 0, "a batch of tokens holds at least one"
        if self.tokens_seen == 0:
            self.first_token_ms = monotonic_ms()
            self.context.metrics.of_model(self.prepared.model).time_to_first_token.observe(
                (self.first_token_ms - self.started_ms) / 1000
            )
        self.tokens_seen += count
        if monotonic_ms() > self.deadline_ms:
            raise BudgetExhausted(
                f"the request ran past its {self.context.settings.request_timeout_ms} ms budget"
            )

    @property
    def prompt_tokens(self) -> int:
        ended = self.done or self.error
        return ended.prompt_tokens if ended else self.prepared.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        ended = self.done or self.error
        return ended.completion_tokens if ended else self.tokens_seen

    @property
    def cached_prompt_tokens(self) -> int:
        """What the worker served from its prefix cache; 0 (the full prompt price) when it never said."""
        ended = self.done or self.error
        return ended.cached_prompt_tokens if ended else 0

    async def publish_unrecorded_usage(self) -> None:
        """Bill what the worker did not: after a broken stream (no done or error line) the tokens relayed,
        after a `usage_not_recorded` line its counts; under the attempt id, at the admission time."""
        if self.done is not None or (self.error is not None and self.error.error != USAGE_NOT_RECORDED):
            return  # the worker billed it
        if self.error is None and self.tokens_seen == 0:
            return  # nothing was relayed: the worker's own record (if any) covers its prompt
        context = self.context
        model = self.prepared.model
        event = build_usage_event(
            request_id=self.stream.attempt_id,
            tenant_id=self.tenant.tenant_id,
            model=model,
            price=context.settings.models[model].price,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            occurred_at_ms=self.admitted_at_ms,
            api_key_id=self.tenant.key_id,
        )
        if self.usage_fields is not None:
            event = msgspec.structs.replace(event, **self.usage_fields)
        timeout_ms = context.settings.usage_publish_timeout_ms
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout_ms / 1000) as scope:
            try:
                await context.publish_usage(event)
                return
            except Exception:
                logger.exception(
                    "publishing the UsageRecorded %s of a broken worker stream failed", event.event_id
                )
        if scope.cancelled_caught:
            logger.error(
                "publishing the UsageRecorded %s of a broken worker stream took over %d ms",
                event.event_id,
                timeout_ms,
            )
        context.metrics.usage_publish_failures.inc()

    async def settle(self) -> None:
        """Close the worker stream (cancelling it there when unfinished) and finish the reservation."""
        if self._settled:
            return
        self._settled = True
        if self.guard is not None and self.guard.stopped is not None:
            self.outcome = CONTENT_FILTER  # stopped by the output check: billed for the tokens produced
        context = self.context
        model = self.prepared.model
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception:
                logger.exception("closing the worker stream of %s failed", self.request_id)
            cost = usage_amount(
                context.settings.models[model].price,
                self.prompt_tokens,
                self.completion_tokens,
                self.cached_prompt_tokens,
            )
            assert cost >= 0, "a request never costs a negative amount"
            try:
                await context.admission.finish(self.reservation, cost)
            except Exception:
                logger.exception("admission.finish failed for %s (cost %d)", self.request_id, cost)
            if self.on_settled is not None:
                try:
                    await self.on_settled(self)
                except Exception:
                    logger.exception("observing the outcome of %s failed", self.request_id)
        self._count(cost)
        if self.trace is not None:
            self._end_trace(self.trace, cost)

    def _end_trace(self, request_trace: RequestTrace, cost: int) -> None:
        guard = self.guard
        if guard is not None and guard.findings:
            request_trace.safety_decision = "stop" if guard.stopped is not None else "redact"
        attributes = {
            "gen_ai.response.model": self.prepared.model,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            "gen_ai.usage.output_tokens": self.completion_tokens,
            "gen_ai.response.finish_reasons": [self.outcome],
            "tollgate.request_id": self.request_id,
            "tollgate.model_version": self.prepared.model,
            "tollgate.cost": cost,
        }
        request_trace.end(attributes, error=None if self.outcome in ("ok", CONTENT_FILTER) else self.outcome)

    def _count(self, cost: int) -> None:
        """The settled request's metrics and its log line."""
        metrics = self.context.metrics.of_model(self.prepared.model)
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.completion_tokens.inc(self.completion_tokens)
        metrics.requests(self.outcome).inc()
        metrics.request_duration[self.prepared.stream].observe((monotonic_ms() - self.started_ms) / 1000)
        if self.outcome == "disconnected":
            metrics.stream_disconnects.inc()
        if not logger.isEnabledFor(logging.INFO):
            return  # the line's fields cost more than the check
        logger.info(
            "request finished",
            extra={
                "outcome": self.outcome,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cost": cost,
                "worker": self.stream.worker.url,
                "duration_ms": round(monotonic_ms() - self.started_ms, 3),
            },
        )


class CompletionService:
    def __init__(
        self,
        settings: GatewaySettings,
        pool: WorkerPool,
        admission: Admission,
        metrics: GatewayMetrics,
        idempotency: IdempotencyStore | None,
        publish_usage: PublishUsage,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        self.idempotency = idempotency
        self.publish_usage = publish_usage  # the event log's publish: usage the workers could not bill
        self.wall_clock_ms = wall_clock_ms
        self.generation_context = GenerationContext(settings, metrics, admission, publish_usage)
        # The tenant's safety checks and the model router, set when the app's services start (None: the
        # request's model is served as named, unchecked).
        self.layers: CompletionLayers | None = None

    async def serve(
        self,
        tenant: TenantIdentity,
        body: SamplingFields,
        raw_body: bytes,
        path: str,
        idempotency_key: str | None,
        receive: Callable[[], Awaitable[dict]],
    ) -> Response | SseResponse:
        """The response to one completion request (an ASGI callable): JSON, or SSE when it streams.
        `receive` is the request's ASGI receive, its body already read: it says when the client leaves."""
        started_ms = monotonic_ms()
        model_var.set(body.model)
        request_id = new_request_id()
        request_id_var.set(request_id)
        request_trace = self._trace(tenant, body) if tracing_enabled() else None  # off: nothing built
        key = idempotency_key
        try:
            begun = await self._begin(
                tenant, body, raw_body, path, key, request_id, started_ms, request_trace
            )
        except BaseException as error:
            if request_trace is not None:
                code = getattr(error, "code", None) or type(error).__name__
                if code == "content_policy_violation":
                    request_trace.safety_decision = "block"
                request_trace.end({"tollgate.request_id": request_id}, error=code)
            raise
        if type(begun) is not Generation:
            if request_trace is not None:
                request_trace.end({"tollgate.request_id": request_id})
            return begun  # a stored response, replayed for its Idempotency-Key
        generation = begun
        generation.trace = request_trace
        prepared = generation.prepared  # for the version it was routed to
        headers = {"x-request-id": request_id, **generation.reservation.headers}
        if prepared.stream:
            writer = ChunkWriter(
                chat=prepared.chat,
                response_id=self._response_id(prepared, request_id),
                created_s=int(self.wall_clock_ms() // 1000),
                model=prepared.model,
                include_usage=prepared.include_usage,
            )
            sent: list[bytes] | None = [] if key is not None else None  # the body to store for the key

            async def end_stream() -> None:
                await generation.settle()
                if key is None:
                    return
                assert sent is not None, "a keyed stream keeps its body"
                if generation.outcome == "ok":
                    await self._store(generation, key, b"".join(sent))
                else:
                    await self._abandon(tenant, key, request_id)

            return SseResponse(self._sse(generation, writer, sent), end_stream, {**SSE_HEADERS, **headers})
        return await self._complete(generation, key, headers, receive)

    async def _begin(
        self,
        tenant: TenantIdentity,
        body: SamplingFields,
        raw_body: bytes,
        path: str,
        key: str | None,
        request_id: str,
        started_ms: float,
        request_trace: RequestTrace | None,
    ) -> Generation | Response:
        """The request checked, its Idempotency-Key claimed, its generation started; or the stored
        response of a repeated key."""
        layers = self.layers
        if layers is None:
            prepared = prepare(body, self.settings)
        else:
            checked = await layers.check_input(tenant, body)  # a blocked request goes no further
        if key is not None:
            stored = await self._claim(tenant, key, path, raw_body, request_id)
            if stored is not None:
                self.metrics.idempotent_replays.inc()
                replayed = {"x-request-id": stored.request_id, "idempotent-replayed": "true"}
                if body.stream:  # the same body (the digest matched), so the stored body is the SSE one
                    return Response(
                        stored.body,
                        stored.status_code,
                        {**SSE_HEADERS, **replayed},
                        media_type=SSE_MEDIA_TYPE,
                    )
                return Response(stored.body, stored.status_code, replayed, media_type="application/json")
        traceparent = traceparent_of(request_trace.root) if request_trace is not None else None
        try:
            if layers is None:
                return await self.start(tenant, prepared, request_id, started_ms, traceparent=traceparent)
            return await layers.start(tenant, checked, raw_body, request_id, started_ms, traceparent)
        except BaseException:
            if key is not None:
                await self._abandon(tenant, key, request_id)
            raise

    @staticmethod
    def _trace(tenant: TenantIdentity, body: SamplingFields) -> RequestTrace:
        chat = isinstance(body, ChatCompletionBody)
        return RequestTrace(
            tenant.tenant_id,
            body.model,
            "chat.completions" if chat else "completions",
            "chat" if chat else "text_completion",
        )

    async def _claim(
        self, tenant: TenantIdentity, key: str, path: str, raw_body: bytes, request_id: str
    ) -> StoredResponse | None:
        if not key or len(key) > self.settings.idempotency_key_chars_max:
            raise invalid_param(
                "Idempotency-Key",
                f"Idempotency-Key must be 1 to {self.settings.idempotency_key_chars_max} characters",
            )
        if self.idempotency is None:
            raise ApiError(400, "Idempotency-Key is not available on this gateway", param="Idempotency-Key")
        with anyio.fail_after(self.settings.idempotency_timeout_ms / 1000):
            return await self.idempotency.begin(
                tenant.tenant_id, key, request_digest(path, raw_body), request_id, self.wall_clock_ms()
            )

    async def _store(self, generation: Generation, key: str, body: bytes) -> None:
        """Keep a completed response for the key's repeats (its own request is answered either way)."""
        assert self.idempotency is not None, "a key was claimed without a store"
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self.settings.idempotency_timeout_ms / 1000) as scope,
        ):
            try:
                await self.idempotency.complete(
                    generation.tenant.tenant_id, key, generation.request_id, 200, body, self.wall_clock_ms()
                )
                return
            except Exception:
                logger.exception(
                    "storing the response of %s for its Idempotency-Key failed", generation.request_id
                )
        if scope.cancelled_caught:
            logger.error(
                "storing the response of %s for its Idempotency-Key timed out", generation.request_id
            )

    async def _abandon(self, tenant: TenantIdentity, key: str, request_id: str) -> None:
        assert self.idempotency is not None, "a key was claimed without a store"
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.idempotency_timeout_ms / 1000):
            try:
                await self.idempotency.abandon(tenant.tenant_id, key, request_id)
            except Exception:
                logger.exception("freeing Idempotency-Key claim of %s failed", request_id)

    async def start(
        self,
        tenant: TenantIdentity,
        prepared: PreparedRequest,
        request_id: str,
        started_ms: float,
        prompt_version: str | None = None,
        traceparent: str | None = None,
    ) -> Generation:
        """Admit the request and open its stream on a worker. `prompt_version` (`name@version`) and
        `traceparent` (W3C trace context, when traced) travel to the worker, which puts them (the trace's
        id) on the usage event."""
        price = self.settings.models[prepared.model].price
        admission_request = AdmissionRequest(
            request_id=request_id,
            tenant_id=tenant.tenant_id,
            tier=tenant.tier,
            model=prepared.model,
            prompt_tokens=prepared.prompt_tokens,
            max_tokens=prepared.max_tokens,
            estimated_cost=usage_amount(price, prepared.prompt_tokens, prepared.max_tokens),
            budget=tenant.budget,
        )
        reservation = await self.admission.admit(admission_request)
        admitted_at_ms = self.wall_clock_ms()
        deadline_ms = started_ms + self.settings.request_timeout_ms
        call = GenerateCall(
            request_id=request_id,
            tenant_id=tenant.tenant_id,
            tier=tenant.tier,
            model=prepared.model,
            prompt=prepared.prompt,
            max_tokens=prepared.max_tokens,
            stop=prepared.stop,
            temperature=prepared.temperature,
            top_p=prepared.top_p,
            seed=prepared.seed,
            logprobs=prepared.logprobs,
            top_logprobs=prepared.top_logprobs,
            logit_bias=prepared.logit_bias,
            presence_penalty=prepared.presence_penalty,
            frequency_penalty=prepared.frequency_penalty,
            admitted_at_ms=admitted_at_ms,
            prompt_version=prompt_version,
            traceparent=traceparent,
            api_key_id=tenant.key_id,
        )
        dispatched_ms = monotonic_ms()
        try:
            stream = await self.pool.open(call, deadline_ms, monotonic_ms)
        except WorkerRequestFailed as failure:
            await self._settle_failed_start(reservation, prepared, failure)
            raise worker_error(failure.event) from failure
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.admission.release(reservation)
            raise
        self.metrics.of_model(prepared.model).worker_queue_time.observe(
            (monotonic_ms() - dispatched_ms) / 1000
        )
        generation = Generation(
            self.generation_context,
            tenant,
            prepared,
            request_id,
            reservation,
            stream,
            started_ms,
            deadline_ms,
            admitted_at_ms,
        )
        if prompt_version is not None or traceparent is not None:
            generation.usage_fields = {
                "prompt_version": prompt_version,
                "trace_id": traceparent[3:35] if traceparent is not None else None,
            }
        return generation

    async def _settle_failed_start(
        self, reservation: Reservation, prepared: PreparedRequest, failure: WorkerRequestFailed
    ) -> None:
        """A request that failed on its worker before a token: settled at what the worker processed."""
        event = failure.event
        logger.warning("request failed on its worker, not retried: %s", failure)
        cost = usage_amount(
            self.settings.models[prepared.model].price,
            event.prompt_tokens,
            event.completion_tokens,
            event.cached_prompt_tokens,
        )
        with anyio.CancelScope(shield=True):
            try:
                await self.admission.finish(reservation, cost)
            except Exception:
                logger.exception("admission.finish failed for %s (cost %d)", reservation.request_id, cost)
        metrics = self.metrics.of_model(prepared.model)
        metrics.prompt_tokens.inc(event.prompt_tokens)
        metrics.requests("worker_failed").inc()

    @staticmethod
    def _response_id(prepared: PreparedRequest, request_id: str) -> str:
        return f"chatcmpl-{request_id}" if prepared.chat else f"cmpl-{request_id}"

    async def _sse(
        self, generation: Generation, writer: ChunkWriter, sent: list[bytes] | None
    ) -> AsyncGenerator[bytes, None]:
        """One write per batch of worker events (several tokens when they arrived together). `sent`, when
        given, collects every chunk (the body stored for an Idempotency-Key)."""
        if writer.chat:
            role = writer.role()
            if sent is not None:
                sent.append(role)
            yield role
        with_logprobs = generation.prepared.logprobs
        guard = generation.guard
        try:
            async for tokens, end in generation.relay():
                if guard is not None:
                    parts = self._guarded_chunks(generation, guard, writer, tokens, end)
                elif with_logprobs:  # a chunk per token, even one with no text yet: its logprob is there
                    parts = [writer.token_with_logprobs(event) for event in tokens]
                else:
                    parts = [writer.token(event.text) for event in tokens if event.text]
                if end is not None and guard is None:
                    parts.extend(self._sse_end(writer, end))
                if parts:
                    chunk = parts[0] if len(parts) == 1 else b"".join(parts)
                    if sent is not None:
                        sent.append(chunk)
                    yield chunk
                if guard is not None and guard.stopped is not None:
                    return  # settled next: the worker stops, billing the tokens it produced
        except WorkerFailed as error:
            logger.warning("worker failed mid-stream: %s", error)
            yield writer.error("the inference worker failed mid-stream", "server_error", "worker_failed")
        except BudgetExhausted as error:
            yield writer.error(str(error), "server_error", "timeout")

    def _guarded_chunks(
        self,
        generation: Generation,
        guard: OutputGuard,
        writer: ChunkWriter,
        tokens: list[TokenEvent],
        end: DoneEvent | ErrorEvent | None,
    ) -> list[bytes]:
        """The chunks of a batch after the output check: the text it releases (redacted); at a stop, the
        content_filter finish, the usage so far and [DONE]; at the end, what was held back, then the end."""
        text = "".join(event.text for event in tokens)
        released = guard.feed(text) if text else ""
        parts = [writer.token(released)] if released else []
        if guard.stopped is not None:
            parts.append(writer.finish(CONTENT_FILTER))
            if writer.include_usage:
                parts.append(writer.usage(generation.prompt_tokens, generation.completion_tokens))
            parts.append(DONE_LINE)
            return parts
        if end is not None:
            if type(end) is DoneEvent:
                tail = guard.flush()
                if tail:
                    parts.append(writer.token(tail))
            parts.extend(self._sse_end(writer, end))
        return parts

    @staticmethod
    def _sse_end(writer: ChunkWriter, end: DoneEvent | ErrorEvent) -> list[bytes]:
        """The chunks that end a stream: finish reason, usage and [DONE]; or the worker's error."""
        if type(end) is DoneEvent:
            parts = [writer.finish(finish_reason_of(end.finish_reason))]
            if writer.include_usage:
                parts.append(writer.usage(end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens))
            parts.append(DONE_LINE)
            return parts
        failure = worker_error(end)
        return [writer.error(failure.message, "server_error", failure.code or "worker_failed")]

    async def _complete(
        self,
        generation: Generation,
        key: str | None,
        headers: dict[str, str],
        receive: Callable[[], Awaitable[dict]],
    ) -> Response:
        prepared = generation.prepared
        guard = generation.guard
        try:
            if guard is None:
                tokens = await run_until_client_leaves(self._collect(generation), receive)
            else:
                tokens = []  # the output check's text instead (logprobs are refused with it)
                text = await run_until_client_leaves(self._collect_checked(generation, guard), receive)
        except BaseException as error:
            await generation.settle()
            if key is not None:
                await self._abandon(generation.tenant, key, generation.request_id)
            if isinstance(error, BudgetExhausted):
                raise ApiError(504, str(error), error_type="server_error", code="timeout") from error
            if isinstance(error, WorkerFailed):
                raise ApiError(
                    502,
                    "the inference worker failed before finishing the completion",
                    error_type="server_error",
                    code="worker_failed",
                ) from error
            raise
        await generation.settle()
        done = generation.done
        stopped = guard is not None and guard.stopped is not None
        assert done is not None or stopped, "a completed generation has its done event"
        if guard is None:
            text = "".join(event.text for event in tokens)
        logprobs = None
        if prepared.logprobs:
            logprobs = chat_logprobs(tokens) if prepared.chat else legacy_logprobs(tokens, 0)
        build = chat_completion if prepared.chat else text_completion
        body = encode_json(
            build(
                self._response_id(prepared, generation.request_id),
                int(self.wall_clock_ms() // 1000),
                prepared.model,
                text,
                CONTENT_FILTER if done is None else finish_reason_of(done.finish_reason),
                generation.prompt_tokens,
                generation.completion_tokens,
                logprobs,
                generation.cached_prompt_tokens,
            )
        )
        if key is not None:
            await self._store(generation, key, body)
        return Response(body, 200, headers, media_type="application/json")

    @staticmethod
    async def _collect(generation: Generation) -> list[TokenEvent]:
        """Every token up to the done line. Raises WorkerFailed (after billing what was relayed when the
        stream broke), ApiError for the worker's error line, BudgetExhausted when the budget ran out."""
        collected: list[TokenEvent] = []
        async for tokens, end in generation.relay():
            collected.extend(tokens)
            if type(end) is ErrorEvent:
                raise worker_error(end)
        return collected

    @staticmethod
    async def _collect_checked(generation: Generation, guard: OutputGuard) -> str:
        """The text the output check releases, up to the done line or the first finding when the policy
        stops (the generation is then cancelled by its settlement). Raises as `_collect` does."""
        released: list[str] = []
        async for tokens, end in generation.relay():
            released.append(guard.feed("".join(event.text for event in tokens)))
            if guard.stopped is not None:
                return "".join(released)
            if type(end) is ErrorEvent:
                raise worker_error(end)
        released.append(guard.flush())
        return "".join(released)
