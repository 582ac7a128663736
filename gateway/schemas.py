"""Request bodies of /v1/chat/completions and /v1/completions (the subset of OpenAI's fields served here),
and `prepare()`: a validated body -> the prompt, its token count and the limits applied, or a 400 that
names the param.

What the engine does is served exactly: logprobs and top_logprobs (chat), logprobs (completions: the
number of alternatives), logit_bias, presence and frequency penalties, seed. What it cannot do is refused
with a 400 naming the param, never accepted and ignored: tools and function calling, structured output
(`response_format` other than text), audio, predicted outputs, web search, several choices (`n`,
`best_of`), `suffix`, `echo`. Fields that change nothing about the completion (`user`, `metadata`,
`store`, ...) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError, invalid_param
from gateway.settings import GatewaySettings
from inference.chat import InvalidChat
from inference.registry import ModelSpec
from inference.request import (
    LOGIT_BIAS_ENTRIES_MAX,
    LOGIT_BIAS_MAX,
    PENALTY_MAX,
    SEED_MAX,
    SEED_MIN,
    TEMPERATURE_MAX,
    TOP_LOGPROBS_MAX,
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


COMPLETION_LOGPROBS_MAX = 5  # /v1/completions' `logprobs` (alternatives per token): OpenAI's bound


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(default=1, ge=1, le=1)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (a decimal string) -> bias in [-100, 100], added to its logit"
    )
    presence_penalty: float | None = Field(default=None, ge=-PENALTY_MAX, le=PENALTY_MAX)
    frequency_penalty: float | None = Field(default=None, ge=-PENALTY_MAX, le=PENALTY_MAX)


class ChatCompletionBody(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS_MAX)
    # Refused unless absent (or the value that asks for nothing): see `_refuse_unsupported`.
    tools: list[Any] | None = Field(default=None, description="not supported: refused unless empty")
    functions: list[Any] | None = Field(default=None, description="not supported: refused unless empty")
    tool_choice: Any = Field(default=None, description='not supported: refused unless "none"')
    function_call: Any = Field(default=None, description='not supported: refused unless "none"')
    response_format: dict[str, Any] | None = Field(default=None, description='only {"type": "text"}')
    modalities: list[str] | None = Field(default=None, description='only ["text"]')
    audio: Any = Field(default=None, description="not supported: refused unless null")
    prediction: Any = Field(default=None, description="not supported: refused unless null")
    web_search_options: Any = Field(default=None, description="not supported: refused unless null")


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=COMPLETION_LOGPROBS_MAX)
    best_of: int | None = Field(default=None, ge=1, description="only 1 (one choice per request)")
    suffix: str | None = Field(default=None, description="not supported: refused unless empty")


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """What the gateway runs: one prompt, its tokens, and the sampling asked for."""

    chat: bool
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: bool = False  # report each token's log-probability
    top_logprobs: int = 0  # and this many alternatives per token
    logit_bias: dict[int, float] | None = None  # token id -> bias
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def parse_body(model: type[SamplingFields], raw: bytes) -> SamplingFields:
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(
            400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value"
        ) from None


def _model_limits(settings: GatewaySettings, model: str) -> ModelSpec:
    limits = settings.models.get(model)
    if limits is None:
        raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
    return limits


def _stop_sequences(stop: str | list[str] | None, settings: GatewaySettings) -> tuple[str, ...]:
    sequences = [stop] if isinstance(stop, str) else list(stop or ())
    if len(sequences) > settings.stop_sequences_max:
        raise invalid_param("stop", f"stop may hold at most {settings.stop_sequences_max} sequences")
    for sequence in sequences:
        if not sequence or len(sequence) > settings.stop_sequence_chars_max:
            raise invalid_param(
                "stop", f"each stop sequence must be 1 to {settings.stop_sequence_chars_max} characters"
            )
    return tuple(sequences)


def _chat_prompt(body: ChatCompletionBody, settings: GatewaySettings, model: ModelSpec) -> str:
    """The messages in the model's own chat template."""
    if len(body.messages) > settings.messages_max:
        raise invalid_param("messages", f"messages may hold at most {settings.messages_max} messages")
    try:
        return model.template.render(body.messages)
    except InvalidChat as error:
        raise invalid_param("messages", str(error)) from None


def _text_prompt(body: CompletionBody) -> str:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise invalid_param("prompt", "prompt must be one string (batched prompts are not served)")
        return body.prompt[0]
    return body.prompt


def _refuse_unsupported(body: SamplingFields) -> None:
    """A 400 naming the first parameter asking for something this gateway does not do."""
    if isinstance(body, ChatCompletionBody):
        refused = (
            ("tools", bool(body.tools), "tools (function calling) are not supported"),
            ("functions", bool(body.functions), "functions (function calling) are not supported"),
            ("tool_choice", body.tool_choice not in (None, "none"), 'tool_choice may only be "none"'),
            ("function_call", body.function_call not in (None, "none"), 'function_call may only be "none"'),
            (
                "response_format",
                body.response_format is not None and body.response_format != {"type": "text"},
                'response_format may only be {"type": "text"} (structured output is not supported)',
            ),
            ("modalities", body.modalities not in (None, ["text"]), 'modalities may only be ["text"]'),
            ("audio", body.audio is not None, "audio output is not supported"),
            ("prediction", body.prediction is not None, "predicted outputs are not supported"),
            ("web_search_options", body.web_search_options is not None, "web search is not supported"),
            (
                "top_logprobs",
                bool(body.top_logprobs) and not body.logprobs,
                "top_logprobs needs logprobs set to true",
            ),
        )
    else:
        assert isinstance(body, CompletionBody), "a completion body"
        refused = (
            (
                "best_of",
                body.best_of is not None and body.best_of > 1,
                "best_of may only be 1 (one choice per request)",
            ),
            ("suffix", bool(body.suffix), "suffix (insertion) is not supported"),
            ("echo", body.echo, "echo is not supported"),
        )
    for param, asked, message in refused:
        if asked:
            raise invalid_param(param, message, code="unsupported_parameter")


def _logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """Token id strings -> ids; a 400 naming logit_bias for a key that is not an id or a bias out of range."""
    if not logit_bias:
        return None
    if len(logit_bias) > LOGIT_BIAS_ENTRIES_MAX:
        raise invalid_param("logit_bias", f"logit_bias may hold at most {LOGIT_BIAS_ENTRIES_MAX} token ids")
    biases: dict[int, float] = {}
    for key, bias in logit_bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise invalid_param(
                "logit_bias", f"logit_bias keys are token ids (decimal integers), not {key[:32]!r}"
            )
        if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
            raise invalid_param(
                "logit_bias", f"logit_bias values are in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}]"
            )
        biases[int(key)] = bias
    if len(biases) != len(logit_bias):
        raise invalid_param("logit_bias", "logit_bias names a token id twice")
    return biases


def _logprobs_asked(body: SamplingFields) -> tuple[bool, int]:
    """(report logprobs, alternatives per token): chat's logprobs/top_logprobs, completions' logprobs=N."""
    if isinstance(body, ChatCompletionBody):
        return bool(body.logprobs), (body.top_logprobs or 0) if body.logprobs else 0
    assert isinstance(body, CompletionBody), "a completion body"
    return body.logprobs is not None, body.logprobs or 0


def prepare(body: SamplingFields, settings: GatewaySettings) -> PreparedRequest:
    _refuse_unsupported(body)
    limits = _model_limits(settings, body.model)
    chat = isinstance(body, ChatCompletionBody)
    prompt = _chat_prompt(body, settings, limits) if chat else _text_prompt(body)
    prompt_param = "messages" if chat else "prompt"
    if len(prompt) > settings.prompt_chars_max:
        raise invalid_param(prompt_param, f"the prompt is longer than {settings.prompt_chars_max} characters")
    prompt_tokens = len(limits.tokenizer().encode(prompt))  # the model's own tokenizer, as its worker counts
    room = limits.context_tokens_max - prompt_tokens
    if room < 1:
        raise invalid_param(
            prompt_param,
            f"the prompt is {prompt_tokens} tokens; "
            f"{body.model} has a context of {limits.context_tokens_max}",
            code="context_length_exceeded",
        )
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    max_tokens_param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_tokens_max:
        raise invalid_param(
            max_tokens_param, f"{max_tokens_param} is at most {limits.max_tokens_max} for {body.model}"
        )
    if asked is not None and asked > room:
        raise invalid_param(
            max_tokens_param,
            f"{prompt_tokens} prompt tokens + {asked} {max_tokens_param} exceed {body.model}'s context of "
            f"{limits.context_tokens_max} tokens",
            code="context_length_exceeded",
        )
    stop = _stop_sequences(body.stop, settings)
    logprobs, top_logprobs = _logprobs_asked(body)
    return PreparedRequest(
        chat=chat,
        model=body.model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=asked if asked is not None else min(room, limits.max_tokens_max),
        stop=(*stop, limits.template.stop) if chat else stop,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stream=body.stream,
        include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body.logit_bias),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )


# ---- Response bodies: documentation only (the wire module writes them; the OpenAPI document shows them) --


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobs] | None
    refusal: list[TokenLogprobs] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """The JSON answer of a non-streamed chat completion (streamed: `chat.completion.chunk` SSE lines)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    """The JSON answer of a non-streamed completion (streamed: `text_completion` SSE lines)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[TextChoice]
    usage: Usage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error shape, for every refusal and failure of the OpenAI routes."""

    error: OpenAIErrorDetail
