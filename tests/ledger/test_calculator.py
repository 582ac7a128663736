from __future__ import annotations

import pytest

from ledger.calculator import CreditCalculator
from ledger.events import InvalidEvent


def balances(calls, times):
    calculator = CreditCalculator()
    for name, kwargs in calls:
        getattr(calculator, name)(**kwargs)
    return {t: calculator.get_balance(timestamp=t) for t in times}


def g(grant_id, amount, timestamp, expiration_timestamp):
    return (
        "create_grant",
        dict(
            grant_id=grant_id, amount=amount, timestamp=timestamp, expiration_timestamp=expiration_timestamp
        ),
    )


def s(amount, timestamp):
    return ("subtract", dict(amount=amount, timestamp=timestamp))


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        ([s(1, 30), g("a", 1, 10, 100)], {10: 1, 30: 0, 20: 1}),
        ([s(1, 30), g("a", 2, 10, 100)], {10: 2, 20: 2, 30: 1, 100: 0}),
        ([g("a", 3, 10, 60), g("b", 2, 20, 40), s(1, 30), s(3, 50)], {10: 3, 20: 5, 30: 4, 40: 3, 50: 0}),
        ([g("a", 3, 10, 60), g("b", 2, 20, 80), s(4, 30)], {10: 3, 20: 5, 30: 1, 70: 1}),
    ],
    ids=["late-grant-covers-usage", "partial-cover", "two-blocks-soonest-first", "spill-into-second-block"],
)
def test_public_cases(calls, expected):
    assert balances(calls, expected) == expected


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_public_case_three_in_every_rotation(order):
    calls = [g("a", 3, 10, 60), g("b", 2, 20, 40), s(1, 30), s(3, 50)]
    rotated = calls[order:] + calls[:order]
    assert balances(rotated, [10, 20, 30, 40, 50]) == {10: 3, 20: 5, 30: 4, 40: 3, 50: 0}


def test_never_expiring_grant_and_overage():
    calculator = CreditCalculator()
    calculator.create_grant(grant_id="a", amount=5, timestamp=0, expiration_timestamp=None)
    calculator.subtract(amount=7, timestamp=10)
    assert calculator.get_balance(timestamp=10**12) == 0
    assert calculator.get_overage(timestamp=10) == 2


def test_many_subtracts_inside_one_block_answer_every_point():
    calculator = CreditCalculator()
    calculator.subtract(amount=2, timestamp=20)
    calculator.create_grant(grant_id="a", amount=10, timestamp=0, expiration_timestamp=100)
    calculator.subtract(amount=1, timestamp=10)
    assert [calculator.get_balance(timestamp=t) for t in (5, 10, 15, 20, 99, 100)] == [10, 9, 9, 7, 7, 0]


@pytest.mark.parametrize(
    "call",
    [g("a", 0, 10, 20), g("a", 5, 10, 10), g("a", -1, 10, None), s(-1, 10)],
)
def test_bad_input_is_rejected(call):
    calculator = CreditCalculator()
    with pytest.raises(InvalidEvent):
        getattr(calculator, call[0])(**call[1])
