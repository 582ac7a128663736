"""The prompt builder: instructions + conversation history + the new input -> one prompt in the model's
chat template, within the model's context.

    built = build_prompt(spec, instructions, history, new_input, max_output_tokens, truncation, chars_max)

The messages are `{"role", "content"}` dicts (inference.chat renders them; "developer" is sent as
"system"). The prompt's tokens are counted with the model's own tokenizer, the one its worker counts and
bills with, so what is billed is what is sent. The context must hold the prompt and the answer:
`prompt_tokens + (max_output_tokens or 1) <= context_tokens_max`, and the prompt at most `chars_max`
characters (what a worker accepts).

When it does not fit, `truncation` decides, as OpenAI's Responses API does:

    "disabled"  (the default) a 400 `context_length_exceeded`, naming `input`
    "auto"      the oldest history messages are dropped, one at a time from the start, until it fits
                (instructions and the new input are always kept); the fewest are dropped (a binary
                search over how many); if even no history does not fit, the same 400

Without `max_output_tokens` the answer may use what the context leaves, up to the model's max_tokens_max.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import invalid_param
from inference.chat import InvalidChat
from inference.registry import ModelSpec

Message = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    prompt: str
    prompt_tokens: int
    max_tokens: int  # the completion's bound: max_output_tokens, or what the context leaves
    history_dropped: int  # the oldest history messages left out to fit the context


def _messages(
    instructions: str | None, history: Sequence[Message], new_input: Sequence[Message]
) -> list[dict]:
    system = [{"role": "system", "content": instructions}] if instructions else []
    return system + [
        {
            "role": "system" if message["role"] == "developer" else message["role"],
            "content": message["content"],
        }
        for message in (*history, *new_input)
    ]


def build_prompt(
    spec: ModelSpec,
    instructions: str | None,
    history: Sequence[Message],
    new_input: Sequence[Message],
    max_output_tokens: int | None,
    truncation: Literal["auto", "disabled"],
    chars_max: int,
) -> BuiltPrompt:
    if max_output_tokens is not None and max_output_tokens > spec.max_tokens_max:
        raise invalid_param(
            "max_output_tokens", f"max_output_tokens is at most {spec.max_tokens_max} for {spec.name}"
        )
    reserved = max_output_tokens or 1
    tokenizer = spec.tokenizer()

    def attempt(dropped: int) -> tuple[str, int] | None:
        """The prompt with the `dropped` oldest history messages left out and its tokens; None: too big."""
        try:
            prompt = spec.template.render(_messages(instructions, history[dropped:], new_input))
        except InvalidChat as error:
            raise invalid_param("input", str(error)) from None
        if len(prompt) > chars_max:
            return None
        tokens = len(tokenizer.encode(prompt))
        return (prompt, tokens) if tokens + reserved <= spec.context_tokens_max else None

    fitted = attempt(0)
    dropped = 0
    # When it fits without any history, the fewest oldest messages to drop (a binary search).
    if fitted is None and truncation == "auto" and history and attempt(len(history)) is not None:
        low, high = 1, len(history)  # attempt(high) fits, attempt(low - 1) does not
        while low < high:
            middle = (low + high) // 2
            if attempt(middle) is None:
                low = middle + 1
            else:
                high = middle
        dropped = high
        fitted = attempt(dropped)
    if fitted is None:
        raise invalid_param(
            "input",
            f"the input (instructions, history and new input) exceeds {spec.name}'s context of "
            f"{spec.context_tokens_max} tokens with {reserved} left for the output"
            + (" (truncation is disabled)" if truncation == "disabled" else ""),
            code="context_length_exceeded",
        )
    prompt, prompt_tokens = fitted
    room = spec.context_tokens_max - prompt_tokens
    max_tokens = max_output_tokens if max_output_tokens is not None else min(room, spec.max_tokens_max)
    assert 1 <= max_tokens <= room, "the prompt and the answer fit the context"
    return BuiltPrompt(prompt, prompt_tokens, max_tokens, dropped)
