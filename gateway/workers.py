"""Talking to the inference workers: a keep-alive connection pool per worker (gateway.worker_http), a
circuit breaker each, and
`WorkerPool.open()`, which places a generation on a worker and returns once its first event arrived.

Retries happen only before the first token: a worker that refuses the connection, answers 5xx, or
breaks or times out before its first event is skipped (and its breaker told), and the next worker is
tried, at most `worker_attempts_max` tries within the request's deadline. Each try is an attempt with an
id of its own (the worker's `request_id` and the event id of its UsageRecorded): the request id for the
first, `<request id>.<n>` for the n-th, so a retry never collides with an earlier attempt that may still
be running on its worker. A worker whose queue is full answers 503 {"error": "overloaded"} at once; when
every tried worker did, the pool raises admission's `Overloaded` (503 with Retry-After) instead of waiting.
Once a token has been handed out, a failure ends the stream.

Never retried: a request that made its worker fail (an error line, `request_failed` or `engine_failed`:
the request itself may be what broke it, and would break the next worker too) raises `WorkerRequestFailed`;
a worker's 400 (`invalid_request`) is a 400 to the client.

Every call carries `Authorization: Bearer <internal token>` (inference.internal_auth): workers serve only
the gateway.

The worker's NDJSON protocol (inference.worker): {"type": "token", "text", "token_id"[, "logprob",
"top_logprobs"]} per token, then {"type": "done", "finish_reason", "prompt_tokens", "completion_tokens"},
or {"type": "error", "error", "message", "retryable", "prompt_tokens", "completion_tokens"} when the
request failed there.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from gateway.admission.base import Overloaded
from gateway.breaker import CircuitBreaker
from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from gateway.worker_http import (
    WorkerConnection,
    WorkerHttpError,
    WorkerHttpLimits,
    WorkerHttpPool,
    WorkerTimeout,
)
from inference.internal_auth import authorization_header

logger = logging.getLogger(__name__)

GENERATE_PATH = "/internal/v1/generate"


class LogprobEntry(msgspec.Struct):
    """A token and its log-probability (inference.request.TokenLogprob on the wire)."""

    token_id: int
    token: str
    bytes: list[int]
    logprob: float


class TokenEvent(msgspec.Struct, tag_field="type", tag="token"):
    text: str
    token_id: int
    logprob: LogprobEntry | None = None  # only when logprobs were asked
    top_logprobs: list[LogprobEntry] = []  # only when top_logprobs > 0


class DoneEvent(msgspec.Struct, tag_field="type", tag="done"):
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from the worker's prefix cache


class ErrorEvent(msgspec.Struct, tag_field="type", tag="error"):
    error: str  # request_failed | engine_failed | usage_not_recorded
    message: str = ""
    retryable: bool = False
    prompt_tokens: int = 0  # what the worker processed before the failure
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


WorkerEvent = TokenEvent | DoneEvent | ErrorEvent
_batch_decoder = msgspec.json.Decoder(list[WorkerEvent])
_refusal_decoder = msgspec.json.Decoder(dict)
_body_encoder = msgspec.json.Encoder()


class WorkerFailed(Exception):
    """A worker broke its protocol or its connection; says which and how."""


class WorkerRequestFailed(Exception):
    """The request failed on its worker before its first token (an error line): it is not retried."""

    def __init__(self, attempt_id: str, worker_url: str, event: ErrorEvent) -> None:
        super().__init__(f"{worker_url} failed request {attempt_id}: {event.error}: {event.message}")
        self.attempt_id = attempt_id
        self.event = event


def attempt_id_of(request_id: str, attempt: int) -> str:
    """The worker request id of a request's n-th attempt (1-based): the request id itself, then id.n."""
    assert attempt >= 1, "attempts count from 1"
    return request_id if attempt == 1 else f"{request_id}.{attempt}"


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """The body of POST /internal/v1/generate (per attempt: `encode(attempt_id)`)."""

    request_id: str
    tenant_id: str
    tier: str
    model: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] | None = None  # token id -> bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    admitted_at_ms: int | None = None  # wall-clock ms when admission succeeded: the usage is billed then
    prompt_version: str | None = None  # the prompt version (`name@version`) the usage event names
    traceparent: str | None = None  # W3C trace context of the gateway's span, when the request is traced
    api_key_id: str | None = None  # the key the request was made with: its usage event names it

    def encode(self, attempt_id: str) -> bytes:
        body = {
            "request_id": attempt_id,
            "tenant_id": self.tenant_id,
            "tier": self.tier,
            "model": self.model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        if self.admitted_at_ms is not None:
            body["admitted_at_ms"] = self.admitted_at_ms
        if self.prompt_version is not None:
            body["prompt_version"] = self.prompt_version
        if self.traceparent is not None:
            body["traceparent"] = self.traceparent
        if self.api_key_id is not None:
            body["api_key_id"] = self.api_key_id
        # The rest only when asked, so the common body stays as small as it was.
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        if self.logit_bias:
            body["logit_bias"] = {str(token_id): bias for token_id, bias in self.logit_bias.items()}
        if self.presence_penalty:
            body["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        return _body_encoder.encode(body)


class BudgetExhausted(Exception):
    """The request's timeout budget ran out while it was generating."""


@dataclass(frozen=True, slots=True)
class Started:
    """An attempt whose first events arrived: the generation runs on that worker."""

    stream: WorkerStream


@dataclass(frozen=True, slots=True)
class AtCapacity:
    """The worker's queue is full (503 overloaded): backpressure, not a failure; try another."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker could not take the attempt (no answer, a 5xx, broke before its first event): try another."""

    reason: str


Attempt = Started | AtCapacity | Failed  # what one try on one worker came to
AT_CAPACITY = AtCapacity()


class WorkerClient:
    """One worker: its URL, its breaker, and its keep-alive connection pool."""

    def __init__(self, url: str, settings: GatewaySettings, internal_token: str) -> None:
        self.url = url.rstrip("/")
        self.breaker = CircuitBreaker(settings.breaker_failures_max, settings.breaker_open_ms)
        self.http = WorkerHttpPool(
            self.url, http_limits(settings), authorization=authorization_header(internal_token)
        )

    async def close(self) -> None:
        await self.http.close()


def http_limits(settings: GatewaySettings) -> WorkerHttpLimits:
    return WorkerHttpLimits(
        connections_max=settings.worker_connections_max,
        connect_timeout_s=settings.worker_connect_timeout_ms / 1000,
        read_timeout_s=settings.worker_read_timeout_ms / 1000,
        keepalive_expiry_s=settings.worker_keepalive_expiry_ms / 1000,
        response_head_bytes_max=settings.worker_response_head_bytes_max,
    )


class WorkerStream:
    """A generation running on one worker. `first_batch` holds its first events (already read).

    Events come in batches: all the complete lines of the bytes that arrived together (one line when the
    worker is quick to send, several when they queue up under load), decoded in one call, so a busy
    gateway handles and forwards several tokens for the price of one.
    """

    def __init__(
        self, worker: WorkerClient, exchange: WorkerConnection, line_bytes_max: int, attempt_id: str
    ) -> None:
        self.worker = worker
        self.attempt_id = attempt_id  # the worker's request id (and its UsageRecorded's event id)
        self.first_batch: list[WorkerEvent] = []
        self.finished = False  # the done (or error) event has been read
        self._exchange = exchange
        self._pending = b""
        self._line_bytes_max = line_bytes_max

    async def batches(self) -> AsyncIterator[list[WorkerEvent]]:
        """The first batch, then the rest, up to and including the one with the done (or error) event."""
        yield self.first_batch
        while not self.finished:
            yield await self.next_batch()

    async def next_batch(self) -> list[WorkerEvent]:
        """Raises WorkerFailed when the worker broke the stream or went silent, BudgetExhausted when the
        request's budget ran out while waiting."""
        assert not self.finished, "nothing follows the done event"
        while True:
            try:
                chunk = await self._exchange.read()
            except WorkerTimeout as error:
                if error.budget_exhausted:
                    raise BudgetExhausted(str(error)) from error
                raise WorkerFailed(f"{self.worker.url} broke the stream: {error}") from error
            except WorkerHttpError as error:
                raise WorkerFailed(f"{self.worker.url} broke the stream: {error}") from error
            if not chunk:
                raise WorkerFailed(f"{self.worker.url} ended the stream without a done event")
            data = self._pending + chunk if self._pending else chunk
            end = data.rfind(b"\n")
            if end < 0:
                if len(data) > self._line_bytes_max:
                    raise WorkerFailed(f"a worker event is longer than {self._line_bytes_max} bytes")
                self._pending = data
                continue
            self._pending = data[end + 1 :]
            return self._decode(data[:end])

    def _decode(self, lines: bytes) -> list[WorkerEvent]:
        try:  # JSON lines never hold a raw newline, so the lines joined by commas are one JSON array
            events = _batch_decoder.decode(b"[" + lines.replace(b"\n", b",") + b"]")
        except msgspec.DecodeError as error:
            raise WorkerFailed(f"{self.worker.url} sent an unreadable event: {error}") from error
        for index, event in enumerate(events):
            if type(event) is not TokenEvent:
                if index != len(events) - 1:
                    raise WorkerFailed(f"{self.worker.url} sent events after its last event")
                self.finished = True
        return events

    async def close(self) -> None:
        """After the done event, read the body's end so the connection is kept alive for the next request;
        before it, drop the connection, which cancels the generation on the worker."""
        if not self.finished:
            self._exchange.abort()
            return
        try:
            rest = await self._exchange.finish()
        except WorkerHttpError as error:
            logger.warning("worker stream of %s ended badly: %s", self.worker.url, error)
            return
        if (self._pending + rest).strip():
            logger.warning("worker stream of %s ended badly: events after its done event", self.worker.url)


class WorkerPool:
    def __init__(self, settings: GatewaySettings, internal_token: str) -> None:
        self.settings = settings
        self.workers = [WorkerClient(url, settings, internal_token) for url in settings.worker_urls]
        self._rotation = itertools.cycle(range(len(self.workers)))

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()

    def candidates(self) -> list[WorkerClient]:
        """Every worker once, starting at the next in rotation (spreads load; retries go round this list)."""
        start = next(self._rotation)
        return self.workers[start:] + self.workers[:start]

    async def open(self, call: GenerateCall, deadline_ms: float, now_ms) -> WorkerStream:
        """A stream whose first event has arrived, from the first worker able to give one."""
        attempts = 0
        overloaded: set[str] = set()
        failures: list[str] = []
        candidates = self.candidates()
        for attempt in range(self.settings.worker_attempts_max * len(candidates)):
            if attempts >= self.settings.worker_attempts_max or now_ms() >= deadline_ms:
                break
            worker = candidates[attempt % len(candidates)]
            if worker.url in overloaded:
                if len(overloaded) == len(candidates):
                    break
                continue
            if not worker.breaker.allow():
                failures.append(f"{worker.url}: circuit open")
                if attempt + 1 >= len(candidates) and not attempts:
                    break  # every breaker is open: nothing to try
                continue
            attempts += 1
            attempt_id = attempt_id_of(call.request_id, attempts)
            budget_s = (deadline_ms - now_ms()) / 1000
            match await self._try(worker, call.encode(attempt_id), attempt_id, budget_s):
                case Started(stream):
                    worker.breaker.record_success()
                    return stream
                case AtCapacity():
                    worker.breaker.record_neutral()
                    overloaded.add(worker.url)
                case Failed(reason):
                    worker.breaker.record_failure()
                    failures.append(f"{worker.url}: {reason}")
        retry_after = {"Retry-After": str(self.settings.overloaded_retry_after_s), "x-should-retry": "true"}
        if overloaded:
            raise Overloaded(
                f"every worker tried ({attempts}) is at capacity; "
                f"retry after {self.settings.overloaded_retry_after_s} s",
                headers=retry_after,
            )
        logger.warning("request %s found no worker: %s", call.request_id, "; ".join(failures))
        raise ApiError(
            503,
            "no inference worker is available now; retry",
            error_type="server_error",
            code="worker_unavailable",
            headers=retry_after,
        )

    async def _try(self, worker: WorkerClient, body: bytes, attempt_id: str, budget_s: float) -> Attempt:
        """Started, AtCapacity, or Failed with why. Bad input, and a request that failed on the worker,
        raise: neither is tried again."""
        try:
            exchange = await worker.http.post(GENERATE_PATH, body, budget_s)
        except WorkerHttpError as error:
            return Failed(f"no response ({error})")
        if exchange.status != 200:
            return await self._refusal(exchange)
        stream = WorkerStream(worker, exchange, self.settings.worker_event_bytes_max, attempt_id)
        try:
            first = await stream.next_batch()
        except (WorkerFailed, BudgetExhausted) as error:
            exchange.abort()
            return Failed(str(error))
        except BaseException:
            exchange.abort()
            raise
        if not first:
            exchange.abort()
            return Failed("failed before its first token (an empty batch)")
        if type(first[0]) is ErrorEvent:
            await stream.close()  # the error line ended the response: the connection stays usable
            if first[0].error == "engine_failed":
                worker.breaker.record_failure()  # its engine died: this worker is unwell
            else:
                worker.breaker.record_neutral()  # one request failed there: says nothing of the worker
            raise WorkerRequestFailed(attempt_id, worker.url, first[0])
        stream.first_batch = first
        return Started(stream)

    async def _refusal(self, exchange: WorkerConnection) -> AtCapacity | Failed:
        """What a non-200 answer means: AtCapacity, or Failed; a 404 or 400 raises (the client's error)."""
        status = exchange.status
        bytes_max = self.settings.worker_event_bytes_max
        parts: list[bytes] = []
        size = 0
        try:
            while data := await exchange.read():
                parts.append(data)
                size += len(data)
                if size > bytes_max:
                    exchange.abort()
                    return Failed(f"answered {status} with a body over {bytes_max} bytes")
            await exchange.finish()
        except WorkerHttpError as error:
            exchange.abort()
            return Failed(f"answered {status} and broke ({error})")
        except BaseException:
            exchange.abort()
            raise
        raw = b"".join(parts)
        try:
            refusal = _refusal_decoder.decode(raw)
        except msgspec.DecodeError:
            refusal = {}
        error = refusal.get("error")
        if status == 503 and error == "overloaded":
            return AT_CAPACITY
        if status == 404 and error == "model_not_found":
            raise ApiError(
                404, str(refusal.get("message", "model not served")), param="model", code="model_not_found"
            )
        if status == 400 and error == "invalid_request":
            raise ApiError(400, str(refusal.get("message", "invalid request")), code="invalid_value")
        return Failed(f"answered {status} {error or raw[:200]!r}")
