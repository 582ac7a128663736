"""Budgets per API key (issue 16, point 4) on real Postgres: spend counted from the usage entries carrying
the key's id plus the key's open holds; concurrent requests at the edge of a budget in both modes (only
those that fit are admitted, across two strict gateways too); the 429 naming the budget (and through the
official openai client); the x-ratelimit-*-credits headers; fail closed when the database cannot be
reached; a key without a budget unaffected."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import httpx
import openai
import psycopg
import pytest
from typer.testing import CliRunner

from gateway.admission.base import AdmissionRequest, Rejection
from gateway.admission.budgets import (
    DAILY,
    MONTHLY,
    KeyBudget,
    KeyBudgetExceeded,
    KeyBudgetUnavailable,
    Windows,
)
from gateway.admission.fast import FastAdmission
from gateway.admission.settings import AdmissionSettings
from gateway.admission.strict import StrictAdmission
from gateway.app import create_app
from gateway.ledger_view import wall_clock_ms
from ledger.events import CreditGranted, UsageRecorded
from storage.database import DatabaseSettings, build_async_engine, build_session_factory
from tests.fixtures.processes import free_port
from tests.gateway.admission.helpers import balance_record, mark_caught_up, new_view, usage_record
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

pytestmark = pytest.mark.postgres

COST = 150
BALANCE = 10**9  # the tenant's credit never limits these tests: only the key's budget does


def budget_request(request_id: str, budget: KeyBudget | None, cost: int = COST) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id,
        tenant_id="acme",
        tier="enterprise",
        model="m",
        prompt_tokens=10,
        max_tokens=20,
        estimated_cost=cost,
        budget=budget,
    )


def fed_view(now_ms: int):
    view = new_view()
    view.apply_balance_records([balance_record("acme", BALANCE, applied_offset=0)])
    mark_caught_up(view, now_ms)
    return view


def settings(mode: str, **overrides) -> AdmissionSettings:
    values = dict(mode=mode, view_ready_wait_ms=0, view_staleness_max_ms=10**9, hold_timeout_ms=60_000)
    values.update(overrides)
    return AdmissionSettings(**values)


async def outcomes_of(admission, budget: KeyBudget, count: int, prefix: str = "r") -> list:
    async def one(n: int):
        try:
            return await admission.admit(budget_request(f"{prefix}{n}", budget))
        except Rejection as rejection:
            return rejection

    return await asyncio.gather(*(one(n) for n in range(count)))


def admitted(outcomes: list) -> list:
    return [o for o in outcomes if not isinstance(o, Rejection)]


async def used_by_key(sessions, key_id: str, entries: list[tuple[str, int, int]]) -> None:
    """Project usage entries of key_id: (request id, amount, occurred_at)."""
    grant = CreditGranted(event_id="g", tenant_id="acme", grant_id="g", amount=BALANCE, effective_at=0)
    usage = [
        UsageRecorded(
            event_id=request_id,
            tenant_id="acme",
            amount=amount,
            occurred_at=occurred_at,
            model="m",
            api_key_id=key_id,
        )
        for request_id, amount, occurred_at in entries
    ]
    await project_events(sessions, [grant, *usage], wall_clock_ms())


@pytest.fixture
async def engine(database_url, database_settings):
    engine = build_async_engine(database_url, database_settings)
    yield engine
    await engine.dispose()


@pytest.fixture
def key(database_url):
    return insert_tenant_with_key(database_url, "acme")


def set_budget(database_url: str, key_id: str, daily: int | None, monthly: int | None) -> KeyBudget:
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(
            "UPDATE api_keys SET daily_credits = %s, monthly_credits = %s WHERE key_id = %s",
            (daily, monthly, key_id),
        )
    return KeyBudget(key_id, daily, monthly)


# ------------------------------------------------------------------------------------------ fast mode


async def test_fast_parallel_requests_at_the_budget_edge_admit_only_what_fits(engine, database_url, key):
    budget = set_budget(database_url, key.key_id, 1_000, None)
    admission = FastAdmission(fed_view(wall_clock_ms()), settings("fast"), engine=engine)
    outcomes = await outcomes_of(admission, budget, 30)
    assert len(admitted(outcomes)) == 6  # 6 x 150 = 900 <= 1000 < 1050
    refusals = [o for o in outcomes if isinstance(o, Rejection)]
    assert all(isinstance(r, KeyBudgetExceeded) and r.param == DAILY for r in refusals)
    assert len(refusals) == 24


async def test_fast_counts_the_keys_usage_entries_of_today_and_of_this_month(engine, database_url, key):
    now_ms = wall_clock_ms()
    windows = Windows.at(now_ms)
    sessions = build_session_factory(engine)
    await used_by_key(
        sessions,
        key.key_id,
        [
            ("today", 400, windows.day_start_ms),
            ("last-month", 5_000, windows.month_start_ms - 1),  # counts in neither window
            ("other-key-free", 0, now_ms),
        ],
    )
    budget = set_budget(database_url, key.key_id, 1_000, None)
    admission = FastAdmission(fed_view(now_ms), settings("fast"), engine=engine)
    assert len(admitted(await outcomes_of(admission, budget, 10))) == 4  # 400 + 4 x 150 = 1000

    monthly_only = set_budget(database_url, key.key_id, None, 700)
    fresh = FastAdmission(fed_view(now_ms), settings("fast"), engine=engine)
    outcomes = await outcomes_of(fresh, monthly_only, 5, prefix="m")
    assert len(admitted(outcomes)) == 2  # 400 + 2 x 150 = 700
    refusal = next(o for o in outcomes if isinstance(o, Rejection))
    assert isinstance(refusal, KeyBudgetExceeded) and refusal.param == MONTHLY
    assert key.key_id in refusal.message and "700 credits" in refusal.message


async def test_fast_a_released_hold_gives_its_budget_back_and_headers_say_what_is_left(
    engine, database_url, key
):
    budget = set_budget(database_url, key.key_id, 400, 10_000)
    admission = FastAdmission(fed_view(wall_clock_ms()), settings("fast"), engine=engine)
    first = await admission.admit(budget_request("a", budget))
    assert first.headers["x-ratelimit-limit-credits"] == "400"  # the tighter window: the day
    assert first.headers["x-ratelimit-remaining-credits"] == "250"
    assert first.headers["x-ratelimit-reset-credits"].endswith("s")
    second = await admission.admit(budget_request("b", budget))
    assert second.headers["x-ratelimit-remaining-credits"] == "100"
    with pytest.raises(KeyBudgetExceeded) as caught:
        await admission.admit(budget_request("c", budget))
    assert caught.value.headers["x-should-retry"] == "false"
    assert int(caught.value.headers["retry-after"]) >= 1
    await admission.release(first)
    again = await admission.admit(budget_request("d", budget))
    assert again.headers["x-ratelimit-remaining-credits"] == "100"


async def test_fast_a_key_without_a_budget_is_not_limited_and_gets_no_credit_headers(engine, key):
    admission = FastAdmission(fed_view(wall_clock_ms()), settings("fast"), engine=engine)
    outcomes = await outcomes_of(admission, KeyBudget(key.key_id), 20)
    assert len(admitted(outcomes)) == 20
    assert all("x-ratelimit-limit-credits" not in o.headers for o in outcomes)


async def test_fast_fails_closed_when_the_database_is_unreachable(key):
    unreachable = f"postgresql://tollgate@127.0.0.1:{free_port()}/nowhere"
    engine = build_async_engine(unreachable, DatabaseSettings(database_url=unreachable))
    try:
        admission = FastAdmission(fed_view(wall_clock_ms()), settings("fast"), engine=engine)
        with pytest.raises(KeyBudgetUnavailable) as caught:
            await admission.admit(budget_request("r", KeyBudget(key.key_id, daily_credits=1_000)))
        assert caught.value.status_code == 503
        assert key.key_id in caught.value.message and "refused" in caught.value.message
        # A key without a budget needs no database: admitted as before.
        await admission.admit(budget_request("free", None))
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------------------ strict mode


async def test_strict_two_gateways_at_the_budget_edge_admit_only_what_fits(
    database_url, database_settings, key
):
    budget = set_budget(database_url, key.key_id, 1_000, None)
    engines = [build_async_engine(database_url, database_settings) for _ in range(2)]
    gateways = [StrictAdmission(fed_view(wall_clock_ms()), settings("strict"), e) for e in engines]
    try:
        sessions = build_session_factory(engines[0])
        await used_by_key(sessions, key.key_id, [("earlier", 100, wall_clock_ms() - 1)])
        results = await asyncio.gather(
            outcomes_of(gateways[0], budget, 20, prefix="a"), outcomes_of(gateways[1], budget, 20, prefix="b")
        )
        outcomes = [o for result in results for o in result]
        assert len(admitted(outcomes)) == 6  # 100 + 6 x 150 = 1000
        refusal = next(o for o in outcomes if isinstance(o, Rejection))
        assert isinstance(refusal, KeyBudgetExceeded) and refusal.param == DAILY
        with psycopg.connect(database_url) as connection:
            held = connection.execute(
                "SELECT count(*), sum(amount) FROM admission_holds WHERE api_key_id = %s", (key.key_id,)
            ).fetchone()
        assert held == (6, 900)
    finally:
        for engine in engines:
            await engine.dispose()


async def test_strict_reads_the_limits_from_the_keys_row_at_each_reservation(engine, database_url, key):
    set_budget(database_url, key.key_id, 1_000, None)
    admission = StrictAdmission(fed_view(wall_clock_ms()), settings("strict"), engine)
    cached = KeyBudget(key.key_id, daily_credits=1_000)  # what a gateway's key cache may still hold
    first = await admission.admit(budget_request("a", cached))
    assert first.headers["x-ratelimit-remaining-credits"] == "850"
    set_budget(database_url, key.key_id, None, 200)  # lowered through the admin API meanwhile
    with pytest.raises(KeyBudgetExceeded) as caught:
        await admission.admit(budget_request("b", cached))
    assert caught.value.param == MONTHLY and "200 credits" in caught.value.message


async def test_strict_fails_closed_with_a_503_that_says_so(key):
    unreachable = f"postgresql://tollgate@127.0.0.1:{free_port()}/nowhere"
    engine = build_async_engine(unreachable, DatabaseSettings(database_url=unreachable))
    try:
        admission = StrictAdmission(fed_view(wall_clock_ms()), settings("strict"), engine)
        with pytest.raises(KeyBudgetUnavailable) as caught:
            await admission.admit(budget_request("r", KeyBudget(key.key_id, monthly_credits=10)))
        assert caught.value.status_code == 503
        assert "could not be checked" in caught.value.message and "Postgres" in caught.value.message
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------- through the gateway's HTTP API


@pytest.fixture
def gateway_with_budgets(database_url):
    """The gateway app with real fast admission (its own engine) over a fake worker."""
    worker = start_fake_worker(lambda _body: FakeStream())

    async def build():
        database_settings = DatabaseSettings(database_url=database_url, pool_size_max=4, pool_overflow_max=0)
        engine = build_async_engine(database_url, database_settings)
        admission = FastAdmission(fed_view(wall_clock_ms()), settings("fast"), engine=engine)
        return create_app(
            gateway_settings([worker.url], auth_cache_ttl_ms=0),
            internal_token=INTERNAL_TOKEN,
            log=RecordingLog(),
            admission=admission,
            session_factory=build_session_factory(engine),
        )

    server = ThreadServer(build).start()
    yield server, worker.fake
    server.stop()
    worker.server.stop()


async def test_the_429_names_the_budget_through_the_openai_client(gateway_with_budgets, database_url):
    limited = insert_tenant_with_key(database_url, "acme")
    set_budget(database_url, limited.key_id, 1, None)  # less than any request's estimate
    unlimited = insert_tenant_with_key(database_url, "acme")
    server, worker = gateway_with_budgets
    base_url = server.url + "/v1"
    messages = [{"role": "user", "content": "hi"}]

    client = openai.AsyncOpenAI(api_key=limited.key, base_url=base_url, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="tollgate-tiny", messages=messages, max_tokens=5)
    error = caught.value
    assert error.status_code == 429 and error.param == "daily_credits"
    assert error.code == "api_key_budget_exceeded" and error.type == "insufficient_quota"
    assert limited.key_id in error.message and "1 credits" in error.message
    assert error.response.headers["x-ratelimit-limit-credits"] == "1"
    assert error.response.headers["x-ratelimit-remaining-credits"] == "1"  # unspent; the request needs more

    free = openai.AsyncOpenAI(api_key=unlimited.key, base_url=base_url, max_retries=0)
    reply = await free.chat.completions.with_raw_response.create(
        model="tollgate-tiny", messages=messages, max_tokens=5
    )
    assert reply.http_response.status_code == 200
    assert "x-ratelimit-limit-credits" not in reply.http_response.headers
    # The worker is told the key, so the usage event it emits names it (UsageRecorded.api_key_id).
    assert [call.body.get("api_key_id") for call in worker.calls] == [unlimited.key_id]


async def test_a_key_with_a_budget_gets_credit_headers_on_success(gateway_with_budgets, database_url):
    limited = insert_tenant_with_key(database_url, "acme")
    set_budget(database_url, limited.key_id, 10**6, 10**7)
    server, _ = gateway_with_budgets
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {limited.key}"},
            json={"model": "tollgate-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-credits"] == str(10**6)
    assert 0 < int(response.headers["x-ratelimit-remaining-credits"]) < 10**6


async def test_the_cli_creates_a_key_with_budgets_and_replaces_them(gateway_with_budgets, database_url):
    insert_tenant_with_key(database_url, "acme")
    server, _ = gateway_with_budgets
    target = ["--url", server.url, "--admin-token", ADMIN_TOKEN]
    runner = CliRunner()
    created = runner.invoke(
        cli, ["keys", "create", "acme", "--daily-credits", "5", "--monthly-credits", "50", *target]
    )
    assert created.exit_code == 0, created.output
    key = json.loads(created.output)
    assert (key["daily_credits"], key["monthly_credits"]) == (5, 50)
    changed = runner.invoke(cli, ["keys", "budget", key["key_id"], "--monthly-credits", "7", *target])
    assert changed.exit_code == 0, changed.output
    assert json.loads(changed.output) == {
        "key_id": key["key_id"],
        "tenant_id": "acme",
        "daily_credits": None,
        "monthly_credits": 7,
    }
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT daily_credits, monthly_credits FROM api_keys WHERE key_id = %s", (key["key_id"],)
        ).fetchone()
    assert row == (None, 7)
    unknown = runner.invoke(cli, ["keys", "budget", "key_nope", "--daily-credits", "1", *target])
    assert unknown.exit_code == 1 and "key_nope" in unknown.output


def test_windows_are_the_utc_day_and_calendar_month_around_now():
    def ms(text: str) -> int:
        return int(datetime.fromisoformat(text).timestamp() * 1000)

    windows = Windows.at(ms("2026-12-31T23:59:59.999+00:00"))
    assert windows == Windows(
        day_start_ms=ms("2026-12-31T00:00:00+00:00"),
        day_end_ms=ms("2027-01-01T00:00:00+00:00"),
        month_start_ms=ms("2026-12-01T00:00:00+00:00"),
        month_end_ms=ms("2027-01-01T00:00:00+00:00"),
    )
    assert Windows.at(ms("2027-02-01T00:00:00+00:00")).month_end_ms == ms("2027-03-01T00:00:00+00:00")


# ---------------------------------------------------------- folded before projected (both modes)


@pytest.mark.parametrize("mode", ["fast", "strict"])
async def test_usage_folded_but_not_yet_projected_still_counts_and_then_counts_once(
    engine, database_url, key, mode
):
    """Request after request: each one's usage is folded (its hold settles) a moment before the projector
    writes its entry. In that moment it still counts against the key's budget, and once projected it
    counts once, as the entry."""
    budget = set_budget(database_url, key.key_id, 500, None)
    view = fed_view(wall_clock_ms())
    admission_class = FastAdmission if mode == "fast" else StrictAdmission
    admission = admission_class(view, settings(mode, budget_spend_cache_ttl_ms=0), engine=engine)
    await admission.start()
    try:
        first = await admission.admit(budget_request("r1", budget))
        second = await admission.admit(budget_request("r2", budget))
        await admission.finish(first, COST)
        await admission.finish(second, COST)
        # the processor folds both usages: the view sees their events and a balance that includes them
        view.apply_event_records([usage_record("acme", "r1", COST, 1), usage_record("acme", "r2", COST, 2)])
        view.apply_balance_records([balance_record("acme", BALANCE - 2 * COST, applied_offset=2)])
        assert admission.holds.key_total(key.key_id) == 0, "both holds settled"
        if mode == "strict":
            await wait_for_no_holds(database_url, key.key_id)

        # 300 spent, not projected yet: 150 more fits, 300 more does not
        third = await admission.admit(budget_request("r3", budget))
        with pytest.raises(KeyBudgetExceeded):
            await admission.admit(budget_request("r4", budget))
        await admission.release(third)

        # the projector catches up: the entries count, the settled holds no longer (not twice)
        sessions = build_session_factory(engine)
        now_ms = wall_clock_ms()
        await used_by_key(sessions, key.key_id, [("r1", COST, now_ms), ("r2", COST, now_ms)])
        fourth = await admission.admit(budget_request("r5", budget))
        assert fourth.headers["x-ratelimit-remaining-credits"] == str(500 - 3 * COST)
        if mode == "strict":
            with psycopg.connect(database_url) as connection:
                kept = connection.execute("SELECT count(*) FROM admission_key_unprojected").fetchone()
            assert kept == (0,), "a projected entry's row is deleted"
    finally:
        await admission.stop()


async def wait_for_no_holds(database_url: str, key_id: str) -> None:
    for _ in range(200):
        with psycopg.connect(database_url) as connection:
            (held,) = connection.execute(
                "SELECT count(*) FROM admission_holds WHERE api_key_id = %s", (key_id,)
            ).fetchone()
        if held == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the strict settler did not delete the holds")
