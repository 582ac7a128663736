"""Prompt versions: named system prompts, each version immutable once written (table `prompt_versions`).

A Responses request names one as OpenAI's API does, `"prompt": {"id": "support", "version": "3",
"variables": {"product": "Tollgate"}}` (no version: the newest written); its text, with each `{{name}}`
replaced by its variable, becomes the instructions (before the request's own `instructions`), and the
response records the prompt id and the version that built it. The admin API writes versions
(`PUT /admin/v1/prompts/{name}/versions/{version}`); rewriting one with other text is refused (409), so
a version names one text for ever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import ApiError, invalid_param
from storage.conversations import PromptVersion

VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
VARIABLES_MAX = 64  # variables one request may pass


@dataclass(frozen=True, slots=True)
class Prompt:
    name: str
    version: str
    text: str


def render_prompt(text: str, variables: dict[str, str]) -> str:
    """`text` with each {{name}} replaced; a 400 naming a variable the text uses and the request lacks."""
    if len(variables) > VARIABLES_MAX:
        raise invalid_param("prompt.variables", f"at most {VARIABLES_MAX} variables")

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise invalid_param(
                "prompt.variables", f"the prompt uses the variable {name!r}, which is not given"
            )
        return variables[name]

    return VARIABLE.sub(value, text)


class PromptStore:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = session_factory

    async def get(self, name: str, version: str | None) -> Prompt:
        """The version asked for, or the newest; a 404 naming the prompt when there is none."""
        query = select(PromptVersion).where(PromptVersion.name == name)
        if version is not None:
            query = query.where(PromptVersion.version == version)
        query = query.order_by(PromptVersion.created_at_ms.desc(), PromptVersion.version.desc()).limit(1)
        async with self._sessions() as session:
            row = await session.scalar(query)
        if row is None:
            shown = name if version is None else f"{name} version {version}"
            raise ApiError(404, f"Prompt {shown!r} not found.", param="prompt", code="not_found")
        return Prompt(row.name, row.version, row.text)

    async def put(self, name: str, version: str, text: str, now_ms: int) -> Prompt:
        """Write a version; the same text again is a no-op, other text a 409."""
        async with self._sessions() as session, session.begin():
            await session.execute(
                insert(PromptVersion)
                .values(name=name, version=version, text=text, created_at_ms=now_ms)
                .on_conflict_do_nothing(index_elements=[PromptVersion.name, PromptVersion.version])
            )
            stored = await session.get(PromptVersion, (name, version))
        assert stored is not None, "a prompt version was just written or was there"
        if stored.text != text:
            raise ApiError(
                409, f"prompt {name!r} version {version!r} exists with other text", code="conflict"
            )
        return Prompt(name, version, text)
