"""OpenAI's response wire format: whole responses and SSE chunks for chat and text completions.

Chunks are built from bytes prepared once per request (everything but the token text), so a token
costs one JSON string encode and one concatenation.

Log-probabilities, when asked, in OpenAI's two shapes: chat's `logprobs.content[]` ({token, logprob,
bytes, top_logprobs: [{token, logprob, bytes}]}) and the legacy completions' {tokens, token_logprobs,
top_logprobs: [{token: logprob}], text_offset} (offsets count characters of the completion text).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.workers import LogprobEntry, TokenEvent

_encode = msgspec.json.Encoder().encode

LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of probability 0 (log 0 = -inf is not JSON)

DONE_LINE = b"data: [DONE]\n\n"
CHAT_CHUNK = "chat.completion.chunk"
TEXT_COMPLETION = "text_completion"


def finish_reason_of(worker_reason: str) -> str:
    """The worker says stop | length | cancelled; a cancelled stream is never answered, so stop."""
    return "length" if worker_reason == "length" else "stop"


def usage_of(prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: the prompt tokens served from the worker's prefix cache."""
    assert 0 <= cached_prompt_tokens <= prompt_tokens, "cached prompt tokens are a part of the prompt"
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_prompt_tokens},
    }


def _logprob_of(entry: LogprobEntry) -> float:
    return max(entry.logprob, LOGPROB_FLOOR)


def chat_logprob(event: TokenEvent) -> dict:
    """One token of chat's `logprobs.content`."""
    chosen = event.logprob
    assert chosen is not None, "a token of a request that asked for logprobs carries its logprob"
    return {
        "token": chosen.token,
        "logprob": _logprob_of(chosen),
        "bytes": chosen.bytes,
        "top_logprobs": [
            {"token": other.token, "logprob": _logprob_of(other), "bytes": other.bytes}
            for other in event.top_logprobs
        ],
    }


def chat_logprobs(events: Sequence[TokenEvent]) -> dict:
    return {"content": [chat_logprob(event) for event in events], "refusal": None}


def legacy_logprobs(events: Sequence[TokenEvent], text_offset: int) -> dict:
    """The completions API's logprobs of `events`, the first at `text_offset` characters into the text."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    for event in events:
        chosen = event.logprob
        assert chosen is not None, "a token of a request that asked for logprobs carries its logprob"
        tokens.append(chosen.token)
        token_logprobs.append(_logprob_of(chosen))
        top_logprobs.append({other.token: _logprob_of(other) for other in event.top_logprobs})
        offsets.append(text_offset)
        text_offset += len(event.text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_completion(
    response_id: str,
    created_s: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: dict | None = None,
    cached_prompt_tokens: int = 0,
) -> dict:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created_s,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_of(prompt_tokens, completion_tokens, cached_prompt_tokens),
    }


def text_completion(
    response_id: str,
    created_s: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: dict | None = None,
    cached_prompt_tokens: int = 0,
) -> dict:
    return {
        "id": response_id,
        "object": TEXT_COMPLETION,
        "created": created_s,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage_of(prompt_tokens, completion_tokens, cached_prompt_tokens),
    }


def encode_json(payload: dict) -> bytes:
    return _encode(payload)


class ChunkWriter:
    """SSE `data:` lines of one streamed response (chat or text), in OpenAI's order:
    [chat: a role chunk], a chunk per token, a chunk with the finish reason, [the usage chunk], [DONE].
    With logprobs asked, each token chunk carries its token's logprobs (`token_with_logprobs`)."""

    def __init__(
        self, *, chat: bool, response_id: str, created_s: int, model: str, include_usage: bool
    ) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self._head = {
            "id": response_id,
            "object": CHAT_CHUNK if chat else TEXT_COMPLETION,
            "created": created_s,
            "model": model,
            "system_fingerprint": None,
        }
        usage_tail = b',"usage":null' if include_usage else b""
        head = _encode(self._head)[:-1]  # without the closing brace
        close_text = b"}" if chat else b""  # chat's text is in a delta object
        if chat:
            self._token_prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
        else:
            self._token_prefix = b"data: " + head + b',"choices":[{"index":0,"text":'
        self._token_suffix = close_text + b',"logprobs":null,"finish_reason":null}]' + usage_tail + b"}\n\n"
        self._logprobs_infix = close_text + b',"logprobs":'
        self._logprobs_suffix = b',"finish_reason":null}]' + usage_tail + b"}\n\n"
        self._text_offset = 0  # characters of text streamed so far (the legacy logprobs' text_offset)

    def _line(self, choices: list, usage: object = None, with_usage: bool = False) -> bytes:
        payload = {**self._head, "choices": choices}
        if self.include_usage:
            payload["usage"] = usage if with_usage else None
        return b"data: " + _encode(payload) + b"\n\n"

    def role(self) -> bytes:
        """Chat streams open with the assistant role (empty content); text streams have no such chunk."""
        assert self.chat, "only chat streams carry a role chunk"
        return self._line(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def token(self, text: str) -> bytes:
        return self._token_prefix + _encode(text) + self._token_suffix

    def token_with_logprobs(self, event: TokenEvent) -> bytes:
        if self.chat:
            logprobs = chat_logprobs((event,))
        else:
            logprobs = legacy_logprobs((event,), self._text_offset)
            self._text_offset += len(event.text)
        return (
            self._token_prefix
            + _encode(event.text)
            + self._logprobs_infix
            + _encode(logprobs)
            + self._logprobs_suffix
        )

    def finish(self, finish_reason: str) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return self._line([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int = 0) -> bytes:
        assert self.include_usage, "the usage chunk is sent only when stream_options.include_usage is set"
        return self._line(
            [], usage_of(prompt_tokens, completion_tokens, cached_prompt_tokens), with_usage=True
        )

    @staticmethod
    def error(message: str, error_type: str, code: str) -> bytes:
        """A failure after the stream began (OpenAI sends the error object as a data line)."""
        body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        return b"data: " + _encode(body) + b"\n\n"
