"""The console over HTTP (no browser): sign-in, its cookie and headers, CSRF, the finance role, the audit
of console actions, and the pages' numbers against the ledger's."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from gateway.console.runtime import CONTENT_SECURITY_POLICY
from gateway.console.settings import ConsoleSettings
from ledger.events import UsageRecorded
from storage.audit import AdminAuditRecord
from tests.console.conftest import ADMIN_TOKEN, console_app, csrf_of, fold_and_project, sign_in

pytestmark = pytest.mark.postgres


async def test_sign_in_sets_a_strict_http_only_session_cookie_and_every_page_its_security_headers(browser):
    page = await browser.get("/console/sign-in")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert page.headers["x-frame-options"] == "DENY"
    assert '<form method="post" action="/console/sign-in"' in page.text, "the token goes in a POST body"
    assert "<script>" not in page.text and "style=" not in page.text, "no inline script or style"

    assert (await browser.get("/console", follow_redirects=False)).headers["location"] == "/console/sign-in"
    wrong = await sign_in(browser, "not-the-token-0123456789abcdefghij")
    assert wrong.status_code == 401 and "not a valid admin credential" in wrong.text

    response = await sign_in(browser)
    assert response.status_code == 303 and response.headers["location"] == "/console"
    cookie = response.headers["set-cookie"]
    assert "tollgate_console=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/console" in cookie and "Secure" not in cookie, "development serves plain HTTP"
    assert ADMIN_TOKEN not in cookie, "the credential is never kept"
    overview = await browser.get("/console")
    assert overview.status_code == 200 and "Credits consumed today" in overview.text
    assert "unreachable" in overview.text, "a worker that does not answer is shown as such"


async def test_outside_development_the_cookie_is_secure(session_factory, publisher, clock):
    import httpx

    app = console_app(session_factory, publisher, clock, ConsoleSettings(environment="production"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://c.test") as client:
        response = await sign_in(client)
    assert response.status_code == 303 and "Secure" in response.headers["set-cookie"]


async def test_a_form_without_the_sessions_csrf_token_is_refused(operator):
    refused = await operator.post("/console/tenants", data={"name": "Acme", "tier": "pro"})
    assert refused.status_code == 403
    forged = await operator.post("/console/tenants", data={"name": "Acme", "tier": "pro", "csrf": "x" * 43})
    assert forged.status_code == 403
    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Acme", "tier": "pro", "csrf": csrf})
    assert created.status_code == 303 and created.headers["location"].startswith("/console/tenants/tn_")


async def test_console_actions_are_in_the_admin_audit_log(operator, session_factory, publisher):
    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Audited", "tier": "pro", "csrf": csrf})
    tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
    granted = await operator.post(
        f"/console/tenants/{tenant_id}/grants",
        data={"amount": "5000", "csrf": csrf, "idempotency_key": "console-test-1"},
    )
    assert granted.status_code == 303, granted.text
    async with session_factory() as session:
        rows = (await session.execute(select(AdminAuditRecord).order_by(AdminAuditRecord.sequence))).scalars()
        actions = [(r.credential_name, r.action, r.target, r.event_ids) for r in rows]
    assert actions[0][:3] == ("bootstrap", "console create tenant", f"tenant_id={tenant_id}")
    assert actions[1][:3] == ("bootstrap", "console grant credit", f"tenant_id={tenant_id}")
    assert actions[1][3] == [publisher.events[0].event_id], "the published CreditGranted"


async def test_a_finance_credential_gets_a_read_only_console(operator, browser, session_factory):
    import httpx

    async with httpx.AsyncClient(
        transport=browser._transport,
        base_url="http://console.test",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as admin:
        secret = (await admin.post("/admin/v1/credentials", json={"name": "fin", "role": "finance"})).json()[
            "secret"
        ]
        tenant_id = (await admin.post("/admin/v1/tenants", json={"name": "Ro", "tier": "pro"})).json()[
            "tenant_id"
        ]
    operator_csrf = await csrf_of(operator, "/console/tenants")
    operator.cookies.clear()
    assert (await sign_in(operator, secret)).status_code == 303
    page = await operator.get(f"/console/tenants/{tenant_id}")
    assert page.status_code == 200 and "fin (finance, read-only)" in page.text
    assert "Grant credit" not in page.text and "Create API key" not in page.text and "Void" not in page.text
    csrf = await csrf_of(operator, f"/console/tenants/{tenant_id}")
    assert csrf != operator_csrf
    refused = await operator.post(f"/console/tenants/{tenant_id}/grants", data={"amount": "5", "csrf": csrf})
    assert refused.status_code == 403
    assert (await operator.get("/console/grants/gr_any/void")).status_code == 403, "no void page either"


async def test_the_tenant_page_shows_the_ledgers_numbers(operator, session_factory, publisher, clock):
    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Numbers", "tier": "pro", "csrf": csrf})
    tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
    for key, amount in (("a", "1000"), ("b", "3000")):
        response = await operator.post(
            f"/console/tenants/{tenant_id}/grants",
            data={"amount": amount, "csrf": csrf, "idempotency_key": f"k-{key}"},
        )
        assert response.status_code == 303, response.text
    events = list(publisher.events)
    clock.now_ms += 2 * 3_600_000  # the usage falls after the grants took effect
    for n in range(30):
        events.append(
            UsageRecorded(
                event_id=f"u{n}",
                tenant_id=tenant_id,
                amount=20,
                occurred_at=clock.now_ms - 3_600_000 + n * 60_000,
                model="tollgate-tiny",
                prompt_tokens=10,
                completion_tokens=5,
            )
        )
    await fold_and_project(session_factory, tenant_id, events, clock.now_ms)

    page = await operator.get(f"/console/tenants/{tenant_id}")
    assert 'data-balance="settled">3,400<' in page.text, re.findall(
        r"data-balance.{0,60}", page.text
    )  # 4,000 - 30 x 20
    chart = (await operator.get(f"/console/tenants/{tenant_id}/burndown.json?width=40")).json()
    assert chart["points"] == 40 and all(len(s["values"]) == 40 for s in chart["series"])
    assert chart["remaining_total"] == 3_400 and sum(s["values"][-1] for s in chart["series"]) == 3_400
    assert chart["projection"]["runs_out_at"] is not None, "600 credits consumed in the last day"
    huge = (await operator.get(f"/console/tenants/{tenant_id}/burndown.json?width=100000")).json()
    assert huge["points"] == ConsoleSettings().chart_points_max, "never more points than the chart can draw"
    usage = (await operator.get(f"/console/tenants/{tenant_id}/usage.json")).json()
    assert [s["model"] for s in usage["series"]] == ["tollgate-tiny"] and sum(
        usage["series"][0]["values"]
    ) == 600


async def test_rules_set_and_removed_from_the_console_publish_their_events_and_list_once_archived(
    operator, session_factory, publisher
):
    from ledger.codec import encode_event
    from ledger.events import AlertRuleRemoved, AlertRuleSet, TopUpRuleSet
    from streams.projector import rows_of_batch, write_batch
    from streams.records import LogRecord
    from tests.console.conftest import TOPICS

    async def archive(events) -> None:
        records = [LogRecord(TOPICS.events, 0, n, e.tenant_id.encode(), encode_event(e)) for n, e in events]
        async with session_factory() as session, session.begin():
            await write_batch(session, "test", rows_of_batch(TOPICS, records, now_ms=0))

    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Rules", "tier": "pro", "csrf": csrf})
    tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
    base = f"/console/tenants/{tenant_id}"
    alert = await operator.post(
        f"{base}/rules/alert",
        data={"csrf": csrf, "rule_id": "low", "kind": "balance_below", "threshold": "500"},
    )
    assert alert.status_code == 303, alert.text
    top_up = await operator.post(
        f"{base}/rules/top_up",
        data={"csrf": csrf, "rule_id": "refill", "threshold": "100", "amount": "1000", "price": "900",
              "currency": "USD", "category": "paid", "monthly_count_max": "4"},
    )  # fmt: skip
    assert top_up.status_code == 303, top_up.text
    bad = await operator.post(f"{base}/rules/alert", data={"csrf": csrf, "rule_id": "-x", "kind": "depleted"})
    assert bad.status_code == 422 and "rule_id" in bad.text
    set_events = [e for e in publisher.events if isinstance(e, AlertRuleSet | TopUpRuleSet)]
    assert [(type(e).__name__, e.rule_id) for e in set_events] == [
        ("AlertRuleSet", "low"),
        ("TopUpRuleSet", "refill"),
    ]
    await archive(enumerate(set_events))
    page = await operator.get(base)
    assert (
        'data-rule="low"' in page.text and 'data-rule="refill"' in page.text and "balance_below" in page.text
    )

    removed = await operator.post(f"{base}/rules/alert/low/remove", data={"csrf": csrf})
    assert removed.status_code == 303
    removal = publisher.events[-1]
    assert isinstance(removal, AlertRuleRemoved) and removal.rule_id == "low"
    await archive([(2, removal)])
    page = await operator.get(base)
    assert 'data-rule="low"' not in page.text and 'data-rule="refill"' in page.text
    async with session_factory() as session:
        actions = list(
            (
                await session.execute(select(AdminAuditRecord.action).order_by(AdminAuditRecord.sequence))
            ).scalars()
        )
    assert actions[-3:] == ["console set alert rule", "console set top_up rule", "console remove alert rule"]


async def test_the_cards_show_the_pending_grants_and_no_live_balance_where_nothing_is_admitted(
    operator, session_factory, publisher, clock
):
    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Later", "tier": "pro", "csrf": csrf})
    tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
    async with session_factory() as session, session.begin():
        from gateway.admin import commands
        from gateway.admin.models import GrantCreate

        await commands.record_grant(
            session,
            tenant_id,
            "later",
            GrantCreate(amount=700, effective_at=clock.now_ms + 86_400_000),
            10**9,
            clock.now_ms,
        )
    cards = await operator.get(f"/console/tenants/{tenant_id}/fragments/balance")
    assert 'data-balance="pending">700<' in cards.text
    assert 'data-balance="live">—<' in cards.text, "this app admits no requests: no holds to count"


HISTORY_ROW = re.compile(
    r"<tr><td>(\d+)</td><td>[^<]*</td><td>(\w+)</td><td>([^<]*)</td>\s*"
    r'<td class="num (?:neg|pos)">([+\-][\d,]+)</td><td class="num">([\d,\-]+)</td></tr>'
)


async def history(client, path: str) -> list[tuple[int, str, str, int, int]]:
    rows, url = [], path
    while url:
        page = (await client.get(url)).text
        rows += [
            (int(seq), kind, model, int(amount.replace(",", "")), int(after.replace(",", "")))
            for seq, kind, model, amount, after in HISTORY_ROW.findall(page)
        ]
        older = re.search(r'<a href="([^"]+)">Older entries</a>', page)
        url = older[1].replace("&amp;", "&") if older else None
    return rows


async def test_history_pages_filters_and_the_balance_after_each_row(session_factory, publisher, clock):
    import httpx

    app = console_app(session_factory, publisher, clock, ConsoleSettings(history_page_size=7))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test") as client:
        assert (await sign_in(client)).status_code == 303
        csrf = await csrf_of(client, "/console/tenants")
        created = await client.post("/console/tenants", data={"name": "Pages", "tier": "pro", "csrf": csrf})
        tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
        granted = await client.post(
            f"/console/tenants/{tenant_id}/grants",
            data={"amount": "1000", "csrf": csrf, "idempotency_key": "h"},
        )
        assert granted.status_code == 303
        clock.now_ms += 3_600_000
        usage = [
            UsageRecorded(
                event_id=f"h{n}", tenant_id=tenant_id, amount=10 + n, occurred_at=clock.now_ms - 9_000 + n,
                model=("a-model", "b-model")[n % 2], prompt_tokens=1, completion_tokens=1,
            )
            for n in range(20)
        ]  # fmt: skip
        await fold_and_project(session_factory, tenant_id, [*publisher.events, *usage], clock.now_ms)
        base = f"/console/tenants/{tenant_id}"
        rows = await history(client, base)
        assert len(rows) == 21 and [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)
        assert rows[-1][1:] == ("grant_recorded", "", 1_000, 1_000)
        for newer, older in zip(rows, rows[1:], strict=False):
            assert newer[4] - newer[3] == older[4], (newer, older)  # balance after = the one before + amount
        assert rows[0][4] == 1_000 - sum(10 + n for n in range(20))
        by_sequence = {r[0]: r for r in rows}
        only_b = await history(client, f"{base}?model=b-model")
        assert len(only_b) == 10 and all(r[2] == "b-model" for r in only_b)
        assert all(by_sequence[r[0]] == r for r in only_b), "the balance after is the whole ledger's"
        grants = await history(client, f"{base}?type=grant_recorded")
        assert [r[1:] for r in grants] == [("grant_recorded", "", 1_000, 1_000)]
        statement = await client.get(f"{base}/statement?period=2026-11")
        assert statement.status_code == 200 and "a-model" in statement.text and "b-model" in statement.text
        csv = await client.get(f"{base}/statement?period=2026-11&format=csv")
        assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith(
            "section,key,credits"
        )
        assert (await client.get(f"{base}/statement?period=2026-13")).status_code == 422


async def test_a_grant_scoped_to_models_from_the_console(operator, publisher):
    csrf = await csrf_of(operator, "/console/tenants")
    created = await operator.post("/console/tenants", data={"name": "Scoped", "tier": "pro", "csrf": csrf})
    tenant_id = created.headers["location"].split("/")[-1].split("?")[0]
    granted = await operator.post(
        f"/console/tenants/{tenant_id}/grants",
        data={"amount": "900", "models": "tiny, small ,", "csrf": csrf, "idempotency_key": "scoped"},
    )
    assert granted.status_code == 303, granted.text
    assert tuple(publisher.events[-1].models) == ("tiny", "small")
    assert "<td>tiny, small</td>" in (await operator.get(f"/console/tenants/{tenant_id}")).text
    twice = await operator.post(
        f"/console/tenants/{tenant_id}/grants",
        data={"amount": "900", "models": "tiny,tiny", "csrf": csrf, "idempotency_key": "twice"},
    )
    assert twice.status_code == 422 and "models" in twice.text
