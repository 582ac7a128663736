"""Schemathesis over the gateway's whole OpenAPI document (admin routes, the OpenAI routes, health and
metrics), against `tollgate dev` as a newcomer runs it: embedded Postgres, the embedded event log and
processor, the real inference worker and admission. Admin routes carry the admin token and the OpenAI
routes the demo tenant's API key, so generated inputs reach the handlers instead of stopping at 401.

Every operation gets FUZZ_EXAMPLES_PER_OPERATION valid and invalid examples from a fixed seed
(deterministic generation, no example database), and two checks: no server error (a 503 `overloaded` is
backpressure, not an error) and every response conforms to the schema the document declares.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.fixtures.processes import free_port
from tests.test_dev_smoke import start_dev, stop, wait_for_demo

FUZZ_EXAMPLES_PER_OPERATION = 15
REQUEST_TIMEOUT_S = 30
FUZZ_TIMEOUT_S = 240  # the dev stack's start included
FAILURE_TEXT_CHARS_MAX = 700
OVERLOADED_STATUS = 503

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    data_dir, log_path = directory / ".tollgate", directory / "dev.log"
    process = start_dev(data_dir, free_port(), free_port(), log_path)
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, time.time() - 1)
        yield demo
    finally:
        stop(process)


@pytest.fixture(scope="module")
def gateway_schema(dev_stack):
    base_url = dev_stack["base_url"].removesuffix("/v1")
    loaded = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    loaded.config.update(base_url=base_url)
    return loaded


def not_a_server_error_except_overload(ctx, response, case) -> None:
    """5xx is a bug, except 503 `overloaded` (every worker's queue full: backpressure, by design)."""
    if response.status_code < 500:
        return
    if response.status_code == OVERLOADED_STATUS and b'"overloaded"' in response.content:
        return
    raise AssertionError(f"server error {response.status_code}: {response.content[:500]!r}")


def credentials(path: str, demo: dict) -> dict[str, str]:
    token = demo["admin_token"] if path.startswith("/admin/") else demo["api_key"]
    return {"Authorization": f"Bearer {token}"}


def fuzz_operation(operation, mode: GenerationMode, demo: dict) -> str | None:
    """Run one operation's examples in one generation mode; the first failure, described, or None."""

    @settings(
        max_examples=FUZZ_EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def examples(case) -> None:
        case.call_and_validate(
            headers=credentials(operation.path, demo),
            checks=[not_a_server_error_except_overload, response_schema_conformance],
            timeout=REQUEST_TIMEOUT_S,
        )

    try:
        examples()
    except Unsatisfiable:  # nothing to generate in this mode (no parameters to make invalid)
        return None
    except (FailureGroup, Exception) as error:  # every operation's failure is collected and reported together
        return f"{operation.label} ({mode.value}): {summary(error)}"
    return None


def summary(error: BaseException) -> str:
    """What failed, the response and the curl to reproduce it: the lines of schemathesis's report that say
    so, without the schemas it prints in full."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept, follow = [], False
    for line in lines:
        if follow or line.startswith(("- ", "curl ")) or " is not " in line:
            kept.append(line)
        follow = line == "Value:" or (line.startswith("[") and line.endswith(":"))  # the value or body next
    text = "\n    ".join(kept or lines[:3])
    return text[:FAILURE_TEXT_CHARS_MAX]


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_no_server_error_and_every_response_matches_the_document(gateway_schema, dev_stack):
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions"} <= labels, (
        "the completion routes are documented"
    )
    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := fuzz_operation(operation, mode, dev_stack)) is not None
    ]
    assert not failures, f"{len(failures)} failing operation(s):\n\n" + "\n\n".join(failures)
