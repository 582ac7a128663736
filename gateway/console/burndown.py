"""The burn-down of a tenant's credit blocks, computed on the server (no I/O here: data.py reads the rows).

Each block's remaining credit at time t is the sum of its movements (storage.finance.LedgerMovement: the
grant's +amount, each allocation's -credits, corrections, the forfeit at expiry or void) whose own time is
at or before t: the fold's own arithmetic, read back from the projection. The chart gets `points` evenly
spaced times from the first block's start to now, so every series has at most `points` values (the chart's
width in pixels): data.py sums the movements into those buckets in SQL, and `block_series` runs the sums.

The projection: the recent burn rate (credits consumed in the last `window_ms`) carried forward from the
credit left now; "at this rate the credit runs out on" the time it reaches zero.
"""

from __future__ import annotations

from dataclasses import dataclass

POINTS_MIN = 2
PROJECTION_MIN_MS = 60_000  # the projection reaches ahead as far as the history reaches back, at least this


@dataclass(frozen=True, slots=True)
class Block:
    grant_id: str
    amount: int
    effective_at_ms: int
    expires_at_ms: int | None
    voided_at_ms: int | None
    category: str


@dataclass(frozen=True, slots=True)
class Axis:
    """`points` times t0 + i * step_ms (i = 0 .. points - 2), then `now_ms` (at or before t0 + the last
    step: the step is the span over the intervals, rounded up to a whole millisecond)."""

    t0_ms: int
    now_ms: int
    points: int

    @property
    def step_ms(self) -> int:
        return -(-max(self.now_ms - self.t0_ms, 1) // (self.points - 1))

    def times_ms(self) -> list[int]:
        return [self.t0_ms + i * self.step_ms for i in range(self.points - 1)] + [self.now_ms]

    def first_point_at_or_after(self, t_ms: int) -> int:
        """The index of the first point whose time is >= t (a movement at t counts from there on)."""
        if t_ms <= self.t0_ms:
            return 0
        return min(self.points - 1, -(-(t_ms - self.t0_ms) // self.step_ms))


def axis_for(blocks: list[Block], now_ms: int, width_px: int, points_max: int) -> Axis:
    t0 = min((b.effective_at_ms for b in blocks), default=now_ms)
    points = max(POINTS_MIN, min(width_px, points_max))
    return Axis(min(t0, now_ms - 1), now_ms, points)


def block_series(axis: Axis, blocks: list[Block], deltas: dict[tuple[str, int], int]) -> dict[str, list[int]]:
    """Each block's remaining credit at each point: the running sum of its movements summed per point
    (`deltas[(grant_id, point index)]`, index as Axis.first_point_at_or_after), and 0 from its expiry or
    void on, as the fold counts it (its forfeit entry may come later, after the grace period)."""
    series = {}
    for block in blocks:
        ends = [t for t in (block.expires_at_ms, block.voided_at_ms) if t is not None and t <= axis.now_ms]
        end_index = axis.first_point_at_or_after(min(ends)) if ends else axis.points
        running, values = 0, []
        for index in range(axis.points):
            running += deltas.get((block.grant_id, index), 0)
            values.append(running if index < end_index else 0)
        series[block.grant_id] = values
    return series


@dataclass(frozen=True, slots=True)
class Projection:
    burn_per_day: int  # credits consumed per day over the recent window
    remaining: int  # credit left now, every block together
    runs_out_at_ms: int | None  # None: nothing consumed lately (or nothing left)


def project(remaining: int, consumed_in_window: int, window_ms: int, now_ms: int) -> Projection:
    assert window_ms > 0 and consumed_in_window >= 0, (window_ms, consumed_in_window)
    per_day = consumed_in_window * 86_400_000 // window_ms
    if consumed_in_window == 0 or remaining <= 0:
        return Projection(per_day, remaining, None)
    return Projection(per_day, remaining, now_ms + remaining * window_ms // consumed_in_window)


def chart(axis: Axis, blocks: list[Block], series: dict[str, list[int]], projection: Projection) -> dict:
    """The chart's JSON: uPlot's x in seconds, one series per block (the page stacks them), the expiry and
    void markers, the now line and the projected line from now to the run-out time or as far ahead as the
    history reaches back, whichever is nearer (so "now" sits at the middle of the chart at most)."""
    horizon_ms = axis.now_ms + max(axis.now_ms - axis.t0_ms, PROJECTION_MIN_MS)
    end_ms = horizon_ms if projection.runs_out_at_ms is None else min(projection.runs_out_at_ms, horizon_ms)
    left_at_end = projection.remaining
    if projection.runs_out_at_ms is not None:
        span = projection.runs_out_at_ms - axis.now_ms
        left_at_end = max(
            0, projection.remaining - projection.remaining * (end_ms - axis.now_ms) // max(span, 1)
        )
    markers = [
        {"t": at // 1000, "kind": kind, "grant_id": b.grant_id}
        for b in blocks
        for kind, at in (("expiry", b.expires_at_ms), ("void", b.voided_at_ms))
        if at is not None
    ]
    return {
        "x": [t // 1000 for t in axis.times_ms()],
        "series": [
            {"grant_id": b.grant_id, "category": b.category, "values": series[b.grant_id]} for b in blocks
        ],
        "markers": markers,
        "now": axis.now_ms // 1000,
        "projection": {
            "x": [axis.now_ms // 1000, end_ms // 1000],
            "y": [projection.remaining, left_at_end],
            "runs_out_at": None if projection.runs_out_at_ms is None else projection.runs_out_at_ms // 1000,
            "burn_per_day": projection.burn_per_day,
        },
        "remaining_total": sum(values[-1] for values in series.values()),
        "points": axis.points,
    }
