"""The chat template: OpenAI-style messages -> one prompt string for the default model.

Template (one block per message, then an open assistant block for the model to complete):

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

Each block is the role marker `<|role|>` on its own line followed by the content and a newline. Content
is a string or a list of {"type": "text", "text": ...} parts (joined without separator). Roles are
system, user, assistant and tool. Use `CHAT_STOP` as a stop sequence so a completion ends where the
model starts a new turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
CHAT_STOP = "\n<|"


class InvalidChat(ValueError):
    """The messages do not fit the template; the message names the field."""


def role_marker(role: str) -> str:
    return f"<|{role}|>\n"


def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    if not messages:
        raise InvalidChat("messages must hold at least one message")
    blocks = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise InvalidChat(f"messages[{index}].role must be one of {list(ROLES)}, not {role!r}")
        blocks.append(role_marker(role) + _content_text(message.get("content"), index) + "\n")
    return "".join(blocks) + role_marker("assistant")


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part_index, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidChat(f"messages[{index}].content[{part_index}] must be a text part")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidChat(f"messages[{index}].content must be a string or a list of text parts")
