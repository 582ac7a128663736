"""The usage of every request names the model version and the prompt version that served it, end to end
through the official `openai` client: the gateway, a real worker, Kafka, the processor, the projector and
Postgres (tests/fixtures/stack.py). A response built with a prompt version bills a usage event naming it
(`prompt_version`, `name@version`), the fold's usage entry carries it, and the ledger_entries projection
shows it in its own column; a request without one leaves it NULL."""

from __future__ import annotations

import openai
import psycopg
import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

MODEL = "tollgate-tiny"


def projected(database_url: str, entry_id: str) -> tuple[str | None, dict]:
    with psycopg.connect(database_url) as connection:
        row = connection.execute(
            "SELECT prompt_version, payload FROM ledger_entries WHERE entry_id = %s", (entry_id,)
        ).fetchone()
    assert row is not None, f"entry {entry_id} is not projected"
    return row[0], row[1]


def test_the_usage_entry_names_the_model_and_prompt_version_that_served(stack, module_database_url):
    tenant = stack.demo
    client = openai.OpenAI(api_key=tenant.key, base_url=stack.gateway_url + "/v1", max_retries=0, timeout=60)
    put = stack.admin.put("/admin/v1/prompts/e2e-support/versions/3", json={"text": "You are {{persona}}."})
    assert put.status_code == 200, put.text

    response = client.responses.create(
        model=MODEL,
        input="Hello",
        max_output_tokens=4,
        prompt={"id": "e2e-support", "version": "3", "variables": {"persona": "terse"}},
    )
    assert (response.model, response.prompt.id, response.prompt.version) == (MODEL, "e2e-support", "3")
    entry = stack.usage_entry(tenant.tenant_id, response.id.removeprefix("resp_"))
    assert entry["model"] == MODEL
    column, payload = projected(module_database_url, entry["entry_id"])
    assert column == payload["prompt_version"] == "e2e-support@3"
    assert payload["model"] == MODEL

    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    entry = stack.usage_entry(tenant.tenant_id, plain.headers["x-request-id"])
    column, payload = projected(module_database_url, entry["entry_id"])
    assert column is None and payload["prompt_version"] is None
