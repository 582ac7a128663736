"""The eval gate: a version is promoted only after the fixed evaluation set (`gateway/eval_set.json`,
committed) scores within `eval_margin_percent` points of the stable version's score; each version's
result is stored with it (table `model_evals`, keyed by the version and the set's SHA-256).

A case is `{"id", "input", "max_output_tokens"[, "contains": [...]]}`: it passes when the version answers
it in full (no error, at least one token, greedy decoding) and, when `contains` is given, the answer holds
one of those strings (case-insensitively). The committed set checks that a version answers every prompt;
cases that require text make it a quality gate too. A score is an integer percentage of cases passed.

Eval traffic is real traffic: admitted and billed like any request, to the tenant
`TOLLGATE_GATEWAY_EVAL_TENANT_ID` (give it credit), so what an evaluation costs is on the ledger too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admission.base import Rejection
from gateway.auth import TenantIdentity
from gateway.completions import monotonic_ms, new_request_id
from gateway.errors import ApiError
from gateway.prompt_builder import build_prompt
from gateway.router import ModelRouter
from gateway.schemas import PreparedRequest
from gateway.settings import GatewaySettings
from gateway.workers import BudgetExhausted, DoneEvent, WorkerFailed
from storage.conversations import ModelEval

logger = logging.getLogger(__name__)

EVAL_SET_PATH = Path(__file__).with_name("eval_set.json")
EVAL_CASES_MAX = 256  # cases one evaluation set may hold


@dataclass(frozen=True, slots=True)
class EvalCase:
    id: str
    input: str
    max_output_tokens: int
    contains: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EvalResult:
    model: str
    eval_set_sha256: str
    cases: int
    passed: int

    @property
    def score_percent(self) -> int:
        return 100 * self.passed // self.cases

    def view(self) -> dict:
        return {
            "model": self.model,
            "eval_set_sha256": self.eval_set_sha256,
            "cases": self.cases,
            "passed": self.passed,
            "score_percent": self.score_percent,
        }


def load_eval_set(path: Path = EVAL_SET_PATH) -> tuple[str, list[EvalCase]]:
    """(the set's SHA-256, its cases)."""
    raw = path.read_bytes()
    cases = [
        EvalCase(case["id"], case["input"], int(case["max_output_tokens"]), tuple(case.get("contains", ())))
        for case in json.loads(raw)["cases"]
    ]
    assert 1 <= len(cases) <= EVAL_CASES_MAX, "an evaluation set holds 1 to EVAL_CASES_MAX cases"
    return hashlib.sha256(raw).hexdigest(), cases


class EvalGate:
    def __init__(
        self,
        settings: GatewaySettings,
        router: ModelRouter,
        session_factory: async_sessionmaker[AsyncSession],
        wall_clock_ms: Callable[[], int],
    ) -> None:
        self.settings = settings
        self.router = router
        self._sessions = session_factory
        self.wall_clock_ms = wall_clock_ms
        self.tenant = TenantIdentity(settings.eval_tenant_id, settings.tier_default)

    async def _passes(self, model: str, case: EvalCase) -> bool:
        spec = self.settings.models[model]
        messages = [{"role": "user", "content": case.input}]
        built = build_prompt(
            spec, None, [], messages, case.max_output_tokens, "disabled", self.settings.prompt_chars_max
        )
        prepared = PreparedRequest(
            chat=True,
            model=model,
            prompt=built.prompt,
            prompt_tokens=built.prompt_tokens,
            max_tokens=built.max_tokens,
            stop=(spec.template.stop,),
            temperature=0.0,
            top_p=1.0,
            seed=0,
            stream=False,
            include_usage=False,
        )
        service = self.router.completions_for(model)
        try:
            generation = await service.start(self.tenant, prepared, new_request_id(), monotonic_ms())
        except (ApiError, Rejection) as error:
            logger.warning("eval case %s on %s was not served: %s", case.id, model, error)
            return False
        text = []
        try:
            async for tokens, end in generation.relay():
                text.extend(token.text for token in tokens)
                if end is not None and type(end) is not DoneEvent:
                    return False
        except (WorkerFailed, BudgetExhausted):
            return False
        finally:
            await generation.settle()
        answer = "".join(text).lower()
        produced = generation.completion_tokens > 0
        return produced and (not case.contains or any(want.lower() in answer for want in case.contains))

    async def evaluate(self, model: str) -> EvalResult:
        """Run the set on `model` and store the result with it."""
        digest, cases = load_eval_set()
        passed = 0
        for case in cases:
            passed += await self._passes(model, case)
        result = EvalResult(model, digest, len(cases), passed)
        values = {"cases": result.cases, "passed": result.passed, "evaluated_at_ms": self.wall_clock_ms()}
        async with self._sessions() as session, session.begin():
            await session.execute(
                insert(ModelEval)
                .values(model=model, eval_set_sha256=digest, **values)
                .on_conflict_do_update(
                    index_elements=[ModelEval.model, ModelEval.eval_set_sha256], set_=values
                )
            )
        logger.info("eval of %s: %d of %d cases passed", model, passed, len(cases))
        return result

    async def stored(self, models: list[str]) -> list[EvalResult]:
        """The stored results of these versions on the current set."""
        digest, _cases = load_eval_set()
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ModelEval).where(ModelEval.model.in_(models), ModelEval.eval_set_sha256 == digest)
            )
            return [EvalResult(row.model, digest, row.cases, row.passed) for row in rows]

    async def check(self, stable_model: str, canary_model: str) -> tuple[bool, EvalResult, EvalResult]:
        """(whether the canary may be promoted, the stable result, the canary result)."""
        stable = await self.evaluate(stable_model)
        canary = await self.evaluate(canary_model)
        allowed = canary.score_percent >= stable.score_percent - self.settings.eval_margin_percent
        return allowed, stable, canary
