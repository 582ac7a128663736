"""A tenant's own credit, read with its API key: `GET /v1/dashboard/billing/credit_grants`, in the shape
of OpenAI's legacy endpoint (README "Three balances"):

    {"object": "credit_summary", "total_granted": 1000.0, "total_used": 250.0, "total_available": 750.0,
     "grants": {"object": "list", "data": [{"object": "credit_grant", "id": "g1", "grant_amount": 1000.0,
                "used_amount": 250.0, "effective_at": 1767225600.0, "expires_at": null}]}}

Amounts are credits (the ledger's integer units, as floats because that endpoint's clients expect
numbers with a fraction), times epoch seconds. The tenant is the key's owner: there is no parameter
naming a tenant, so a key reads its own tenant's grants and nobody else's.

From the same fold of the tenant's archived events as the admin balance (gateway.admin.queries):
    grants           every grant not voided before it took effect, pending ones included, by effective_at
    used_amount      the grant's credit consumed by usage so far
    total_granted    the sum of grant_amount of the grants in effect now or before (pending ones excluded)
    total_used       the sum of used_amount
    total_available  the settled balance now (the unused credit of the grants in effect)
"""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.admin.queries import balance_at
from gateway.admin.settings import AdminSettings
from gateway.deps import AuthenticatedTenant
from gateway.ledger_view import wall_clock_ms
from gateway.wire import encode_json
from ledger.tenant import TenantLedger

router = APIRouter(prefix="/v1/dashboard/billing", tags=["billing"])


@cache
def _events_max() -> int:
    """The fold's bound: the admin balance's setting (TOLLGATE_ADMIN_BALANCE_EVENTS_MAX), read once."""
    return AdminSettings().balance_events_max


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


def credit_summary(ledger: TenantLedger, now_ms: int) -> dict:
    """The OpenAI credit_summary of the folded ledger at now_ms."""
    blocks = sorted(
        (block for block in ledger.account.blocks.values() if block.end > block.effective_at),
        key=lambda block: (block.effective_at, block.grant_id),
    )
    grants = [
        {
            "object": "credit_grant",
            "id": block.grant_id,
            "grant_amount": float(block.amount),
            "used_amount": float(block.consumed),
            "effective_at": _seconds(block.effective_at),
            "expires_at": _seconds(block.expires_at),
        }
        for block in blocks
    ]
    total_granted = sum(block.amount for block in blocks if block.effective_at <= now_ms)
    total_used = sum(block.consumed for block in blocks)
    return {
        "object": "credit_summary",
        "total_granted": float(total_granted),
        "total_used": float(total_used),
        "total_available": float(ledger.balance_at(now_ms)),
        "grants": {"object": "list", "data": grants},
    }


@router.get("/credit_grants", response_model=None)
async def credit_grants(request: Request, tenant: AuthenticatedTenant) -> Response:
    """The calling key's tenant's credit grants and totals (credits; times in epoch seconds)."""
    sessions = request.app.state.session_factory
    async with sessions() as session, session.begin():
        summary = await balance_at(
            session, tenant.tenant_id, wall_clock_ms(), _events_max(), render=credit_summary
        )
    return Response(encode_json(summary), media_type="application/json")
