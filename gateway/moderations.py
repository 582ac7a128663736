"""POST /v1/moderations in OpenAI's shape, served by the tenant's own safety policy (gateway.safety): the
same checks its responses get, so a client can ask beforehand what would be blocked or redacted.

Each input string gets a result: `flagged` when any check finds something, and `categories` /
`category_scores` keyed by this gateway's reasons (blocked_term, blocked_pattern, email, phone, card,
iban; a score is 1.0 when found, else 0.0: the checks are rules, not a classifier). Nothing is generated,
so nothing is billed; each finding is counted (stage "moderation") like the responses' decisions.
"""

from __future__ import annotations

import uuid

from gateway.errors import invalid_param
from gateway.metrics import GatewayMetrics
from gateway.safety import REASONS, SafetyPolicy, Scanner

MODERATION_MODEL = "tollgate-policy"  # the model name a moderation answer reports
MODERATION_INPUTS_MAX = 32  # strings one moderation request may hold


def moderation_result(found: set[str]) -> dict:
    return {
        "flagged": bool(found),
        "categories": {reason: reason in found for reason in REASONS},
        "category_scores": {reason: 1.0 if reason in found else 0.0 for reason in REASONS},
        "category_applied_input_types": {reason: ["text"] for reason in REASONS},
    }


def moderate(policy: SafetyPolicy, texts: list[str], metrics: GatewayMetrics) -> dict:
    if not 1 <= len(texts) <= MODERATION_INPUTS_MAX:
        raise invalid_param("input", f"input holds 1 to {MODERATION_INPUTS_MAX} strings")
    scanner = Scanner(policy)
    results = []
    for text in texts:
        found = {finding.reason for finding in scanner.scan(text)}
        for reason in found:
            metrics.safety_decisions.labels("moderation", reason, "flag").inc()
        results.append(moderation_result(found))
    return {"id": f"modr-{uuid.uuid4().hex}", "model": MODERATION_MODEL, "results": results}
