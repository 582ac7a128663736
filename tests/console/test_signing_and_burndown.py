"""The pure parts: signed tokens (purpose, expiry, tampering) and the burn-down's arithmetic."""

from __future__ import annotations

import pytest

from gateway.console import burndown
from gateway.console.signing import PORTAL, SESSION, Refused, Signer, signer_for


def test_a_token_verifies_for_its_purpose_until_it_expires_and_not_once_altered():
    signer = Signer(b"k" * 32)
    token = signer.sign(PORTAL, {"t": "tn_a", "exp": 2_000})
    assert signer.verify(PORTAL, token, 1_999) == {"t": "tn_a", "exp": 2_000}
    with pytest.raises(Refused, match="expired"):
        signer.verify(PORTAL, token, 2_000)
    with pytest.raises(Refused, match="altered"):
        signer.verify(SESSION, token, 0)  # another purpose's key
    with pytest.raises(Refused, match="altered"):
        Signer(b"x" * 32).verify(PORTAL, token, 0)
    body, mac = token.split(".")
    forged = signer.sign(PORTAL, {"t": "tn_b", "exp": 2_000}).split(".")[0]
    with pytest.raises(Refused, match="altered"):
        signer.verify(PORTAL, f"{forged}.{mac}", 0)
    with pytest.raises(Refused, match="malformed"):
        signer.verify(PORTAL, "no-dot", 0)


def test_without_a_secret_the_key_derives_from_the_admin_token():
    assert signer_for(None, "token-a") == signer_for(None, "token-a") != signer_for(None, "token-b")
    assert signer_for("configured", "token-a").secret == b"configured"


def test_csrf_tokens_are_bound_to_the_session():
    signer = Signer(b"k" * 32)
    assert signer.csrf_ok("nonce-1", signer.csrf_token("nonce-1"))
    assert not signer.csrf_ok("nonce-2", signer.csrf_token("nonce-1"))


def test_each_blocks_series_is_the_running_sum_of_its_movements_at_each_point():
    blocks = [
        burndown.Block("g1", 1_000, 0, 50_000, None, "paid"),
        burndown.Block("g2", 500, 40_000, None, 60_000, "promotional"),
    ]
    axis = burndown.axis_for(blocks, now_ms=100_000, width_px=11, points_max=800)
    assert axis.points == 11 and axis.times_ms() == list(range(0, 100_001, 10_000))
    assert axis.first_point_at_or_after(0) == 0 and axis.first_point_at_or_after(10_000) == 1
    assert axis.first_point_at_or_after(10_001) == 2
    movements = [
        ("g1", 0, 1_000),
        ("g1", 15_000, -300),
        ("g1", 50_000, -700),
        ("g2", 40_000, 500),
        ("g2", 60_000, -500),
    ]
    deltas: dict = {}
    for grant_id, at, credits in movements:
        key = (grant_id, axis.first_point_at_or_after(at))
        deltas[key] = deltas.get(key, 0) + credits
    series = burndown.block_series(axis, blocks, deltas)
    assert series["g1"] == [1_000, 1_000, 700, 700, 700, 0, 0, 0, 0, 0, 0]
    assert series["g2"] == [0, 0, 0, 0, 500, 500, 0, 0, 0, 0, 0]
    later = burndown.Block("g3", 10, 0, 100_001, None, "paid")  # expires after now: counted until then
    assert burndown.block_series(axis, [later], {("g3", 0): 10})["g3"] == [10] * 11
    chart = burndown.chart(axis, blocks, series, burndown.project(0, 0, 1_000, 100_000))
    assert {(m["kind"], m["grant_id"]) for m in chart["markers"]} == {("expiry", "g1"), ("void", "g2")}
    assert chart["remaining_total"] == 0 and chart["projection"]["runs_out_at"] is None


def test_the_chart_never_has_more_points_than_its_width_nor_than_the_setting():
    blocks = [burndown.Block("g", 1, 0, None, None, "paid")]
    assert burndown.axis_for(blocks, 10**9, width_px=300, points_max=800).points == 300
    assert burndown.axis_for(blocks, 10**9, width_px=5_000, points_max=800).points == 800
    assert burndown.axis_for(blocks, 10**9, width_px=0, points_max=800).points == burndown.POINTS_MIN


def test_the_projection_carries_the_recent_burn_rate_forward():
    day = 86_400_000
    projection = burndown.project(remaining=9_000, consumed_in_window=3_000, window_ms=day, now_ms=10 * day)
    assert projection.burn_per_day == 3_000 and projection.runs_out_at_ms == 13 * day
    assert burndown.project(9_000, 0, day, 0).runs_out_at_ms is None
