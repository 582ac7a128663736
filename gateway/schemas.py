"""Request bodies of /v1/chat/completions and /v1/completions (the subset of OpenAI's fields served here),
and `prepare()`: a validated body -> the prompt, its token count and the limits applied, or a 400 that
names the param. Unknown OpenAI fields are accepted and ignored; unsupported values are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ApiError, invalid_param
from gateway.settings import GatewaySettings, ModelLimits
from inference.chat import CHAT_STOP, InvalidChat, render_chat
from inference.tokenizer import count_tokens


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)


class ChatCompletionBody(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    echo: bool = False


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


def parse_body(model: type[SamplingFields], raw: bytes) -> SamplingFields:
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value") from None


def _model_limits(settings: GatewaySettings, model: str) -> ModelLimits:
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
            raise invalid_param("stop", f"each stop sequence must be 1 to {settings.stop_sequence_chars_max} characters")
    return tuple(sequences)


def _chat_prompt(body: ChatCompletionBody, settings: GatewaySettings) -> str:
    if len(body.messages) > settings.messages_max:
        raise invalid_param("messages", f"messages may hold at most {settings.messages_max} messages")
    try:
        return render_chat(body.messages)
    except InvalidChat as error:
        raise invalid_param("messages", str(error)) from None


def _text_prompt(body: CompletionBody) -> str:
    if body.echo:
        raise invalid_param("echo", "echo is not supported")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise invalid_param("prompt", "prompt must be one string (batched prompts are not served)")
        return body.prompt[0]
    return body.prompt


def prepare(body: SamplingFields, settings: GatewaySettings) -> PreparedRequest:
    limits = _model_limits(settings, body.model)
    chat = isinstance(body, ChatCompletionBody)
    prompt = _chat_prompt(body, settings) if chat else _text_prompt(body)
    prompt_param = "messages" if chat else "prompt"
    if len(prompt) > settings.prompt_chars_max:
        raise invalid_param(prompt_param, f"the prompt is longer than {settings.prompt_chars_max} characters")
    prompt_tokens = count_tokens(prompt)
    room = limits.context_tokens_max - prompt_tokens
    if room < 1:
        raise invalid_param(
            prompt_param,
            f"the prompt is {prompt_tokens} tokens; {body.model} has a context of {limits.context_tokens_max}",
            code="context_length_exceeded",
        )
    asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    max_tokens_param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if asked is not None and asked > limits.max_tokens_max:
        raise invalid_param(max_tokens_param, f"{max_tokens_param} is at most {limits.max_tokens_max} for {body.model}")
    if asked is not None and asked > room:
        raise invalid_param(
            max_tokens_param,
            f"{prompt_tokens} prompt tokens + {asked} {max_tokens_param} exceed {body.model}'s context of "
            f"{limits.context_tokens_max} tokens",
            code="context_length_exceeded",
        )
    stop = _stop_sequences(body.stop, settings)
    return PreparedRequest(
        chat=chat,
        model=body.model,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=asked if asked is not None else min(room, limits.max_tokens_max),
        stop=(*stop, CHAT_STOP) if chat else stop,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stream=body.stream,
        include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage),
    )
