"""The three balances (issue 16, point 1): settled (the fold), live (settled minus open holds) and pending
(grants not yet effective, with their times), from the processor's ledger.balances, the admin API, the
CLI, and strict admission's holds across gateways."""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest
from typer.testing import CliRunner

from gateway.admission.fast import FastAdmission
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict import StrictAdmission
from gateway.app import create_app
from gateway.ledger_view import wall_clock_ms
from ledger.codec import encode_event
from ledger.events import CreditGranted, GrantVoided, UsageRecorded
from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from streams.processor import LedgerProcessor
from streams.records import BalanceRecord, LogRecord
from streams.replay import DictState
from tests.gateway.admission.helpers import admission_request, balance_record, mark_caught_up, new_view
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    INTERNAL_TOKEN,
    RecordingLog,
    gateway_settings,
    insert_tenant_with_key,
    start_fake_worker,
)
from tests.gateway.ledger_rows import project_events
from tests.gateway.servers import FakeStream, ThreadServer
from tollgate.cli import app as cli

HOUR_MS = 3_600_000
TOPIC = "ledger.events"


def grants_around(now_ms: int) -> list:
    """In effect now: g-now (1000); pending: g-later (500, for an hour from in an hour) and g-soon (70);
    voided before it starts, so never pending: g-never; 200 used."""
    return [
        CreditGranted(
            event_id="e1", tenant_id="acme", grant_id="g-now", amount=1_000, effective_at=now_ms - HOUR_MS
        ),
        CreditGranted(
            event_id="e2",
            tenant_id="acme",
            grant_id="g-later",
            amount=500,
            effective_at=now_ms + HOUR_MS,
            expires_at=now_ms + 2 * HOUR_MS,
        ),
        CreditGranted(
            event_id="e3", tenant_id="acme", grant_id="g-soon", amount=70, effective_at=now_ms + 60_000
        ),
        CreditGranted(
            event_id="e4", tenant_id="acme", grant_id="g-never", amount=9, effective_at=now_ms + HOUR_MS
        ),
        GrantVoided(event_id="e5", tenant_id="acme", grant_id="g-never", voided_at=now_ms + 1_000),
        UsageRecorded(event_id="u1", tenant_id="acme", amount=200, occurred_at=now_ms - 1_000, model="m"),
    ]


def test_ledger_balances_carry_the_pending_grants_soonest_first_until_they_take_effect():
    now_ms = 1_800_000_000_000
    processor = LedgerProcessor(DictState(), source_topic=TOPIC)
    records = [
        LogRecord(TOPIC, 0, n, b"acme", encode_event(event), now_ms)
        for n, event in enumerate(grants_around(now_ms))
    ]
    output = processor.process(0, records)
    [balance] = [msgspec.json.decode(r.value, type=BalanceRecord) for r in output.balances]
    assert balance.balance == 800  # settled: 1000 - 200
    assert balance.pending == (
        ("g-soon", now_ms + 60_000, 70, None),
        ("g-later", now_ms + HOUR_MS, 500, now_ms + 2 * HOUR_MS),
    )
    later = UsageRecorded(event_id="u2", tenant_id="acme", amount=1, occurred_at=now_ms + 120_000, model="m")
    output = processor.process(0, [LogRecord(TOPIC, 0, 99, b"acme", encode_event(later), now_ms)])
    [balance] = [msgspec.json.decode(r.value, type=BalanceRecord) for r in output.balances]
    assert balance.balance == 869  # g-soon took effect: 800 + 70 - 1
    assert [grant[0] for grant in balance.pending] == ["g-later"]


@pytest.fixture
def gateway(database_url):
    """The gateway app with real fast admission over a fake worker; `admissions` holds it once built."""
    worker = start_fake_worker(lambda _body: FakeStream(tokens=3))
    admissions: list[FastAdmission] = []

    async def build():
        database_settings = DatabaseSettings(database_url=database_url, pool_size_max=4, pool_overflow_max=0)
        engine = build_async_engine(database_url, database_settings)
        view = new_view()
        view.apply_balance_records([balance_record("acme", 10**6, applied_offset=0)])
        mark_caught_up(view, wall_clock_ms())
        admission = FastAdmission(
            view, AdmissionSettings(view_ready_wait_ms=0, view_staleness_max_ms=10**9), engine=engine
        )
        admissions.append(admission)
        return create_app(
            gateway_settings([worker.url]),
            internal_token=INTERNAL_TOKEN,
            log=RecordingLog(),
            admission=admission,
            session_factory=build_session_factory(engine),
        )

    server = ThreadServer(build).start()
    yield server, admissions
    server.stop()
    worker.server.stop()


@pytest.mark.postgres
async def test_admin_api_and_cli_give_settled_live_and_pending(gateway, database_url, database_settings):
    server, admissions = gateway
    key = insert_tenant_with_key(database_url, "acme")
    now_ms = wall_clock_ms()
    engine = build_async_engine(database_url, database_settings)
    try:
        await project_events(build_session_factory(engine), grants_around(now_ms), now_ms)
    finally:
        await engine.dispose()

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        completion = await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key.key}"},
            json={"model": "tollgate-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
        assert completion.status_code == 200, completion.text
        # Finished, not yet folded (nothing folds here): its hold is open, and live subtracts it.
        held = admissions[0].holds.total("acme")
        assert held > 0
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        view = (await http.get("/admin/v1/tenants/acme/balance", headers=admin)).json()
        past = (await http.get("/admin/v1/tenants/acme/balance", headers=admin, params={"at": now_ms})).json()

    assert view["settled"] == view["balance"] == 800
    assert view["held"] == held and view["live"] == 800 - held
    assert view["pending_total"] == 570
    assert view["pending"] == [
        {"grant_id": "g-soon", "amount": 70, "effective_at": now_ms + 60_000, "expires_at": None},
        {
            "grant_id": "g-later",
            "amount": 500,
            "effective_at": now_ms + HOUR_MS,
            "expires_at": now_ms + 2 * HOUR_MS,
        },
    ]
    assert past["settled"] == 800 and past["live"] is None  # live is for now only

    result = CliRunner().invoke(cli, ["balance", "acme", "--url", server.url, "--admin-token", ADMIN_TOKEN])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert (shown["settled"], shown["pending_total"]) == (800, 570) and shown["live"] <= 800 - held


@pytest.mark.postgres
async def test_strict_live_subtracts_the_holds_of_every_gateway(database_url, database_settings):
    engines = [build_async_engine(database_url, database_settings) for _ in range(2)]
    settings = AdmissionSettings(mode="strict", view_ready_wait_ms=0, view_staleness_max_ms=10**9)
    gateways = []
    for engine in engines:
        view = new_view()
        view.apply_balance_records([balance_record("acme", 1_000, applied_offset=0)])
        mark_caught_up(view, wall_clock_ms())
        gateways.append(StrictAdmission(view, settings, engine))
    try:
        await gateways[0].admit(admission_request("a", cost=300))
        await gateways[1].admit(admission_request("b", cost=150))
        assert await gateways[0].held("acme") == await gateways[1].held("acme") == 450
    finally:
        for engine in engines:
            await engine.dispose()
