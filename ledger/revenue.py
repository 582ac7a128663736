"""Revenue recognition of a paid grant, in integers, with cumulative rounding.

Once `consumed` of a grant's `amount` credits are consumed, `recognised(price, amount, consumed)` =
floor(price * consumed / amount) of its price is recognised. Every movement of credits into or out of
consumption carries `moved(...)`, the difference it makes, so the money on a grant's entries always sums
to the recognised figure of its total consumption and nothing is lost to rounding. The remainder of a
grant that ends (forfeit or void) carries price - recognised(consumed): the grant is then fully accounted:

    recognised + breakage + voided + deferred == price

A promotional grant's price is 0 here: it moves credits and no money.
"""

from __future__ import annotations


def recognised(price: int, amount: int, consumed: int) -> int:
    """The money recognised once `consumed` of `amount` credits bought for `price` are consumed."""
    assert 0 <= consumed <= amount, f"consumed {consumed} of {amount}"
    return price * consumed // amount


def moved(price: int, amount: int, before: int, after: int) -> int:
    """The money a change of consumption from `before` to `after` recognises (negative: un-recognises)."""
    if not price:
        return 0
    return price * after // amount - price * before // amount


def check_grant_money(grant_id: str, price: int, recognised_money: int, ended: int, deferred: int) -> None:
    """The identity that holds for every paid grant at every time: recognised + ended (breakage or voided)
    + deferred == price, each part non-negative; raises AssertionError."""
    parts = f"recognised {recognised_money} + ended {ended} + deferred {deferred}"
    assert recognised_money >= 0 and ended >= 0 and deferred >= 0, f"{grant_id}: {parts}: a negative part"
    assert recognised_money + ended + deferred == price, f"{grant_id}: {parts} != price {price}"
