"""Safety checks: the detectors (blocked terms and patterns, emails, phones, cards with Luhn, IBANs with
mod 97), the streaming output guard, and a tenant's policy applied through the API: a blocked request
answers OpenAI's error and is never admitted (not billed), redaction before and after generation, a
stopped stream billed for the tokens produced, /v1/moderations, decisions counted and logged without
the text."""

from __future__ import annotations

import logging
import re

import httpx
import openai
import pytest

from gateway.safety import OutputGuard, SafetyPolicy, Scanner, iban_valid, luhn_valid, redact
from inference.settings import WorkerSettings
from ledger.pricing import usage_amount
from tests.gateway.conftest import (
    ADMIN_TOKEN,
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
)

MODEL = "tollgate-tiny"
SPEC = WorkerSettings().models[MODEL]
EVERYTHING = SafetyPolicy(
    blocked_terms=["project x"], blocked_patterns=[r"\bzz\d+\b"], pii=["email", "phone", "card", "iban"]
)
SAMPLE = (
    "write to ann.lee@example.org or call +44 20 7946 0958; "
    "card 4111-1111-1111-1111 (not 4111-1111-1111-1112), "
    "IBAN DE89 3704 0044 0532 0130 00 (not DE89 3704 0044 0532 0130 01), about Project X and zz42."
)


def test_luhn_and_iban_checks():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and iban_valid("DE89370400440532013000")
    assert not iban_valid("DE89370400440532013001")


def test_the_scanner_finds_each_kind_and_skips_numbers_failing_their_check():
    findings = Scanner(EVERYTHING).scan(SAMPLE)
    found = {(finding.reason, SAMPLE[finding.start : finding.end]) for finding in findings}
    assert found == {
        ("email", "ann.lee@example.org"),
        ("phone", "+44 20 7946 0958"),
        ("card", "4111-1111-1111-1111"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("blocked_term", "Project X"),
        ("blocked_pattern", "zz42"),
    }
    redacted = redact(SAMPLE, findings)
    assert "ann.lee" not in redacted and "[REDACTED:email]" in redacted
    assert "4111-1111-1111-1112" in redacted and "DE89 3704 0044 0532 0130 01" in redacted


def test_a_policy_without_pii_kinds_finds_nothing_there():
    assert Scanner(SafetyPolicy(pii=["email"])).scan("call +44 20 7946 0958") == []


def test_a_bad_pattern_is_refused_when_the_policy_is_set():
    with pytest.raises(ValueError, match="does not compile"):
        SafetyPolicy(blocked_patterns=["("])


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, 40, 1000])
def test_the_output_guard_redacts_the_same_however_the_text_is_split(step):
    guard = OutputGuard(Scanner(EVERYTHING), holdback_chars=64)
    text = SAMPLE * 2
    streamed = "".join(guard.feed(text[start : start + step]) for start in range(0, len(text), step))
    assert streamed + guard.flush() == redact(text, Scanner(EVERYTHING).scan(text))


def test_the_output_guard_never_releases_a_finding_before_it_is_whole():
    guard = OutputGuard(Scanner(SafetyPolicy(pii=["card"])), holdback_chars=64)
    released = "".join(guard.feed(char) for char in "pay 4111 1111 1111 1111 now")
    assert "4111" not in released
    assert released + guard.flush() == "pay [REDACTED:card] now"


def test_the_output_guard_stops_at_the_first_finding():
    guard = OutputGuard(Scanner(SafetyPolicy(pii=["email"], output_action="stop")), holdback_chars=64)
    assert guard.feed("mail me at a@b") == ""  # held back, not yet a finding
    assert guard.feed(".io please") == "mail me at "
    assert guard.stopped is not None and guard.stopped.reason == "email"


# ---- through the API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(worker, module_database_url):
    running = start_gateway(
        module_database_url, gateway_settings([worker.url], policy_cache_ttl_ms=0), RecordingAdmission()
    )
    yield running
    running.server.stop()


def tenant_with_policy(gateway, database_url: str, tenant_id: str, safety: dict):
    tenant = insert_tenant_with_key(database_url, tenant_id)
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        answer = admin.put(f"/admin/v1/tenants/{tenant_id}/policy", json={"safety": safety})
        assert answer.status_code == 200, answer.text
        assert admin.get(f"/admin/v1/tenants/{tenant_id}/policy").json()["safety"]["pii"] == safety.get(
            "pii", []
        )
    return tenant, openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)


def decisions(gateway, stage: str, reason: str, action: str) -> float:
    text = httpx.get(gateway.url + "/metrics").text
    labels = f'action="{action}",reason="{reason}",stage="{stage}"'
    match = re.search(
        r"^tollgate_gateway_safety_decisions_total\{" + re.escape(labels) + r"\} (\S+)$", text, re.M
    )
    return float(match.group(1)) if match else 0.0


@pytest.mark.postgres
async def test_a_blocked_input_is_refused_in_openais_shape_and_never_admitted(
    gateway, module_database_url, caplog
):
    tenant, client = tenant_with_policy(gateway, module_database_url, "safety-block", {"pii": ["email"]})
    before = decisions(gateway, "input", "email", "block")
    caplog.set_level(logging.INFO)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(
            model=MODEL, input="my address is secret.person@example.com", max_output_tokens=4
        )
    assert refused.value.code == "content_policy_violation"
    assert refused.value.body["type"] == "invalid_request_error"
    assert all(request.tenant_id != tenant.tenant_id for request in gateway.admission.admitted)
    assert decisions(gateway, "input", "email", "block") == before + 1
    assert any(record.getMessage() == "safety decision" for record in caplog.records)
    assert not any(
        "secret.person" in (record.getMessage() + str(record.__dict__)) for record in caplog.records
    )


@pytest.mark.postgres
async def test_a_redacted_input_is_sent_and_stored_redacted(gateway, worker, module_database_url):
    _tenant, client = tenant_with_policy(
        gateway, module_database_url, "safety-redact", {"pii": ["card"], "input_action": "redact"}
    )
    response = await client.responses.create(
        model=MODEL, input="charge 4111 1111 1111 1111 today", max_output_tokens=4
    )
    items = await client.responses.input_items.list(response.id)
    assert items.data[0].content[0].text == "charge [REDACTED:card] today"
    sent = [{"role": "user", "content": "charge [REDACTED:card] today"}]
    expected = len(SPEC.tokenizer().encode(SPEC.template.render(sent)))
    assert worker.usage_of(response.id.removeprefix("resp_")).prompt_tokens == expected


@pytest.mark.postgres
@pytest.mark.parametrize("stream", [False, True])
async def test_a_stopped_output_is_incomplete_and_billed_for_the_tokens_produced(
    gateway, worker, module_database_url, stream
):
    # Any non-space character is a finding: the first token that shows one stops the generation.
    _tenant, client = tenant_with_policy(
        gateway,
        module_database_url,
        f"safety-stop-{stream}",
        {"blocked_patterns": [r"\S"], "input_action": "none", "output_action": "stop"},
    )
    if stream:
        events = [
            event
            async for event in await client.responses.create(
                model=MODEL, input="Hi", max_output_tokens=40, temperature=0, stream=True
            )
        ]
        assert events[-1].type == "response.incomplete"
        response = events[-1].response
    else:
        response = await client.responses.create(model=MODEL, input="Hi", max_output_tokens=40, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "content_filter"
    assert response.output_text.strip() == ""
    request_id = response.id.removeprefix("resp_")
    usage = worker.usage_of(request_id)
    assert usage.completion_tokens >= response.usage.output_tokens >= 1  # what was produced, no more asked
    assert usage.completion_tokens < 40
    settled = dict(gateway.admission.finished)[request_id]
    assert settled == usage_amount(SPEC.price, response.usage.input_tokens, response.usage.output_tokens)


@pytest.mark.postgres
@pytest.mark.parametrize("stream", [False, True])
async def test_a_redacted_output_never_shows_what_the_policy_finds(gateway, module_database_url, stream):
    _tenant, client = tenant_with_policy(
        gateway,
        module_database_url,
        f"safety-vowels-{stream}",
        {"blocked_patterns": ["[aeiouAEIOU]"], "input_action": "none"},
    )
    before = decisions(gateway, "output", "blocked_pattern", "redact")
    if stream:
        events = [
            event
            async for event in await client.responses.create(
                model=MODEL, input="Once upon a time", max_output_tokens=24, temperature=0, stream=True
            )
        ]
        text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
        assert text == events[-1].response.output_text
    else:
        text = (
            await client.responses.create(
                model=MODEL, input="Once upon a time", max_output_tokens=24, temperature=0
            )
        ).output_text
    outside = text.replace("[REDACTED:blocked_pattern]", "")
    assert not re.search("[aeiouAEIOU]", outside)
    assert decisions(gateway, "output", "blocked_pattern", "redact") == before + text.count(
        "[REDACTED:blocked_pattern]"
    )


@pytest.mark.postgres
async def test_moderations_serve_the_tenants_policy(gateway, module_database_url):
    _tenant, client = tenant_with_policy(
        gateway, module_database_url, "safety-moderation", {"pii": ["email", "iban"]}
    )
    moderation = await client.moderations.create(
        input=[
            "nothing here",
            "mail x.y@example.com",
            "GB82 WEST 1234 5698 7654 32",
            "GB82 WEST 1234 5698 7654 33",
        ]
    )
    assert [result.flagged for result in moderation.results] == [False, True, True, False]
    assert moderation.results[1].categories.model_extra["email"] is True
    assert moderation.results[2].category_scores.model_extra["iban"] == 1.0
