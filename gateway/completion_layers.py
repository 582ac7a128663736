"""The layers above the model on /v1/chat/completions and /v1/completions: the tenant's safety policy and
the model router, as the Responses API applies them (gateway.responses).

    checked = await layers.check_input(tenant, body)          # block: a 400 before anything is admitted
    generation = await layers.start(tenant, checked, ...)     # routed, prepared, started on the version

Input: the tenant's policy (gateway.safety) on every message's text (chat) or the prompt; "block"
answers 400 `content_policy_violation` in OpenAI's error shape before admission (nothing billed),
"redact" replaces each finding in what the model is sent. Output: an `OutputGuard` on the generation,
applied by the completion service as the tokens stream (redact, or stop: the stream ends with
`finish_reason: "content_filter"` and the worker bills the tokens it produced). Logprobs report the
model's raw tokens, so a request asking for them is refused while the tenant's output is checked.

Routing: the request's model is an alias (gateway.router): the version routed to (its canary share keyed
by the request id: a completion has no conversation to stick to) is the model the prompt is built for, the
response names and the worker bills at its price; `fallback_models` (not OpenAI's: in the body, e.g. the
openai client's `extra_body`) are tried in order when a model is overloaded or has no worker available.
Each version's workers are its BalancedPool (queue depth, then observed latency). The outcome of each
routed request (failed, time to first token) feeds the canary watch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from gateway.admission.base import Rejection
from gateway.auth import TenantIdentity
from gateway.completions import Generation
from gateway.conversations import ConversationStore
from gateway.errors import ApiError, invalid_param
from gateway.metrics import GatewayMetrics
from gateway.router import ModelRouter, Routed
from gateway.safety import OutputGuard, SafetyPolicy, Scanner, redact
from gateway.schemas import ChatCompletionBody, CompletionBody, SamplingFields, prepare
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

FALLBACK_MODELS_MAX = 4  # models one request may fall back to
FALLBACK_CODES = ("overloaded", "worker_unavailable")  # a model that cannot take the request now
SCANNERS_CACHED_MAX = 10_000  # tenants whose compiled policy is kept


class FallbackModels(msgspec.Struct):
    fallback_models: list[str] = []


_decode_fallbacks = msgspec.json.Decoder(FallbackModels).decode


def fallback_models_of(raw_body: bytes) -> list[str]:
    """The body's `fallback_models` (read only when the body names them: the hot path pays a byte search)."""
    if b'"fallback_models"' not in raw_body:
        return []
    try:
        models = _decode_fallbacks(raw_body).fallback_models
    except msgspec.ValidationError as error:
        raise invalid_param("fallback_models", f"fallback_models: {error}") from None
    if len(models) > FALLBACK_MODELS_MAX or not all(0 < len(model) <= 128 for model in models):
        raise invalid_param(
            "fallback_models", f"fallback_models holds at most {FALLBACK_MODELS_MAX} model names"
        )
    return models


def count_decisions(metrics: GatewayMetrics, stage: str, action: str, reasons: list[str]) -> None:
    """Each finding acted on, in metrics and the log (the request id comes from the log context; the text
    never appears)."""
    for reason in reasons:
        metrics.safety_decisions.labels(stage, reason, action).inc()
    if reasons:
        logger.info(
            "safety decision", extra={"stage": stage, "action": action, "reasons": sorted(set(reasons))}
        )


def block_error(reasons: list[str], param: str) -> ApiError:
    return ApiError(
        400,
        f"The input was refused by the safety policy ({', '.join(sorted(set(reasons)))}).",
        param=param,
        code="content_policy_violation",
    )


@dataclass(frozen=True, slots=True)
class Checked:
    """A request body after the input check, and the scanner its output is checked with (None: not)."""

    body: SamplingFields
    output_scanner: Scanner | None


class CompletionLayers:
    def __init__(
        self,
        settings: GatewaySettings,
        router: ModelRouter,
        store: ConversationStore,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.router = router
        self.store = store
        self.metrics = metrics
        self._scanners: dict[str, tuple[SafetyPolicy, Scanner]] = {}

    async def scanner(self, tenant_id: str) -> Scanner | None:
        """The tenant's policy compiled (once per policy read), None when it checks nothing."""
        policy = (await self.store.policy(tenant_id)).safety
        if not policy.checks_anything:
            return None
        cached = self._scanners.get(tenant_id)
        if cached is not None and cached[0] is policy:
            return cached[1]
        if len(self._scanners) >= SCANNERS_CACHED_MAX:
            self._scanners.clear()
        scanner = Scanner(policy)
        self._scanners[tenant_id] = (policy, scanner)
        return scanner

    async def check_input(self, tenant: TenantIdentity, body: SamplingFields) -> Checked:
        scanner = await self.scanner(tenant.tenant_id)
        if scanner is None:
            return Checked(body, None)
        policy = scanner.policy
        if policy.input_action != "none":
            body = self._checked_body(scanner, body)
        if policy.output_action == "none":
            return Checked(body, None)
        if (body.logprobs is not None) if isinstance(body, CompletionBody) else body.logprobs:
            raise invalid_param(
                "logprobs",
                "logprobs cannot be reported while the tenant's safety policy checks the output",
                code="unsupported_parameter",
            )
        return Checked(body, scanner)

    def _checked_body(self, scanner: Scanner, body: SamplingFields) -> SamplingFields:
        """The body with its texts checked: a 400 when the policy blocks, the findings redacted else."""
        action = scanner.policy.input_action
        if isinstance(body, ChatCompletionBody):
            param = "messages"
            texts = [_message_text(message) for message in body.messages]
        else:
            assert isinstance(body, CompletionBody), "a completion body"
            param = "prompt"
            texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        findings = [scanner.scan(text) if text is not None else [] for text in texts]
        reasons = [finding.reason for found in findings for finding in found]
        count_decisions(self.metrics, "input", action, reasons)
        if not reasons:
            return body
        if action == "block":
            raise block_error(reasons, param)
        redacted = [
            redact(text, found) if found else text for text, found in zip(texts, findings, strict=True)
        ]
        if isinstance(body, ChatCompletionBody):
            messages = [
                message if text is None or text == new else {**message, "content": new}
                for message, text, new in zip(body.messages, texts, redacted, strict=True)
            ]
            return body.model_copy(update={"messages": messages})
        return body.model_copy(update={"prompt": redacted[0] if isinstance(body.prompt, str) else redacted})

    async def start(
        self,
        tenant: TenantIdentity,
        checked: Checked,
        raw_body: bytes,
        request_id: str,
        started_ms: float,
        traceparent: str | None = None,
    ) -> Generation:
        """The generation on the version the alias routes to (or the first fallback that can take it)."""
        body = checked.body
        candidates = [body.model, *fallback_models_of(raw_body)]
        for index, alias in enumerate(candidates):
            routed = await self.router.route(alias, request_id)
            try:
                generation = await self._start_on(tenant, body, routed, (request_id, started_ms), traceparent)
            except (ApiError, Rejection) as error:
                if index + 1 == len(candidates) or error.code not in FALLBACK_CODES:
                    raise
                self.metrics.fallbacks.labels(alias, candidates[index + 1], error.code).inc()
                logger.warning("falling back from %s to %s: %s", alias, candidates[index + 1], error.code)
                continue
            if checked.output_scanner is not None:
                generation.guard = OutputGuard(
                    checked.output_scanner, self.settings.safety_output_holdback_chars
                )
            generation.on_settled = self._observer(routed)
            return generation
        raise AssertionError("the last candidate raised or returned")

    async def _start_on(
        self,
        tenant: TenantIdentity,
        body: SamplingFields,
        routed: Routed,
        started: tuple[str, float],
        traceparent: str | None,
    ) -> Generation:
        """The request prepared for the routed version (its template and tokenizer) and started there;
        `started`: the request id and when it started."""
        prepared = prepare(
            body if routed.model == body.model else body.model_copy(update={"model": routed.model}),
            self.settings,
        )
        try:
            return await self.router.completions_for(routed.model).start(
                tenant, prepared, *started, traceparent=traceparent
            )
        except ApiError as error:
            if error.status_code >= 500:
                await self.router.observe(routed, failed=True, ttft_ms=None)
            raise

    def _observer(self, routed: Routed):
        async def observe(generation: Generation) -> None:
            guard = generation.guard
            if guard is not None:
                reasons = [finding.reason for finding in guard.findings]
                count_decisions(self.metrics, "output", guard.scanner.policy.output_action, reasons)
            failed = generation.outcome in ("worker_failed", "timeout")
            ttft_ms = (
                None
                if generation.first_token_ms is None
                else generation.first_token_ms - generation.started_ms
            )
            await self.router.observe(routed, failed=failed, ttft_ms=ttft_ms)

        return observe


def _message_text(message: dict) -> str | None:
    """A chat message's text (its content string, or its text parts joined); None for no text."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return None
