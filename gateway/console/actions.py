"""The console's changes, through the admin API's own commands (gateway.admin.commands), each audited in
the admin audit log like the API's (gateway.admin.audit_log: who, the action, its target, what changed,
the events published)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from gateway.admin import audit_log, commands, rules
from gateway.admin.audit_log import AdminAction, CapturingPublisher
from gateway.admin.errors import AdminError
from gateway.admin.models import GrantCreate, TenantCreate
from gateway.console import rules as console_rules
from gateway.console.auth import ConsoleSession
from gateway.console.runtime import ConsoleRuntime


class ActionRefused(Exception):
    """The command refused the input: `message` says why (shown on the page)."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message, self.status_code = message, status_code


def _refusal(error: AdminError | ValidationError) -> ActionRefused:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "form"
        return ActionRefused(f"{field}: {first.get('msg', 'invalid')}")
    detail = error.detail if isinstance(error.detail, dict) else {"message": str(error.detail)}
    return ActionRefused(str(detail.get("message")), error.status_code)


class Actions:
    """One request's commands: the app's sessions and event log, the signed-in principal for the audit."""

    def __init__(self, request: Request, runtime: ConsoleRuntime, signed_in: ConsoleSession) -> None:
        self.request, self.runtime, self.signed_in = request, runtime, signed_in
        self.sessions = request.app.state.session_factory
        self.publisher = CapturingPublisher(request.app.state.event_log)

    async def audit(self, action: str, target: str, details: dict[str, Any]) -> None:
        principal = self.signed_in.principal
        row = AdminAction(
            at=self.runtime.clock_ms(),
            credential=principal.name,
            role=principal.role,
            request_id=self.request.headers.get(audit_log.REQUEST_ID_HEADER) or uuid.uuid4().hex,
            action=f"console {action}",
            target=target,
            details=details,
            event_ids=list(self.publisher.event_ids),
        )
        await audit_log.append(self.sessions, row, audit_log.signer())

    async def create_tenant(self, name: str, tier: str) -> str:
        try:
            body = TenantCreate(name=name, tier=tier)
            async with self.sessions() as session, session.begin():
                tenant = await commands.create_tenant(
                    session, body, self.runtime.admin_settings.tenant_tiers, self.runtime.clock_ms()
                )
        except (AdminError, ValidationError) as error:
            raise _refusal(error) from None
        await self.audit("create tenant", f"tenant_id={tenant.tenant_id}", body.model_dump())
        return tenant.tenant_id

    async def grant(self, tenant_id: str, idempotency_key: str, fields: dict[str, Any]) -> str:
        try:
            body = GrantCreate(**fields)
            grant, _ = await commands.grant_credit(
                self.sessions,
                self.publisher,
                self.runtime.admin_settings,
                self.runtime.clock_ms,
                tenant_id,
                idempotency_key,
                body,
            )
        except (AdminError, ValidationError) as error:
            raise _refusal(error) from None
        await self.audit("grant credit", f"tenant_id={tenant_id}", body.model_dump())
        return grant.grant_id

    async def void(self, grant_id: str) -> str:
        try:
            grant = await commands.void_grant(
                self.sessions, self.publisher, self.runtime.admin_settings, self.runtime.clock_ms, grant_id
            )
        except AdminError as error:
            raise _refusal(error) from None
        await self.audit("void grant", f"grant_id={grant_id}", {})
        return grant.tenant_id

    async def create_key(self, tenant_id: str) -> tuple[str, str]:
        """(key id, the secret): shown once."""
        try:
            async with self.sessions() as session, session.begin():
                api_key, generated = await commands.issue_key(session, tenant_id, self.runtime.clock_ms())
        except AdminError as error:
            raise _refusal(error) from None
        await self.audit("create key", f"tenant_id={tenant_id}", {"key_id": api_key.key_id})
        return api_key.key_id, generated.presented

    async def revoke_key(self, key_id: str) -> str:
        try:
            api_key = await commands.revoke_and_announce(
                self.sessions, self.publisher, self.runtime.admin_settings, self.runtime.clock_ms, key_id
            )
        except AdminError as error:
            raise _refusal(error) from None
        await self.audit("revoke key", f"key_id={key_id}", {})
        return api_key.tenant_id

    async def set_rule(self, tenant_id: str, kind: str, form: dict[str, str]) -> str:
        """Set an alert rule (kind "alert") or an auto top-up rule ("top_up") through the admin API's PUT."""
        try:
            rule_id = console_rules.rule_id_of(form)
            if kind == "alert":
                body = rules.AlertRuleBody(**console_rules.numbers(form, console_rules.ALERT_FIELDS))
                put = rules.put_alert_rule
            else:
                body = rules.TopUpRuleBody(**console_rules.numbers(form, console_rules.TOP_UP_FIELDS))
                put = rules.put_top_up_rule
            settings, clock = self.runtime.admin_settings, self.runtime.clock_ms
            await put(tenant_id, rule_id, body, self.sessions, self.publisher, settings, clock)
        except (AdminError, ValidationError) as error:
            raise _refusal(error) from None
        await self.audit(f"set {kind} rule", f"rule_id={rule_id},tenant_id={tenant_id}", body.model_dump())
        return rule_id

    async def remove_rule(self, tenant_id: str, kind: str, rule_id: str) -> None:
        remove = rules.delete_alert_rule if kind == "alert" else rules.delete_top_up_rule
        try:
            settings, clock = self.runtime.admin_settings, self.runtime.clock_ms
            await remove(tenant_id, rule_id, self.sessions, self.publisher, settings, clock)
        except AdminError as error:
            raise _refusal(error) from None
        await self.audit(f"remove {kind} rule", f"rule_id={rule_id},tenant_id={tenant_id}", {})
