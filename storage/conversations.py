"""The Responses and Conversations APIs' stored text (gateway.conversations), migration 0008.

    conversations       a tenant's conversation: its metadata and when it was last written
    conversation_items  its items (messages) in order (`position`, an identity: the order they were added)
    stored_responses    a response created with `store: true`: its body as answered, the history it was
                        given and its own input, so `previous_response_id` continues from it in one read
    tenant_policies     a tenant's retention and safety policy
    model_routes        the model router's control plane: an alias's stable and canary versions (0009)
    prompt_versions     named system prompts, by version (0009)
    model_evals         each version's score on the evaluation set, the promotion gate's evidence (0009)
    rollout_outcomes    each routed request's outcome during a rollout, from every gateway (0018)

Every row carries its `tenant_id` and every read filters on it: one tenant never reads another's. This
is the only place conversation text is kept; the ledger's events hold token counts and ids only. The
retention sweep (gateway.conversations.RetentionSweep) deletes these rows for real once a tenant's
retention has passed since `updated_at_ms` (conversations) or `created_at_ms` (responses).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Double, ForeignKey, Identity, Index, Text
from sqlalchemy.orm import Mapped, mapped_column

from storage.base import Base


class Conversation(Base):
    __tablename__ = "conversations"

    conversation_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True
    )
    metadata_json: Mapped[str] = mapped_column(Text)  # the client's metadata object, JSON
    created_at_ms: Mapped[int] = mapped_column(BigInteger)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)  # the last item added: retention counts from here


class ConversationItem(Base):
    __tablename__ = "conversation_items"

    item_id: Mapped[str] = mapped_column(Text, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        Text, ForeignKey("conversations.conversation_id", ondelete="CASCADE")
    )
    tenant_id: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    item_json: Mapped[str] = mapped_column(Text)  # the item as the API shows it (a message), JSON
    created_at_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_conversation_items_conversation_id_position", "conversation_id", "position"),)


class StoredResponse(Base):
    __tablename__ = "stored_responses"

    response_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), index=True
    )
    conversation_id: Mapped[str | None] = mapped_column(
        Text, ForeignKey("conversations.conversation_id", ondelete="SET NULL")
    )
    history_json: Mapped[str] = mapped_column(Text)  # the messages before this response's input, JSON
    input_json: Mapped[str] = mapped_column(Text)  # this response's input messages, JSON
    response_json: Mapped[str] = mapped_column(Text)  # the response object as answered, JSON
    created_at_ms: Mapped[int] = mapped_column(BigInteger, index=True)


class TenantPolicy(Base):
    """A tenant's retention and safety policy (the admin API's PUT /tenants/{id}/policy); no row: keep
    forever, no safety checks."""

    __tablename__ = "tenant_policies"

    tenant_id: Mapped[str] = mapped_column(
        Text, ForeignKey("tenants.tenant_id", ondelete="CASCADE"), primary_key=True
    )
    retention_days: Mapped[int | None] = mapped_column(BigInteger)  # None: stored text is kept until deleted
    safety_policy_json: Mapped[str] = mapped_column(Text)  # gateway.safety.SafetyPolicy, JSON
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class ModelRoute(Base):
    """The control plane's route of a model alias (gateway.router): the stable version (a model registry
    entry) and a canary version taking `canary_percent` of the alias's traffic, sticky per conversation.
    `state`: stable (no canary), canary (a rollout), rolled_back (the canary was withdrawn: `reason`
    says why, by hand or by the automatic rollback)."""

    __tablename__ = "model_routes"

    alias: Mapped[str] = mapped_column(Text, primary_key=True)
    stable_model: Mapped[str] = mapped_column(Text)
    canary_model: Mapped[str | None] = mapped_column(Text)
    canary_percent: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at_ms: Mapped[int] = mapped_column(BigInteger)


class PromptVersion(Base):
    """A named system prompt's version (the control plane's prompt versions, migration 0009): immutable
    once written; a response names the version that built it."""

    __tablename__ = "prompt_versions"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[str] = mapped_column(Text, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    created_at_ms: Mapped[int] = mapped_column(BigInteger)


class ModelEval(Base):
    """A version's latest score on an evaluation set (gateway.eval_gate), kept with the version: the
    promotion gate's evidence (migration 0009)."""

    __tablename__ = "model_evals"

    model: Mapped[str] = mapped_column(Text, primary_key=True)
    eval_set_sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    cases: Mapped[int] = mapped_column(BigInteger)
    passed: Mapped[int] = mapped_column(BigInteger)
    evaluated_at_ms: Mapped[int] = mapped_column(BigInteger)


class RolloutOutcome(Base):
    """One routed request's outcome while its alias has a canary (gateway.router): every gateway writes
    its own, and each judges the canary over all of them in the window (migration 0018)."""

    __tablename__ = "rollout_outcomes"

    outcome_id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    alias: Mapped[str] = mapped_column(Text)
    at_ms: Mapped[int] = mapped_column(BigInteger)  # wall clock: gateways compare their outcomes by it
    role: Mapped[str] = mapped_column(Text)  # stable | canary
    failed: Mapped[bool] = mapped_column(Boolean)
    ttft_ms: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (Index(None, "alias", "at_ms"),)
