"""Chat templates: OpenAI-style messages -> one prompt string. A model's registry entry names its template
(`CHAT_TEMPLATES`); the gateway renders with it and adds its `stop` to the request's stop sequences.

`tollgate` (the default model's; one block per message, then an open assistant block to complete):

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

Each block is the role marker `<|role|>` on its own line followed by the content and a newline. Content
is a string or a list of {"type": "text", "text": ...} parts (joined without separator). Roles are
system, user, assistant and tool. Use `CHAT_STOP` as a stop sequence so a completion ends where the
model starts a new turn.

`chatml`: `<|im_start|>role\ncontent<|im_end|>\n` per message, then `<|im_start|>assistant\n`; its stop is
`<|im_end|>`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CHAT_STOP = "\n<|"


class InvalidChat(ValueError):
    """The messages do not fit the template; the message names the field."""


def role_marker(role: str) -> str:
    return f"<|{role}|>\n"


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The `tollgate` template."""
    return "".join(role_marker(role) + text + "\n" for role, text in _turns(messages)) + role_marker(
        "assistant"
    )


CHATML_STOP = "<|im_end|>"


def render_chatml(messages: Sequence[Mapping[str, Any]]) -> str:
    """The `chatml` template."""
    turns = "".join(f"<|im_start|>{role}\n{text}{CHATML_STOP}\n" for role, text in _turns(messages))
    return turns + "<|im_start|>assistant\n"


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """How messages become a prompt, and the stop sequence that ends the assistant's turn."""

    render: Callable[[Sequence[Mapping[str, Any]]], str]
    stop: str


CHAT_TEMPLATES = {
    "tollgate": ChatTemplate(render=render_chat, stop=CHAT_STOP),
    "chatml": ChatTemplate(render=render_chatml, stop=CHATML_STOP),
}


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, text) per message; InvalidChat naming the field that does not fit."""
    if not messages:
        raise InvalidChat("messages must hold at least one message")
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidChat(f"messages[{index}].role must be one of {list(ROLES)}, not {role!r}")
        turns.append((role, _content_text(message.get("content"), index)))
    return turns


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidChat(f"messages[{index}].content[{part_index}] must be a text part")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidChat(f"messages[{index}].content must be a string or a list of text parts")
