"""Credits scoped to models (ledger.scoped): the event's validation, worked examples of the drawing order,
late events, and snapshots (a tenant without scopes carries none; states written before scopes decode)."""

from __future__ import annotations

import msgspec
import pytest

from ledger.codec import decode_input_event
from ledger.entries import GrantRecorded, UsageAllocated
from ledger.events import GRANT_MODELS_MAX, CreditGranted, GrantVoided, InvalidEvent, UsageRecorded
from ledger.snapshot import AccountState, account_from_bytes, account_to_bytes
from ledger.tenant import TenantLedger

TENANT = "acme"


def grant(grant_id, amount, models=(), effective_at=0, expires_at=None, priority=0):
    return CreditGranted(
        event_id=f"ev-{grant_id}",
        tenant_id=TENANT,
        grant_id=grant_id,
        amount=amount,
        effective_at=effective_at,
        expires_at=expires_at,
        priority=priority,
        models=models,
    )


def usage(event_id, amount, model, occurred_at=10):
    return UsageRecorded(
        event_id=event_id, tenant_id=TENANT, amount=amount, occurred_at=occurred_at, model=model
    )


def allocations(entries) -> dict[str, int]:
    (allocated,) = [e for e in entries if isinstance(e, UsageAllocated)]
    return {a.grant_id: a.amount for a in allocated.allocations} | {"overage": allocated.overage}


def test_a_grant_names_each_model_once_and_at_most_the_limit():
    with pytest.raises(InvalidEvent, match="models"):
        grant("g", 1, ("a", "a"))
    with pytest.raises(InvalidEvent, match="models"):
        grant("g", 1, tuple(f"m{n}" for n in range(GRANT_MODELS_MAX + 1)))
    body = msgspec.json.encode(grant("g", 1, ("a", "b")))
    assert decode_input_event(body).models == ("a", "b")
    old = msgspec.json.decode(msgspec.json.encode(grant("g", 1)))
    del old["models"]  # a record written before scopes
    assert decode_input_event(msgspec.json.encode(old)).models == ()


def test_usage_draws_its_models_scoped_grants_first_smallest_scope_first_then_unscoped():
    ledger = TenantLedger(TENANT)
    ledger.apply(grant("any", 100, priority=-5))  # drawn first among unscoped, but after every scope
    ledger.apply(grant("pair", 10, ("gpt-x", "gpt-y")))
    recorded = ledger.apply(grant("x", 10, ("gpt-x",), priority=3))
    assert [e.models for e in recorded if isinstance(e, GrantRecorded)] == [("gpt-x",)]

    assert allocations(ledger.apply(usage("u1", 15, "gpt-x"))) == {"x": 10, "pair": 5, "overage": 0}
    assert allocations(ledger.apply(usage("u2", 8, "gpt-y"))) == {"pair": 5, "any": 3, "overage": 0}
    assert allocations(ledger.apply(usage("u3", 4, "other"))) == {"any": 4, "overage": 0}
    assert ledger.balance_at(10) == 93
    ledger.account.check_invariants(ledger.index)


def test_a_late_scoped_grant_takes_its_models_usage_from_the_unscoped_grant():
    ledger = TenantLedger(TENANT)
    ledger.apply(grant("first", 1, ("gpt-x",), effective_at=0, expires_at=1))  # the scope history starts
    ledger.apply(grant("any", 100))
    ledger.apply(usage("u1", 30, "gpt-x", occurred_at=50))
    ledger.apply(usage("u2", 20, "other", occurred_at=60))
    assert ledger.blocks_at(70)[0].remaining == 50
    late = ledger.apply(grant("x", 40, ("gpt-x",), effective_at=40))  # backdated over u1
    assert {b.grant_id: b.remaining for b in ledger.blocks_at(70)} == {"x": 10, "any": 80}
    corrected = [e for e in late if type(e).__name__ == "AllocationCorrected"]
    assert [{a.grant_id: a.amount for a in c.allocations} for c in corrected] == [{"any": -30, "x": 30}]
    voided = ledger.apply(GrantVoided(event_id="void-x", tenant_id=TENANT, grant_id="x", voided_at=55))
    assert {b.grant_id: b.remaining for b in ledger.blocks_at(70)} == {"any": 80}
    assert [type(e).__name__ for e in voided] == []  # consumption unchanged: u1 at 50 is before the void
    ledger.account.check_invariants(ledger.index)


def test_a_late_first_scoped_grant_takes_usage_folded_before_any_scope_existed():
    """The tenant's first scoped grant arrives after usage it is backdated over (the account had no scoped
    state then): that usage is attributed to its models from the usage index, as in time order."""
    events = [
        grant("any", 100),
        usage("u1", 30, "gpt-x", occurred_at=50),
        usage("u2", 20, "other", occurred_at=60),
        usage("u3", 5, "gpt-x", occurred_at=30),  # before the scoped grant takes effect
        grant("x", 40, ("gpt-x",), effective_at=40),
    ]
    late = TenantLedger(TENANT)
    for event in events[:-1]:
        late.apply(event)
    late.account = account_from_bytes(account_to_bytes(late.account))  # no scoped state in it yet
    assert not late.account.has_scopes
    corrected = [e for e in late.apply(events[-1]) if type(e).__name__ == "AllocationCorrected"]
    assert [{a.grant_id: a.amount for a in c.allocations} for c in corrected] == [{"any": -30, "x": 30}]
    in_order = TenantLedger(TENANT)
    for event in [events[0], events[-1], *events[1:-1]]:
        in_order.apply(event)
    for ledger in (late, in_order):
        assert {b.grant_id: b.remaining for b in ledger.blocks_at(70)} == {"x": 10, "any": 75}
        assert {b.grant_id: b.remaining for b in ledger.blocks_at(55)} == {"x": 10, "any": 95}
        ledger.account.check_invariants(ledger.index)
    for t in range(0, 80, 5):
        assert late.totals_at(t) == in_order.totals_at(t), t


def test_a_split_segment_keeps_each_models_usage_on_its_side():
    """A late bound inside a segment whose usage of a model lies on both sides: each side keeps its own."""
    ledger = TenantLedger(TENANT)
    ledger.apply(grant("first", 1, ("gpt-x",), effective_at=0, expires_at=1))
    ledger.apply(grant("any", 100))
    for number, (at, model) in enumerate([(20, "gpt-x"), (30, "other"), (60, "gpt-x"), (70, "other")]):
        ledger.apply(usage(f"u{number}", 10, model, occurred_at=at))
    ledger.apply(grant("x", 5, ("gpt-x",), effective_at=50))  # splits [1, inf) at 50
    assert {b.grant_id: b.remaining for b in ledger.blocks_at(55)} == {"x": 5, "any": 80}
    assert {b.grant_id: b.remaining for b in ledger.blocks_at(80)} == {"x": 0, "any": 65}
    ledger.account = account_from_bytes(account_to_bytes(ledger.account))
    assert ledger.balance_at(65) == 75  # any: 100 - 10 (u0) - 10 (u1) - 5 (u2 after x ran out)
    ledger.account.check_invariants(ledger.index)


def test_a_tenant_without_scoped_grants_has_no_scopes_in_its_state_and_old_states_decode():
    ledger = TenantLedger(TENANT)
    ledger.apply(grant("any", 100))
    ledger.apply(usage("u1", 30, "gpt-x"))
    state = ledger.account.to_state()
    assert state.scopes is None and not ledger.account.has_scopes
    # A snapshot written before scopes existed: no `scopes`, block states without `models`.
    old = msgspec.to_builtins(state)
    del old["scopes"]
    old["blocks"] = [block[:-1] for block in old["blocks"]]
    restored = account_from_bytes(msgspec.msgpack.encode(msgspec.convert(old, AccountState)))
    assert restored.balance_at(10, ledger.index) == 70 and not restored.has_scopes
    legacy = msgspec.msgpack.encode(old)
    assert account_from_bytes(legacy).blocks["any"].models == ()
