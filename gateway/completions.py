"""Serving one completion: admit -> place on a worker -> stream or collect -> settle the reservation.

The worker's UsageRecorded event is what bills the tenant; the gateway settles its reservation with the
same price (`inference.usage.usage_amount`) over the tokens it saw: the worker's own counts when its
done event arrived, else (the client went away, the worker broke, the budget ran out) the prompt and the
tokens produced so far. The worker stops generating when the gateway drops its connection, so a tenant
pays for what was produced and no more. A reservation is always settled exactly once: `finish` when a
worker started the request, `release` when none did.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable

import anyio
from fastapi.responses import Response

from gateway.admission.base import Admission, AdmissionRequest, Reservation
from gateway.auth import TenantIdentity
from gateway.errors import ApiError, invalid_param
from gateway.idempotency import IdempotencyStore, StoredResponse, request_digest
from gateway.logs import model_var, request_id_var
from gateway.metrics import GatewayMetrics
from gateway.schemas import PreparedRequest, SamplingFields, prepare
from gateway.settings import GatewaySettings
from gateway.sse import SseResponse
from gateway.wire import (
    DONE_LINE,
    ChunkWriter,
    chat_completion,
    encode_json,
    finish_reason_of,
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
    WorkerStream,
)
from inference.usage import usage_amount

logger = logging.getLogger(__name__)

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def new_request_id() -> str:
    return uuid.uuid4().hex


class Generation:
    """One admitted request running on a worker: what it produced so far, and its settlement."""

    def __init__(
        self,
        service: CompletionService,
        tenant: TenantIdentity,
        prepared: PreparedRequest,
        request_id: str,
        reservation: Reservation,
        stream: WorkerStream,
        started_ms: float,
        deadline_ms: float,
    ) -> None:
        self.service = service
        self.tenant = tenant
        self.prepared = prepared
        self.request_id = request_id
        self.reservation = reservation
        self.stream = stream
        self.started_ms = started_ms
        self.deadline_ms = deadline_ms
        self.tokens_seen = 0
        self.done: DoneEvent | None = None
        self.outcome = "disconnected"  # until the stream ends one way or another
        self._settled = False

    def on_tokens(self, count: int) -> None:
        if self.tokens_seen == 0:
            self.service.metrics.of_model(self.prepared.model).time_to_first_token.observe(
                (monotonic_ms() - self.started_ms) / 1000
            )
        self.tokens_seen += count
        if monotonic_ms() > self.deadline_ms:
            raise BudgetExhausted(f"the request ran past its {self.service.settings.request_timeout_ms} ms budget")

    @property
    def prompt_tokens(self) -> int:
        return self.done.prompt_tokens if self.done else self.prepared.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.done.completion_tokens if self.done else self.tokens_seen

    async def settle(self) -> None:
        """Close the worker stream (cancelling it there when unfinished) and finish the reservation."""
        if self._settled:
            return
        self._settled = True
        service = self.service
        model = self.prepared.model
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception:
                logger.exception("closing the worker stream of %s failed", self.request_id)
            cost = usage_amount(service.settings.prices[model], self.prompt_tokens, self.completion_tokens)
            try:
                await service.admission.finish(self.reservation, cost)
            except Exception:
                logger.exception("admission.finish failed for %s (cost %d)", self.request_id, cost)
        metrics = service.metrics.of_model(model)
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
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        self.idempotency = idempotency
        self.wall_clock_ms = wall_clock_ms

    async def serve(
        self, tenant: TenantIdentity, body: SamplingFields, raw_body: bytes, path: str, idempotency_key: str | None
    ) -> Response | SseResponse:
        """The response to one completion request (an ASGI callable): JSON, or SSE when it streams."""
        started_ms = monotonic_ms()
        model_var.set(body.model)
        prepared = prepare(body, self.settings)
        request_id = new_request_id()
        request_id_var.set(request_id)
        key = None if prepared.stream else idempotency_key
        if key is not None:
            stored = await self._claim(tenant, key, path, raw_body, request_id)
            if stored is not None:
                self.metrics.idempotent_replays.inc()
                return Response(
                    stored.body,
                    stored.status_code,
                    {"x-request-id": stored.request_id, "idempotent-replayed": "true"},
                    media_type="application/json",
                )
        try:
            generation = await self._start(tenant, prepared, request_id, started_ms)
        except BaseException:
            if key is not None:
                await self._abandon(tenant, key, request_id)
            raise
        headers = {"x-request-id": request_id, **generation.reservation.headers}
        if prepared.stream:
            writer = ChunkWriter(
                chat=prepared.chat,
                response_id=self._response_id(prepared, request_id),
                created_s=int(self.wall_clock_ms() // 1000),
                model=prepared.model,
                include_usage=prepared.include_usage,
            )
            return SseResponse(self._sse(generation, writer), generation.settle, {**SSE_HEADERS, **headers})
        return await self._complete(generation, key, headers)

    async def _claim(
        self, tenant: TenantIdentity, key: str, path: str, raw_body: bytes, request_id: str
    ) -> StoredResponse | None:
        if not key or len(key) > self.settings.idempotency_key_chars_max:
            raise invalid_param("Idempotency-Key", f"Idempotency-Key must be 1 to {self.settings.idempotency_key_chars_max} characters")
        if self.idempotency is None:
            raise ApiError(400, "Idempotency-Key is not available on this gateway", param="Idempotency-Key")
        with anyio.fail_after(self.settings.idempotency_timeout_ms / 1000):
            return await self.idempotency.begin(
                tenant.tenant_id, key, request_digest(path, raw_body), request_id, self.wall_clock_ms()
            )

    async def _abandon(self, tenant: TenantIdentity, key: str, request_id: str) -> None:
        assert self.idempotency is not None, "a key was claimed without a store"
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.idempotency_timeout_ms / 1000):
            try:
                await self.idempotency.abandon(tenant.tenant_id, key, request_id)
            except Exception:
                logger.exception("freeing Idempotency-Key claim of %s failed", request_id)

    async def _start(
        self, tenant: TenantIdentity, prepared: PreparedRequest, request_id: str, started_ms: float
    ) -> Generation:
        price = self.settings.prices[prepared.model]
        admission_request = AdmissionRequest(
            request_id=request_id,
            tenant_id=tenant.tenant_id,
            tier=tenant.tier,
            model=prepared.model,
            prompt_tokens=prepared.prompt_tokens,
            max_tokens=prepared.max_tokens,
            estimated_cost=usage_amount(price, prepared.prompt_tokens, prepared.max_tokens),
        )
        reservation = await self.admission.admit(admission_request)
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
        )
        dispatched_ms = monotonic_ms()
        try:
            stream = await self.pool.open(call, deadline_ms, monotonic_ms)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.admission.release(reservation)
            raise
        self.metrics.of_model(prepared.model).worker_queue_time.observe((monotonic_ms() - dispatched_ms) / 1000)
        return Generation(self, tenant, prepared, request_id, reservation, stream, started_ms, deadline_ms)

    @staticmethod
    def _response_id(prepared: PreparedRequest, request_id: str) -> str:
        return f"chatcmpl-{request_id}" if prepared.chat else f"cmpl-{request_id}"

    async def _sse(self, generation: Generation, writer: ChunkWriter) -> AsyncGenerator[bytes, None]:
        """One write per batch of worker events (several tokens when they arrived together)."""
        if writer.chat:
            yield writer.role()
        try:
            async for batch in generation.stream.batches():
                parts = [writer.token(event.text) for event in batch if type(event) is TokenEvent and event.text]
                last = batch[-1]
                tokens = len(batch) - (type(last) is not TokenEvent)
                if tokens:
                    generation.on_tokens(tokens)
                if type(last) is DoneEvent:
                    generation.done = last
                    generation.outcome = "ok"
                    parts.append(writer.finish(finish_reason_of(last.finish_reason)))
                    if writer.include_usage:
                        parts.append(writer.usage(last.prompt_tokens, last.completion_tokens))
                    parts.append(DONE_LINE)
                elif type(last) is ErrorEvent:
                    generation.outcome = "worker_failed"
                    parts.append(writer.error(f"the worker failed: {last.message}", "server_error", last.error))
                if parts:
                    yield parts[0] if len(parts) == 1 else b"".join(parts)
        except WorkerFailed as error:
            generation.outcome = "worker_failed"
            logger.warning("worker failed mid-stream: %s", error)
            yield writer.error("the inference worker failed mid-stream", "server_error", "worker_failed")
        except BudgetExhausted as error:
            generation.outcome = "timeout"
            yield writer.error(str(error), "server_error", "timeout")

    async def _complete(self, generation: Generation, key: str | None, headers: dict[str, str]) -> Response:
        prepared = generation.prepared
        texts: list[str] = []
        try:
            async for batch in generation.stream.batches():
                texts.extend(event.text for event in batch if type(event) is TokenEvent)
                last = batch[-1]
                tokens = len(batch) - (type(last) is not TokenEvent)
                if tokens:
                    generation.on_tokens(tokens)
                if type(last) is DoneEvent:
                    generation.done = last
                    generation.outcome = "ok"
                elif type(last) is ErrorEvent:
                    generation.outcome = "worker_failed"
                    raise WorkerFailed(f"{last.error}: {last.message}")
        except (WorkerFailed, BudgetExhausted) as error:
            if generation.outcome != "worker_failed":
                generation.outcome = "timeout" if isinstance(error, BudgetExhausted) else "worker_failed"
            await generation.settle()
            if key is not None:
                await self._abandon(generation.tenant, key, generation.request_id)
            timed_out = isinstance(error, BudgetExhausted)
            raise ApiError(
                504 if timed_out else 502,
                str(error) if timed_out else "the inference worker failed before finishing the completion",
                error_type="server_error",
                code="timeout" if timed_out else "worker_failed",
            ) from error
        except BaseException:
            await generation.settle()
            if key is not None:
                await self._abandon(generation.tenant, key, generation.request_id)
            raise
        await generation.settle()
        done = generation.done
        assert done is not None, "a completed generation has its done event"
        build = chat_completion if prepared.chat else text_completion
        body = encode_json(
            build(
                self._response_id(prepared, generation.request_id),
                int(self.wall_clock_ms() // 1000),
                prepared.model,
                "".join(texts),
                finish_reason_of(done.finish_reason),
                done.prompt_tokens,
                done.completion_tokens,
            )
        )
        if key is not None:
            assert self.idempotency is not None, "a key was claimed without a store"
            with anyio.CancelScope(shield=True), anyio.fail_after(self.settings.idempotency_timeout_ms / 1000):
                await self.idempotency.complete(
                    generation.tenant.tenant_id, key, generation.request_id, 200, body, self.wall_clock_ms()
                )
        return Response(body, 200, headers, media_type="application/json")
