"""POST /v1/responses: OpenAI's Responses API over the same admission, workers and billing as the
completion routes.

One request: the body -> the new input as message items -> the tenant's input safety check (block: a
400 before anything is admitted, so nothing is billed; redact: the findings replaced) -> the history
(the previous response's history, input and output for `previous_response_id`; the conversation's
items for `conversation`) -> the prompt builder (gateway.prompt_builder: the chat template, the context
limit and `truncation`) -> a generation started by the completion service (`CompletionService.start`:
admission with the model's price, a worker, the reservation) -> the output safety check as it streams
(redact, or stop: the generation is cancelled and the tenant pays for the tokens produced, which is what
the worker's UsageRecorded says) -> the response, stored when `store` is true (the default), its input
and output appended to its conversation.

Billing is the completion routes': the worker's UsageRecorded for the prompt it was sent (the prompt
builder counts with the same tokenizer) and the tokens it produced; the reservation is settled with the
same price. A stream is the Responses API's typed events (`event: <type>` + `data: {...}`, a
`sequence_number` on each): response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or
response.incomplete: max_output_tokens or content_filter; response.failed when the worker failed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.admission.base import Rejection
from gateway.auth import TenantIdentity
from gateway.completion_layers import FALLBACK_CODES, FALLBACK_MODELS_MAX, block_error, count_decisions
from gateway.completions import (
    SSE_HEADERS,
    Generation,
    monotonic_ms,
    new_request_id,
    worker_error,
)
from gateway.conversations import ConversationStore, new_id
from gateway.errors import ApiError, invalid_param
from gateway.logs import model_var, request_id_var
from gateway.metrics import GatewayMetrics
from gateway.prompt_builder import build_prompt
from gateway.prompts import Prompt, PromptStore, render_prompt
from gateway.router import ModelRouter, Routed
from gateway.safety import OutputGuard, Scanner, redact
from gateway.schemas import PreparedRequest
from gateway.settings import GatewaySettings
from gateway.sse import SseResponse, run_until_client_leaves
from gateway.tracing import RequestTrace
from gateway.workers import BudgetExhausted, ErrorEvent, WorkerFailed
from inference.registry import ModelSpec
from inference.request import TEMPERATURE_MAX
from ledger.pricing import usage_amount

logger = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PART_TYPES = ("input_text", "output_text", "text")
INPUT_ITEMS_MAX = 256  # items of one request's input


class PromptReference(BaseModel):
    """OpenAI's `prompt` parameter: a prompt version (gateway.prompts) and its variables."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    version: str | None = Field(default=None, min_length=1, max_length=128)
    variables: dict[str, str] = Field(default_factory=dict)


class ResponseCreateBody(BaseModel):
    """The subset of OpenAI's Responses request served here; what cannot be honoured is refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=128)
    conversation: str | dict[str, Any] | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    background: bool | None = None
    prompt: PromptReference | None = None
    # Not OpenAI's: models to fall back to, in order, when the model is overloaded or has no worker
    # available (every breaker open); the response names the model that served it.
    fallback_models: list[str] = Field(default_factory=list, max_length=FALLBACK_MODELS_MAX)


def parse_response_body(raw: bytes) -> ResponseCreateBody:
    try:
        return ResponseCreateBody.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value"
        ) from None


def _refuse_unsupported(body: ResponseCreateBody) -> None:
    text_format = (body.text or {}).get("format") or {"type": "text"}
    refused = (
        ("tools", bool(body.tools), "tools (function calling, built-in tools) are not supported"),
        ("tool_choice", body.tool_choice not in (None, "none", "auto"), 'tool_choice may only be "none"'),
        ("text.format", text_format.get("type") != "text", "only text output is supported"),
        ("background", bool(body.background), "background responses are not supported"),
        (
            "conversation",
            body.previous_response_id is not None and body.conversation is not None,
            "previous_response_id and conversation cannot be used together",
        ),
    )
    for param, asked, message in refused:
        if asked:
            raise invalid_param(param, message, code="unsupported_parameter")


# ---- items -----------------------------------------------------------------------------------------


def message_item(role: str, text: str, status: str = "completed", item_id: str | None = None) -> dict:
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    else:
        part = {"type": "input_text", "text": text}
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": role,
        "status": status,
        "content": [part],
    }


def item_text(item: dict) -> str:
    return "".join(part.get("text", "") for part in item["content"])


def _part_text(part: Any, param: str) -> str:
    if (
        not isinstance(part, dict)
        or part.get("type") not in TEXT_PART_TYPES
        or not isinstance(part.get("text"), str)
    ):
        raise invalid_param(param, "only text content parts are supported", code="unsupported_parameter")
    return part["text"]


def input_items(value: str | list[dict[str, Any]], param: str = "input") -> list[dict]:
    """The request's input (a string, or message items) as stored message items, each with a new id."""
    if isinstance(value, str):
        return [message_item("user", refuse_nul(value, param))]
    if len(value) > INPUT_ITEMS_MAX:
        raise invalid_param(param, f"{param} may hold at most {INPUT_ITEMS_MAX} items")
    items = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if item.get("type", "message") != "message":
            raise invalid_param(
                f"{where}.type", "only message items are supported", code="unsupported_parameter"
            )
        role = item.get("role")
        if role not in INPUT_ROLES:
            raise invalid_param(f"{where}.role", f"role must be one of {list(INPUT_ROLES)}")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_part_text(part, f"{where}.content[{i}]") for i, part in enumerate(content))
        else:
            raise invalid_param(f"{where}.content", "content must be a string or a list of text parts")
        items.append(message_item(role, refuse_nul(text, f"{where}.content")))
    return items


def refuse_nul(text: str, param: str) -> str:
    """`text`, or a 400: Postgres cannot store a NUL character in text."""
    if "\x00" in text:
        raise invalid_param(param, f"{param} must not contain NUL characters")
    return text


def chat_message(item: dict) -> dict:
    return {"role": item["role"], "content": item_text(item)}


# ---- safety ----------------------------------------------------------------------------------------


def check_input(
    scanner: Scanner | None, metrics: GatewayMetrics, items: list[dict], instructions: str | None
) -> tuple[list[dict], str | None]:
    """The input after the tenant's input check: a 400 when it blocks, the findings redacted when it
    redacts."""
    if scanner is None or scanner.policy.input_action == "none":
        return items, instructions
    action = scanner.policy.input_action
    texts = [item_text(item) for item in items] + ([instructions] if instructions else [])
    findings = [scanner.scan(text) for text in texts]
    reasons = [finding.reason for found in findings for finding in found]
    count_decisions(metrics, "input", action, reasons)
    if not reasons:
        return items, instructions
    if action == "block":
        raise block_error(reasons, "input")
    redacted_items = [
        message_item(item["role"], redact(text, found), item_id=item["id"])
        for item, text, found in zip(items, texts, findings, strict=False)
    ]
    redacted_instructions = redact(instructions, findings[-1]) if instructions else None
    return redacted_items, redacted_instructions


# ---- the answer ------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One response being produced: its ids, the released (checked) text, its ending."""

    response_id: str
    item_id: str
    created_at_s: int
    model: str  # the version that serves it
    prompt: Prompt | None  # the prompt version that built its instructions
    request: ResponseCreateBody
    conversation_id: str | None
    guard: OutputGuard | None
    text: str = ""
    error: ApiError | None = None
    incomplete_reason: str | None = None
    sequence_number: int = 0
    usage: dict | None = None
    first_token_ms: float | None = None  # monotonic: when the first tokens arrived
    on_first_token: Callable[[], None] | None = None

    def feed(self, delta: str) -> str:
        """What of `delta` may be sent now (after the output check)."""
        if self.first_token_ms is None:
            self.first_token_ms = monotonic_ms()
            if self.on_first_token is not None:
                self.on_first_token()
        released = self.guard.feed(delta) if self.guard is not None else delta
        self.text += released
        if self.guard is not None and self.guard.stopped is not None:
            self.incomplete_reason = "content_filter"
        return released

    def flush(self) -> str:
        released = self.guard.flush() if self.guard is not None else ""
        self.text += released
        return released

    @property
    def stopped(self) -> bool:
        return self.incomplete_reason == "content_filter"

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "incomplete" if self.incomplete_reason else "completed"

    def output_item(self, status: str) -> dict:
        return message_item("assistant", self.text, status=status, item_id=self.item_id)

    def prompt_view(self) -> dict | None:
        if self.prompt is None:
            return None
        variables = self.request.prompt.variables if self.request.prompt else {}
        return {"id": self.prompt.name, "version": self.prompt.version, "variables": variables}

    def response(self, final: bool) -> dict:
        request = self.request
        status = self.status if final else "in_progress"
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at_s,
            "status": status,
            "error": {"code": self.error.code, "message": self.error.message}
            if final and self.error
            else None,
            "incomplete_details": {"reason": self.incomplete_reason}
            if final and self.incomplete_reason
            else None,
            "instructions": request.instructions,
            "prompt": self.prompt_view(),
            "max_output_tokens": request.max_output_tokens,
            "model": self.model,
            "output": [self.output_item("completed" if status == "completed" else "incomplete")]
            if final
            else [],
            "parallel_tool_calls": False,
            "previous_response_id": request.previous_response_id,
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
            "store": request.store,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "text": {"format": {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": request.truncation,
            "usage": self.usage if final else None,
            "metadata": request.metadata or {},
        }


def usage_object(generation: Generation) -> dict:
    prompt_tokens = generation.prompt_tokens
    completion_tokens = generation.completion_tokens
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


class AsgiResponse(Response):
    """An ASGI callable (the SSE response) handed back from a FastAPI route as a Response."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        super().__init__()
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


@dataclass(frozen=True, slots=True)
class Started:
    generation: Generation
    answer: Answer
    history: list[dict]
    input_items: list[dict]
    routed: Routed
    started_ms: float
    trace: RequestTrace


class ResponsesService:
    def __init__(
        self,
        settings: GatewaySettings,
        router: ModelRouter,
        store: ConversationStore,
        prompts: PromptStore,
        metrics: GatewayMetrics,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.settings = settings
        self.router = router
        self.prompts = prompts
        self.store = store
        self.metrics = metrics
        self.wall_clock_ms = wall_clock_ms

    async def create(
        self, tenant: TenantIdentity, raw_body: bytes, receive: Callable[[], Awaitable[dict]]
    ) -> Response:
        body = parse_response_body(raw_body)
        for key, value in (body.metadata or {}).items():
            refuse_nul(key + value, "metadata")
        refuse_nul(body.instructions or "", "instructions")
        request_trace = RequestTrace(tenant.tenant_id, body.model)
        try:
            started = await self._start(tenant, body, request_trace)
        except BaseException as error:
            code = getattr(error, "code", None) or type(error).__name__
            if code == "content_policy_violation":
                request_trace.safety_decision = "block"
            request_trace.end({}, error=code)
            raise
        headers = {"x-request-id": started.generation.request_id, **started.generation.reservation.headers}
        if body.stream:
            events = self._events(tenant, started)

            async def end_stream() -> None:  # the client may have left: the spans end either way
                await started.generation.settle()
                self._end_trace(started)

            return AsgiResponse(SseResponse(events, end_stream, {**SSE_HEADERS, **headers}))
        try:
            await run_until_client_leaves(self._run(started), receive)
        except BaseException:
            await started.generation.settle()
            self._end_trace(started)  # the client left (or worse): the spans end here
            raise
        await started.generation.settle()
        answer = started.answer
        answer.usage = usage_object(started.generation)
        response = answer.response(final=True)
        await self._finish(tenant, started, response)
        if answer.error is not None:
            raise answer.error
        return Response(_encode(response), 200, headers, media_type="application/json")

    async def _start(
        self, tenant: TenantIdentity, body: ResponseCreateBody, request_trace: RequestTrace
    ) -> Started:
        """Checks, history and prompt, then a generation on the model (or the first fallback that can
        take it)."""
        started_ms = monotonic_ms()
        model_var.set(body.model)
        _refuse_unsupported(body)
        policy = await self.store.policy(tenant.tenant_id)
        scanner = Scanner(policy.safety) if policy.safety.checks_anything else None
        prompt, instructions = await self._instructions(body)
        with request_trace.step("safety.input"):
            items, instructions = check_input(scanner, self.metrics, input_items(body.input), instructions)
        if scanner is not None and scanner.policy.input_action == "redact":
            request_trace.safety_decision = "redact"
        with request_trace.step("conversation.history"):
            conversation_id, history, pinned_model = await self._history(tenant, body)
        candidates = [body.model, *body.fallback_models]
        for index, alias in enumerate(candidates):
            request_id = new_request_id()
            request_id_var.set(request_id)
            with request_trace.step("router.route"):
                routed = await self.router.route(
                    alias, conversation_id or request_id, pinned_model if index == 0 else None
                )
            try:
                generation = await self._start_on(
                    tenant,
                    body,
                    routed,
                    (prompt, instructions),
                    history,
                    items,
                    (request_id, started_ms),
                    request_trace,
                )
                break
            except (ApiError, Rejection) as error:
                if index + 1 == len(candidates) or error.code not in FALLBACK_CODES:
                    raise
                self.metrics.fallbacks.labels(alias, candidates[index + 1], error.code).inc()
                logger.warning("falling back from %s to %s: %s", alias, candidates[index + 1], error.code)
        checks_output = scanner is not None and scanner.policy.output_action != "none"
        guard = OutputGuard(scanner, self.settings.safety_output_holdback_chars) if checks_output else None
        answer = Answer(
            response_id=f"resp_{request_id}",
            item_id=new_id("msg"),
            created_at_s=self.wall_clock_ms() // 1000,
            model=routed.model,
            prompt=prompt,
            request=body,
            conversation_id=conversation_id,
            guard=guard,
            on_first_token=request_trace.first_token,
        )
        return Started(generation, answer, history, items, routed, started_ms, request_trace)

    async def _instructions(self, body: ResponseCreateBody) -> tuple[Prompt | None, str | None]:
        """(the prompt version named, the instructions: its text with its variables, then the request's)."""
        if body.prompt is None:
            return None, body.instructions
        prompt = await self.prompts.get(body.prompt.id, body.prompt.version)
        text = render_prompt(prompt.text, body.prompt.variables)
        return prompt, text if body.instructions is None else f"{text}\n{body.instructions}"

    async def _start_on(
        self,
        tenant: TenantIdentity,
        body: ResponseCreateBody,
        routed: Routed,
        instructions: tuple[Prompt | None, str | None],
        history: list[dict],
        items: list[dict],
        started: tuple[str, float],
        request_trace: RequestTrace,
    ) -> Generation:
        """The prompt built for the routed version (its template, tokenizer and context) and its
        generation started; `instructions` (the prompt version used, the instructions' text), `started`
        (the request id, when it started)."""
        prompt, instructions_text = instructions
        request_id, started_ms = started
        spec = self._model(routed.model)
        with request_trace.step("prompt.build") as span:
            built = build_prompt(
                spec,
                instructions_text,
                [chat_message(item) for item in history],
                [chat_message(item) for item in items],
                body.max_output_tokens,
                body.truncation,
                self.settings.prompt_chars_max,
            )
            span.set_attribute("tollgate.prompt.history_dropped", built.history_dropped)
        self.metrics.prompt_history_dropped.inc(built.history_dropped)
        prepared = PreparedRequest(
            chat=True,
            model=routed.model,
            prompt=built.prompt,
            prompt_tokens=built.prompt_tokens,
            max_tokens=built.max_tokens,
            stop=(spec.template.stop,),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=None,
            stream=body.stream,
            include_usage=False,
        )
        request_trace.start_generation(routed.model, request_id)
        prompt_version = f"{prompt.name}@{prompt.version}" if prompt is not None else None
        return await self._generate(
            tenant, prepared, (request_id, started_ms), routed, (prompt_version, request_trace.traceparent())
        )

    async def _generate(
        self,
        tenant: TenantIdentity,
        prepared: PreparedRequest,
        started: tuple[str, float],
        routed: Routed,
        worker_fields: tuple[str | None, str | None],
    ) -> Generation:
        """The generation started on the routed version's workers (`started`: the request id, when it
        started; `worker_fields`: the prompt version and the trace context it carries); a server-side
        failure to start counts against the version (the canary watch)."""
        completions = self.router.completions_for(routed.model)
        try:
            return await completions.start(tenant, prepared, *started, *worker_fields)
        except ApiError as error:
            if error.status_code >= 500:
                await self.router.observe(routed, failed=True, ttft_ms=None)
            raise

    def _model(self, model: str) -> ModelSpec:
        spec = self.settings.models.get(model)
        if spec is None:
            raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
        return spec

    async def _history(
        self, tenant: TenantIdentity, body: ResponseCreateBody
    ) -> tuple[str | None, list[dict], str | None]:
        """(the conversation the response joins, the items before its input, the version that served the
        previous response: a continuation stays on it)."""
        if body.previous_response_id is not None:
            previous = await self.store.get_response(
                tenant.tenant_id, body.previous_response_id, param="previous_response_id"
            )
            history = previous.history + previous.input_items + previous.response["output"]
            return None, history, previous.response["model"]
        if body.conversation is None:
            return None, [], None
        conversation_id = (
            body.conversation if isinstance(body.conversation, str) else body.conversation.get("id")
        )
        if not isinstance(conversation_id, str) or not conversation_id:
            raise invalid_param("conversation", 'conversation is an id or {"id": ...}')
        return conversation_id, await self.store.history(tenant.tenant_id, conversation_id), None

    async def _run(self, started: Started) -> None:
        """The generation to its end, the answer's text checked on the way (non-streamed)."""
        answer = started.answer
        try:
            async for tokens, end in started.generation.relay():
                answer.feed("".join(token.text for token in tokens))
                if answer.stopped:
                    return  # the generation is cancelled when settled: billed for the tokens produced
                if type(end) is ErrorEvent:
                    answer.error = worker_error(end)
                    return
        except BudgetExhausted as error:
            answer.error = ApiError(504, str(error), error_type="server_error", code="timeout")
            return
        except WorkerFailed:
            answer.error = ApiError(
                502, "the inference worker failed", error_type="server_error", code="worker_failed"
            )
            return
        answer.flush()
        self._note_length(started)

    @staticmethod
    def _note_length(started: Started) -> None:
        done = started.generation.done
        if done is not None and done.finish_reason == "length":
            started.answer.incomplete_reason = "max_output_tokens"

    async def _finish(self, tenant: TenantIdentity, started: Started, response: dict) -> None:
        """Count the answer's output decisions and status; store it (and extend its conversation)."""
        answer = started.answer
        if answer.guard is not None:
            action = answer.guard.scanner.policy.output_action
            count_decisions(
                self.metrics, "output", action, [finding.reason for finding in answer.guard.findings]
            )
        self.metrics.responses.labels(answer.status, str(answer.request.store).lower()).inc()
        ttft_ms = None if answer.first_token_ms is None else answer.first_token_ms - started.started_ms
        await self.router.observe(started.routed, failed=answer.error is not None, ttft_ms=ttft_ms)
        self._end_trace(started)
        if answer.error is not None or not (answer.request.store or answer.conversation_id):
            return  # a conversation keeps its items even when the response itself is not stored
        with anyio.CancelScope(shield=True):
            await self.store.save_response(
                tenant.tenant_id,
                response,
                started.history,
                started.input_items,
                answer.conversation_id,
                self.wall_clock_ms(),
                keep_response=answer.request.store,
            )

    def _end_trace(self, started: Started) -> None:
        """The root span's outcome: the GenAI usage and model, the version, prompt, safety and cost."""
        if not started.trace.enabled:
            return
        answer = started.answer
        generation = started.generation
        request_trace = started.trace
        if answer.guard is not None and answer.guard.findings:
            request_trace.safety_decision = "stop" if answer.stopped else "redact"
        price = self.settings.models[answer.model].price
        prompt = answer.prompt
        attributes = {
            "gen_ai.response.model": answer.model,
            "gen_ai.response.id": answer.response_id,
            "gen_ai.usage.input_tokens": generation.prompt_tokens,
            "gen_ai.usage.output_tokens": generation.completion_tokens,
            "gen_ai.response.finish_reasons": [answer.incomplete_reason or answer.status],
            "tollgate.request_id": generation.request_id,
            "tollgate.model_version": answer.model,
            "tollgate.prompt_version": f"{prompt.name}@{prompt.version}" if prompt else "",
            "tollgate.cost": usage_amount(price, generation.prompt_tokens, generation.completion_tokens),
        }
        request_trace.end(attributes, error=answer.error.code if answer.error is not None else None)

    # ---- streaming ---------------------------------------------------------------------------------

    def _event(self, answer: Answer, event_type: str, **fields: Any) -> bytes:
        payload = {"type": event_type, "sequence_number": answer.sequence_number, **fields}
        answer.sequence_number += 1
        return b"event: " + event_type.encode() + b"\ndata: " + _encode(payload) + b"\n\n"

    def _delta(self, answer: Answer, delta: str) -> bytes:
        return self._event(
            answer,
            "response.output_text.delta",
            item_id=answer.item_id,
            output_index=0,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    async def _events(self, tenant: TenantIdentity, started: Started) -> AsyncGenerator[bytes, None]:
        answer = started.answer
        generation = started.generation
        yield (
            self._event(answer, "response.created", response=answer.response(final=False))
            + self._event(answer, "response.in_progress", response=answer.response(final=False))
            + self._event(
                answer, "response.output_item.added", output_index=0, item=answer.output_item("in_progress")
            )
            + self._event(
                answer,
                "response.content_part.added",
                item_id=answer.item_id,
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        )
        async for delta in self._stream_text(started):
            yield self._delta(answer, delta)
        await generation.settle()
        answer.usage = usage_object(generation)
        response = answer.response(final=True)
        await self._finish(tenant, started, response)
        yield self._ending(answer, response)

    async def _stream_text(self, started: Started) -> AsyncGenerator[str, None]:
        """The checked text of each batch of tokens, until the end (the answer records how it ended)."""
        answer = started.answer
        try:
            async for tokens, end in started.generation.relay():
                delta = answer.feed("".join(token.text for token in tokens))
                if delta:
                    yield delta
                if answer.stopped:
                    return
                if type(end) is ErrorEvent:
                    answer.error = worker_error(end)
                    return
        except (WorkerFailed, BudgetExhausted) as error:
            logger.warning("a streamed response failed: %s", error)
            code = "timeout" if isinstance(error, BudgetExhausted) else "worker_failed"
            answer.error = ApiError(
                502, "the inference worker failed mid-stream", error_type="server_error", code=code
            )
            return
        tail = answer.flush()
        if tail:
            yield tail
        self._note_length(started)

    def _ending(self, answer: Answer, response: dict) -> bytes:
        if answer.error is not None:
            return self._event(answer, "response.failed", response=response)
        item = response["output"][0]
        part = item["content"][0]
        where = {"item_id": answer.item_id, "output_index": 0}
        return (
            self._event(
                answer, "response.output_text.done", **where, content_index=0, text=answer.text, logprobs=[]
            )
            + self._event(answer, "response.content_part.done", **where, content_index=0, part=part)
            + self._event(answer, "response.output_item.done", output_index=0, item=item)
            + self._event(
                answer,
                "response.completed" if answer.status == "completed" else "response.incomplete",
                response=response,
            )
        )
