"""Admission against the credit the request's model can use (credits scoped to models, ledger.scoped): the
processor's balance record carries the scoped credit, and fast admission spends, for a request of model M,
the unscoped credit plus the credit scoped to M, never the credit scoped to other models."""

from __future__ import annotations

import contextlib
import dataclasses

import msgspec
import psycopg
import pytest

from gateway.admission.base import CreditExhausted
from gateway.admission.fast import FastAdmission
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict import StrictAdmission
from gateway.ledger_view import PublishedBalance
from ledger.codec import encode_event
from ledger.events import CreditGranted, UsageRecorded
from storage.database import build_async_engine
from streams.processor import LedgerProcessor
from streams.records import BalanceRecord, LogRecord
from streams.replay import DictState
from tests.gateway.admission.helpers import (
    START_MS,
    TOPICS,
    ManualClock,
    admission_request,
    mark_caught_up,
    new_view,
    partition_of,
)

TENANT = "acme"


def folded_balance(events) -> BalanceRecord:
    """The balance record the stream processor publishes after folding `events`."""
    processor = LedgerProcessor(DictState(), source_topic=TOPICS.events)
    records = [
        LogRecord(TOPICS.events, 0, n, TENANT.encode(), encode_event(event), START_MS + n)
        for n, event in enumerate(events)
    ]
    output = processor.process(0, records)
    return msgspec.json.decode(output.balances[-1].value, type=BalanceRecord)


def grant(grant_id: str, amount: int, models: tuple[str, ...] = (), expires_at: int | None = None):
    return CreditGranted(
        event_id=f"ev-{grant_id}",
        tenant_id=TENANT,
        grant_id=grant_id,
        amount=amount,
        effective_at=START_MS - 1_000,
        expires_at=expires_at,
        models=models,
    )


def admission_over(record: BalanceRecord) -> tuple[FastAdmission, ManualClock]:
    clock = ManualClock()
    view = new_view()
    value = msgspec.json.encode(record)
    view.apply_balance_records(
        [LogRecord(TOPICS.balances, partition_of(TENANT), 0, TENANT.encode(), value, START_MS)]
    )
    mark_caught_up(view, clock.now_ms)
    return FastAdmission(view, AdmissionSettings(view_ready_wait_ms=0), clock_ms=clock), clock


def request(request_id: str, model: str, cost: int):
    return dataclasses.replace(admission_request(request_id, cost=cost), model=model)


def test_the_balance_record_carries_the_credit_scoped_to_models():
    usage = UsageRecorded(event_id="u1", tenant_id=TENANT, amount=30, occurred_at=START_MS, model="gpt-x")
    record = folded_balance(
        [grant("scoped", 100, ("gpt-x",), expires_at=START_MS + 5_000), grant("any", 50), usage]
    )
    assert record.balance == 120  # the gpt-x usage drew its scoped grant, not the unscoped one
    assert record.scoped == ((("gpt-x",), START_MS + 5_000, 70),)
    unscoped = folded_balance([grant("any", 50)])
    assert unscoped.scoped == ()


async def test_a_tenant_with_only_credit_scoped_to_gpt_x_is_admitted_for_gpt_x_only():
    record = folded_balance([grant("scoped", 1_000, ("gpt-x",))])
    admission, _ = admission_over(record)

    reservation = await admission.admit(request("r1", "gpt-x", 600))
    assert reservation.amount == 600
    try:
        await admission.admit(request("r2", "other-model", 1))
    except CreditExhausted as refused:
        assert refused.status_code == 429 and "0 are available" in refused.message
    else:
        raise AssertionError("a request of another model spent credit scoped to gpt-x")


async def test_unscoped_credit_is_spendable_by_every_model_and_scoped_by_its_models():
    record = folded_balance([grant("scoped", 1_000, ("gpt-x", "gpt-y")), grant("any", 100)])
    admission, _ = admission_over(record)

    assert admission.available(TENANT, START_MS, "gpt-y") == 1_100
    assert admission.available(TENANT, START_MS, "other") == 100
    assert admission.available(TENANT, START_MS) == 1_100  # the tenant's whole balance, as before


def test_expired_scoped_credit_is_not_subtracted_twice():
    balance = PublishedBalance(
        tenant_id=TENANT,
        balance=300,
        overage=0,
        as_of_ms=START_MS,
        applied_offset=0,
        expiring=((START_MS + 10, 200),),
        scoped=((("gpt-x",), START_MS + 10, 200),),
    )
    assert balance.spendable_for("other", START_MS) == 100
    assert balance.spendable_for("gpt-x", START_MS) == 300
    # Expired: out of the balance for every model, once.
    assert balance.spendable_for("other", START_MS + 10) == 100
    assert balance.spendable_for("gpt-x", START_MS + 10) == 100


@contextlib.asynccontextmanager
async def strict_admission(grants, database_url, database_settings):
    """Strict admission over Postgres, its view holding the balance record the fold publishes for `grants`."""
    clock = ManualClock()
    view = new_view()
    record = folded_balance(grants)
    view.apply_balance_records(
        [LogRecord(TOPICS.balances, partition_of(TENANT), 0, TENANT.encode(), msgspec.json.encode(record), 0)]
    )
    mark_caught_up(view, clock())
    engine = build_async_engine(database_url, database_settings)
    settings = AdmissionSettings(mode="strict", view_ready_wait_ms=0, view_staleness_max_ms=10**9)
    admission = StrictAdmission(view, settings, engine, clock_ms=clock)
    await admission.start()
    try:
        yield admission
    finally:
        await admission.stop()
        await engine.dispose()


@pytest.mark.postgres
async def test_strict_mode_refuses_a_request_whose_model_cannot_use_the_scoped_credit(
    database_url, database_settings
):
    grants = [grant("scoped", 1_000, ("gpt-x",)), grant("any", 100)]
    async with strict_admission(grants, database_url, database_settings) as admission:
        with pytest.raises(CreditExhausted, match="100 are available"):
            await admission.admit(request("r1", "other-model", 500))
        reservation = await admission.admit(request("r2", "gpt-x", 500))
        assert reservation.amount == 500


@pytest.mark.postgres
async def test_strict_mode_counts_the_tenants_other_holds_against_the_credit_a_model_may_use(
    database_url, database_settings
):
    """Unscoped 100 and 100 scoped to gpt-x: two concurrent 100-credit requests of another model would fit
    the tenant's whole balance (200) but not the credit that model may use (100): the second is refused and
    its hold deleted; a gpt-x request still fits beside the first."""
    grants = [grant("scoped", 100, ("gpt-x",)), grant("any", 100)]
    async with strict_admission(grants, database_url, database_settings) as admission:
        await admission.admit(request("b1", "other-model", 100))
        with pytest.raises(CreditExhausted, match="0 are available"):
            await admission.admit(request("b2", "other-model", 100))
        await admission.admit(request("a1", "gpt-x", 100))
        with psycopg.connect(database_url) as connection:
            held = connection.execute("SELECT request_id FROM admission_holds ORDER BY 1").fetchall()
        assert held == [("a1",), ("b1",)]
