"""OpenAI's response wire format: whole responses and SSE chunks for chat and text completions.

Chunks are built from bytes prepared once per request (everything but the token text), so a token
costs one JSON string encode and one concatenation.
"""

from __future__ import annotations

import msgspec

_encode = msgspec.json.Encoder().encode

DONE_LINE = b"data: [DONE]\n\n"
CHAT_CHUNK = "chat.completion.chunk"
TEXT_COMPLETION = "text_completion"


def finish_reason_of(worker_reason: str) -> str:
    """The worker says stop | length | cancelled; a cancelled stream is never answered, so stop."""
    return "length" if worker_reason == "length" else "stop"


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    response_id: str, created_s: int, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
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
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_of(prompt_tokens, completion_tokens),
    }


def text_completion(
    response_id: str, created_s: int, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": response_id,
        "object": TEXT_COMPLETION,
        "created": created_s,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_of(prompt_tokens, completion_tokens),
    }


def encode_json(payload: dict) -> bytes:
    return _encode(payload)


class ChunkWriter:
    """SSE `data:` lines of one streamed response (chat or text), in OpenAI's order:
    [chat: a role chunk], a chunk per token, a chunk with the finish reason, [the usage chunk], [DONE]."""

    def __init__(self, *, chat: bool, response_id: str, created_s: int, model: str, include_usage: bool) -> None:
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
        if chat:
            self._token_prefix = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._token_suffix = b'},"logprobs":null,"finish_reason":null}]' + usage_tail + b"}\n\n"
        else:
            self._token_prefix = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._token_suffix = b',"logprobs":null,"finish_reason":null}]' + usage_tail + b"}\n\n"
        self._usage_tail = usage_tail

    def _line(self, choices: list, usage: object = None, with_usage: bool = False) -> bytes:
        payload = {**self._head, "choices": choices}
        if self.include_usage:
            payload["usage"] = usage if with_usage else None
        return b"data: " + _encode(payload) + b"\n\n"

    def role(self) -> bytes:
        """Chat streams open with the assistant role (empty content); text streams have no such chunk."""
        assert self.chat, "only chat streams carry a role chunk"
        return self._line(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def token(self, text: str) -> bytes:
        return self._token_prefix + _encode(text) + self._token_suffix

    def finish(self, finish_reason: str) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return self._line([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        assert self.include_usage, "the usage chunk is sent only when stream_options.include_usage is set"
        return self._line([], usage_of(prompt_tokens, completion_tokens), with_usage=True)

    @staticmethod
    def error(message: str, error_type: str, code: str) -> bytes:
        """A failure after the stream began (OpenAI sends the error object as a data line)."""
        body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        return b"data: " + _encode(body) + b"\n\n"
