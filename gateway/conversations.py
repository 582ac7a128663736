"""The conversation service's storage: a tenant's conversations and their items, stored responses, its
retention and safety policy, and the retention sweep (tables in storage.conversations).

Every call takes the tenant id and every statement filters on it: a conversation, item or response of
another tenant is simply not found (404), never read, changed or deleted.

Items are messages in the Responses API's shape:

    {"id": "msg_...", "type": "message", "role": "user" | "assistant" | "system" | "developer",
     "status": "completed", "content": [{"type": "input_text" | "output_text", "text": "..."}]}

Retention: a tenant whose policy has `retention_days` set keeps a conversation until that long after its
last write and a stored response that long after it was created; `RetentionSweep` deletes what has
expired, for real (`DELETE`; items go with their conversation), in bounded batches. Usage events name
request ids and token counts only, so nothing in the ledger holds the text that is deleted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import ApiError
from gateway.safety import NO_POLICY, SafetyPolicy
from gateway.ttl_cache import TtlCache
from storage.conversations import Conversation, ConversationItem, StoredResponse, TenantPolicy

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
ITEMS_PAGE_MAX = 100  # OpenAI's bound on a page of conversation items
CONVERSATION_ITEMS_MAX = 10_000  # items one conversation's history read returns at most
POLICY_CACHE_ENTRIES_MAX = 100_000  # tenants whose policy the gateway keeps cached

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def not_found(kind: str, identifier: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"{kind} with id '{identifier}' not found.", param=param, code="not_found")


@dataclass(frozen=True, slots=True)
class TenantPolicyView:
    retention_days: int | None
    safety: SafetyPolicy


NO_TENANT_POLICY = TenantPolicyView(None, NO_POLICY)


@dataclass(frozen=True, slots=True)
class StoredResponseRecord:
    response: dict  # the response object as answered
    history: list[dict]  # the items before its input
    input_items: list[dict]


def conversation_object(row) -> dict:
    return {
        "id": row.conversation_id,
        "object": "conversation",
        "created_at": row.created_at_ms // 1000,
        "metadata": _decode(row.metadata_json),
    }


class ConversationStore:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession], policy_cache_ttl_ms: int) -> None:
        self._sessions = session_factory
        self._policies = TtlCache(self._read_policy, policy_cache_ttl_ms, POLICY_CACHE_ENTRIES_MAX)

    # ---- policy ---------------------------------------------------------------------------------------

    async def policy(self, tenant_id: str) -> TenantPolicyView:
        """The tenant's policy, cached for `policy_cache_ttl_ms` (a change applies within that and one query;
        gateway.ttl_cache)."""
        return await self._policies.get(tenant_id)

    async def _read_policy(self, tenant_id: str) -> TenantPolicyView:
        async with self._sessions() as session:
            row = await session.get(TenantPolicy, tenant_id)
        if row is None:
            return NO_TENANT_POLICY
        return TenantPolicyView(row.retention_days, SafetyPolicy.model_validate_json(row.safety_policy_json))

    # ---- conversations --------------------------------------------------------------------------------

    async def create_conversation(
        self, tenant_id: str, metadata: dict, items: list[dict], now_ms: int
    ) -> dict:
        conversation_id = new_id("conv")
        async with self._sessions() as session, session.begin():
            session.add(
                Conversation(
                    conversation_id=conversation_id,
                    tenant_id=tenant_id,
                    metadata_json=_encode(metadata).decode(),
                    created_at_ms=now_ms,
                    updated_at_ms=now_ms,
                )
            )
            await session.flush()
            await self._insert_items(session, tenant_id, conversation_id, items, now_ms)
            row = await session.get(Conversation, conversation_id)
            return conversation_object(row)

    async def _owned(self, session: AsyncSession, tenant_id: str, conversation_id: str, lock: bool = False):
        query = select(Conversation).where(
            Conversation.conversation_id == conversation_id, Conversation.tenant_id == tenant_id
        )
        row = await session.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise not_found("Conversation", conversation_id, "conversation_id")
        return row

    async def get_conversation(self, tenant_id: str, conversation_id: str) -> dict:
        async with self._sessions() as session:
            return conversation_object(await self._owned(session, tenant_id, conversation_id))

    async def update_conversation(self, tenant_id: str, conversation_id: str, metadata: dict) -> dict:
        async with self._sessions() as session, session.begin():
            row = await self._owned(session, tenant_id, conversation_id, lock=True)
            row.metadata_json = _encode(metadata).decode()
            return conversation_object(row)

    async def delete_conversation(self, tenant_id: str, conversation_id: str) -> dict:
        async with self._sessions() as session, session.begin():
            deleted = await session.scalar(
                delete(Conversation)
                .where(Conversation.conversation_id == conversation_id, Conversation.tenant_id == tenant_id)
                .returning(Conversation.conversation_id)
            )
        if deleted is None:
            raise not_found("Conversation", conversation_id, "conversation_id")
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    # ---- items ----------------------------------------------------------------------------------------

    @staticmethod
    async def _insert_items(
        session: AsyncSession, tenant_id: str, conversation_id: str, items: list[dict], now_ms: int
    ) -> None:
        if not items:
            return
        await session.execute(
            insert(ConversationItem),
            [
                {
                    "item_id": item["id"],
                    "conversation_id": conversation_id,
                    "tenant_id": tenant_id,
                    "item_json": _encode(item).decode(),
                    "created_at_ms": now_ms,
                }
                for item in items
            ],
        )

    async def add_items(
        self, tenant_id: str, conversation_id: str, items: list[dict], now_ms: int
    ) -> list[dict]:
        async with self._sessions() as session, session.begin():
            await self._owned(session, tenant_id, conversation_id, lock=True)  # items keep their order
            await self._insert_items(session, tenant_id, conversation_id, items, now_ms)
            await session.execute(
                update(Conversation)
                .where(Conversation.conversation_id == conversation_id)
                .values(updated_at_ms=now_ms)
            )
        return items

    async def list_items(
        self, tenant_id: str, conversation_id: str, limit: int, after: str | None, ascending: bool
    ) -> tuple[list[dict], bool]:
        """A page of items (`limit` + whether more follow), after the item `after` when given."""
        assert 1 <= limit <= CONVERSATION_ITEMS_MAX, "a page is bounded"
        async with self._sessions() as session:
            await self._owned(session, tenant_id, conversation_id)
            query = select(ConversationItem.item_json).where(
                ConversationItem.conversation_id == conversation_id, ConversationItem.tenant_id == tenant_id
            )
            if after is not None:
                position = await session.scalar(
                    select(ConversationItem.position).where(
                        ConversationItem.item_id == after, ConversationItem.conversation_id == conversation_id
                    )
                )
                if position is None:
                    raise not_found("Item", after, "after")
                query = query.where(
                    ConversationItem.position > position
                    if ascending
                    else ConversationItem.position < position
                )
            order = ConversationItem.position.asc() if ascending else ConversationItem.position.desc()
            rows = (await session.scalars(query.order_by(order).limit(limit + 1))).all()
        return [_decode(row) for row in rows[:limit]], len(rows) > limit

    async def history(self, tenant_id: str, conversation_id: str) -> list[dict]:
        items, _more = await self.list_items(tenant_id, conversation_id, CONVERSATION_ITEMS_MAX, None, True)
        return items

    async def get_item(self, tenant_id: str, conversation_id: str, item_id: str) -> dict:
        async with self._sessions() as session:
            await self._owned(session, tenant_id, conversation_id)
            found = await session.scalar(
                select(ConversationItem.item_json).where(
                    ConversationItem.item_id == item_id,
                    ConversationItem.conversation_id == conversation_id,
                    ConversationItem.tenant_id == tenant_id,
                )
            )
        if found is None:
            raise not_found("Item", item_id, "item_id")
        return _decode(found)

    async def delete_item(self, tenant_id: str, conversation_id: str, item_id: str) -> dict:
        async with self._sessions() as session, session.begin():
            row = await self._owned(session, tenant_id, conversation_id, lock=True)
            deleted = await session.scalar(
                delete(ConversationItem)
                .where(
                    ConversationItem.item_id == item_id,
                    ConversationItem.conversation_id == conversation_id,
                    ConversationItem.tenant_id == tenant_id,
                )
                .returning(ConversationItem.item_id)
            )
            if deleted is None:
                raise not_found("Item", item_id, "item_id")
            return conversation_object(row)

    # ---- stored responses -----------------------------------------------------------------------------

    async def save_response(
        self,
        tenant_id: str,
        response: dict,
        history: list[dict],
        input_items: list[dict],
        conversation_id: str | None,
        now_ms: int,
        keep_response: bool = True,
    ) -> None:
        """Append a response's input and output to its conversation, if any, and keep the response itself
        when `keep_response` (store: true), in one transaction."""
        async with self._sessions() as session, session.begin():
            if conversation_id is not None:
                await self._owned(session, tenant_id, conversation_id, lock=True)
                await self._insert_items(session, tenant_id, conversation_id, input_items, now_ms)
                await self._insert_items(session, tenant_id, conversation_id, response["output"], now_ms)
                await session.execute(
                    update(Conversation)
                    .where(Conversation.conversation_id == conversation_id)
                    .values(updated_at_ms=now_ms)
                )
            if not keep_response:
                return
            session.add(
                StoredResponse(
                    response_id=response["id"],
                    tenant_id=tenant_id,
                    conversation_id=conversation_id,
                    history_json=_encode(history).decode(),
                    input_json=_encode(input_items).decode(),
                    response_json=_encode(response).decode(),
                    created_at_ms=now_ms,
                )
            )

    async def get_response(
        self, tenant_id: str, response_id: str, param: str | None = None
    ) -> StoredResponseRecord:
        async with self._sessions() as session:
            row = await session.scalar(
                select(StoredResponse).where(
                    StoredResponse.response_id == response_id, StoredResponse.tenant_id == tenant_id
                )
            )
        if row is None:
            raise not_found("Response", response_id, param)
        return StoredResponseRecord(
            _decode(row.response_json), _decode(row.history_json), _decode(row.input_json)
        )

    async def delete_response(self, tenant_id: str, response_id: str) -> dict:
        async with self._sessions() as session, session.begin():
            deleted = await session.scalar(
                delete(StoredResponse)
                .where(StoredResponse.response_id == response_id, StoredResponse.tenant_id == tenant_id)
                .returning(StoredResponse.response_id)
            )
        if deleted is None:
            raise not_found("Response", response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    # ---- retention ------------------------------------------------------------------------------------

    async def sweep(self, now_ms: int, batch_max: int) -> tuple[int, int]:
        """Delete up to `batch_max` expired conversations and as many expired responses; how many of each."""
        async with self._sessions() as session, session.begin():
            expired_conversations = (
                select(Conversation.conversation_id)
                .join(TenantPolicy, TenantPolicy.tenant_id == Conversation.tenant_id)
                .where(
                    TenantPolicy.retention_days.is_not(None),
                    Conversation.updated_at_ms < now_ms - TenantPolicy.retention_days * DAY_MS,
                )
                .limit(batch_max)
                .scalar_subquery()
            )
            conversations = (
                await session.scalars(
                    delete(Conversation)
                    .where(Conversation.conversation_id.in_(expired_conversations))
                    .returning(Conversation.conversation_id)
                )
            ).all()
            expired_responses = (
                select(StoredResponse.response_id)
                .join(TenantPolicy, TenantPolicy.tenant_id == StoredResponse.tenant_id)
                .where(
                    TenantPolicy.retention_days.is_not(None),
                    StoredResponse.created_at_ms < now_ms - TenantPolicy.retention_days * DAY_MS,
                )
                .limit(batch_max)
                .scalar_subquery()
            )
            responses = (
                await session.scalars(
                    delete(StoredResponse)
                    .where(StoredResponse.response_id.in_(expired_responses))
                    .returning(StoredResponse.response_id)
                )
            ).all()
        return len(conversations), len(responses)


class RetentionSweep:
    """Runs `ConversationStore.sweep` every `interval_ms` (a batch at a time until nothing is left)."""

    def __init__(
        self,
        store: ConversationStore,
        interval_ms: int,
        batch_max: int,
        on_swept: Callable[[int, int], None],
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.store = store
        self.interval_ms = interval_ms
        self.batch_max = batch_max
        self.on_swept = on_swept
        self.wall_clock_ms = wall_clock_ms
        self._task: asyncio.Task | None = None

    async def run_once(self) -> tuple[int, int]:
        """Sweep until a batch comes back short; the totals deleted."""
        total_conversations = total_responses = 0
        while True:
            conversations, responses = await self.store.sweep(self.wall_clock_ms(), self.batch_max)
            total_conversations += conversations
            total_responses += responses
            self.on_swept(conversations, responses)
            if conversations < self.batch_max and responses < self.batch_max:
                break
        if total_conversations or total_responses:
            logger.info(
                "retention sweep deleted %d conversations and %d responses",
                total_conversations,
                total_responses,
            )
        return total_conversations, total_responses

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                logger.exception("the retention sweep failed; retrying after its interval")
            await asyncio.sleep(self.interval_ms / 1000)

    def start(self) -> None:
        assert self._task is None, "started once"
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
