"""ledger.pricing: the one price computation (estimate, settle and usage all call it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ledger.pricing import Price, usage_amount

PRICE = Price(prompt_token_credits=3, completion_token_credits=7, cached_prompt_token_credits=1)


def test_amount_prices_uncached_prompt_cached_prompt_and_completion_tokens():
    assert usage_amount(PRICE, 10, 4) == 10 * 3 + 4 * 7
    assert usage_amount(PRICE, 10, 4, cached_prompt_tokens=6) == 4 * 3 + 6 * 1 + 4 * 7
    assert usage_amount(PRICE, 0, 0) == 0


@pytest.mark.parametrize(("prompt", "completion", "cached"), [(-1, 0, 0), (0, -1, 0), (1, 0, -1), (1, 0, 2)])
def test_impossible_counts_are_programmer_errors(prompt, completion, cached):
    with pytest.raises(AssertionError):
        usage_amount(PRICE, prompt, completion, cached)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_token_credits": -1, "completion_token_credits": 1},
        {"prompt_token_credits": 1, "completion_token_credits": -1},
        {"prompt_token_credits": 1, "completion_token_credits": 1, "cached_prompt_token_credits": -1},
        {"prompt_token_credits": 1.0, "completion_token_credits": 1},
    ],
)
def test_a_negative_or_fractional_price_is_refused(fields):
    with pytest.raises(ValueError):
        Price(**fields)


def test_pricing_is_pure():
    """No I/O: the module imports only the standard library's dataclasses (and __future__)."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / "ledger" / "pricing.py").read_text())
    imported = {
        node.module.split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "dataclasses"}, imported


def test_no_other_module_computes_a_price():
    """The estimate, the settle and the usage event call ledger.pricing; nothing multiplies credits
    elsewhere."""
    
    
    root = Path(__file__).resolve().parents[2]
    for package in ("gateway", "inference", "streams", "tollgate", "bench"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "_token_credits *" not in text and "* price." not in text, path
            assert "def usage_amount" not in text, path
