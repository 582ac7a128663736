"""A tenant's statement for a period, from its ledger entries, in credits and in money. Pure.

Two steps, so a store can do the middle one in SQL:
1. `movements(entry)`: what one entry does to the books, as rows (booked_at, section, model, grant_id,
   credits, money, overage, prompt_tokens, completion_tokens, cached_prompt_tokens). credits and money
   are the change to the prepaid balance and to deferred money (negative: out). The one place an entry
   is classified.
2. Sum the rows by (when: before the period or in it, section, model, grant_id): `Totals`. Entries
   booked as adjustments (booked_at set: their own time is in a closed period) form the ADJUSTMENT
   section and are also listed one by one.
3. `build_statement(...)`: the statement from those sums and the grants' terms.

A statement ties out: opening + granted - consumed - expired - voided + adjustments == closing, in credits
and in deferred money per currency (`check_ties_out`, asserted on every statement built).
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from ledger.entries import (
    AllocationCorrected,
    CreditVoided,
    EndCorrected,
    Entry,
    GrantRecorded,
    UsageAllocated,
    expired_entry_id,
)
from ledger.events import CreditExpired

GRANT = "grant"
CONSUMPTION = "consumption"
EXPIRY = "expiry"
VOID = "void"
ADJUSTMENT = "adjustment"
SECTIONS = (GRANT, CONSUMPTION, EXPIRY, VOID, ADJUSTMENT)
CORRECTION_MODEL = ""  # consumption moved by a late grant or void has no model of its own
OVERAGE_RATE_CREDITS = 1_000_000  # an overage rate is money (minor units) per this many credits
NO_TOKENS = (0, 0, 0)  # prompt, completion and cached prompt tokens of a row that is not usage


class Movement(NamedTuple):
    booked_at: int
    section: str
    model: str
    grant_id: str  # "" when no grant is involved (overage)
    credits: int
    money: int
    overage: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # of prompt_tokens, those served from a prefix cache
    entry_id: str
    cause_event_id: str
    own_time: int


def movements(entry: Entry) -> list[Movement]:
    """The rows one entry books. Adjustments keep their section in `ADJUSTMENT` rows."""
    kind = type(entry)
    if kind is UsageAllocated:
        rows = _usage_rows(entry)
    elif kind is AllocationCorrected:
        rows = [(CORRECTION_MODEL, a.grant_id, -a.amount, -a.money, 0, *NO_TOKENS) for a in entry.allocations]
        if entry.overage_delta:
            rows.append((CORRECTION_MODEL, "", 0, 0, entry.overage_delta, *NO_TOKENS))
        return _rows(entry, CONSUMPTION, entry.cause_at, entry.cause_event_id, rows)
    elif kind is GrantRecorded:
        row = ("", entry.grant_id, entry.amount, entry.price or 0, 0, *NO_TOKENS)
        return _rows(entry, GRANT, entry.effective_at, entry.event_id, [row])
    elif kind is CreditExpired:
        row = ("", entry.grant_id, -entry.amount, -entry.money, 0, *NO_TOKENS)
        return _rows(entry, EXPIRY, entry.expired_at, entry.event_id, [row])
    elif kind is CreditVoided:
        row = ("", entry.grant_id, -entry.amount, -entry.money, 0, *NO_TOKENS)
        return _rows(entry, VOID, entry.voided_at, entry.entry_id, [row])
    elif kind is EndCorrected:
        section = EXPIRY if entry.corrects == expired_entry_id(entry.tenant_id, entry.grant_id) else VOID
        row = ("", entry.grant_id, -entry.delta, -entry.money_delta, 0, *NO_TOKENS)
        return _rows(entry, section, entry.cause_at, entry.cause_event_id, [row])
    else:
        raise AssertionError(f"an entry type statements do not know: {kind.__name__}")
    return _rows(entry, CONSUMPTION, entry.occurred_at, entry.event_id, rows)


def _usage_rows(entry: UsageAllocated) -> list[tuple]:
    rows = [(entry.model, a.grant_id, -a.amount, -a.money, 0, *NO_TOKENS) for a in entry.allocations]
    tokens = (
        entry.model,
        "",
        0,
        0,
        entry.overage,
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.cached_prompt_tokens,
    )
    if rows:  # tokens and overage on the first row: one row for the common single-grant usage
        rows[0] = rows[0][:4] + tokens[4:]
        return rows
    return [tokens]


def _rows(entry, section: str, own_time: int, cause: str, rows: list[tuple]) -> list[Movement]:
    booked_at = entry.booked_at
    if booked_at is None:
        booked_at = own_time
    elif booked_at != own_time:
        section = ADJUSTMENT + ":" + section
    return [Movement(booked_at, section, *row, entry.entry_id, cause, own_time) for row in rows]


class GrantTerms(NamedTuple):
    category: str
    price: int
    currency: str | None


class Sum(NamedTuple):
    """Summed movement rows of one (before the period?, section, model, grant_id)."""

    before: bool
    section: str
    model: str
    grant_id: str
    credits: int
    money: int
    overage: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


def sum_movements(rows, start: int, end: int) -> list[Sum]:
    """Group rows booked before `end` by (before start?, section, model, grant_id). What a store does in
    SQL; this is the same sum in Python, for the pure path and the tests."""
    totals: dict[tuple, list[int]] = {}
    for row in rows:
        if row.booked_at >= end:
            continue
        key = (row.booked_at < start, row.section, row.model, row.grant_id)
        acc = totals.setdefault(key, [0, 0, 0, 0, 0, 0])
        acc[0] += row.credits
        acc[1] += row.money
        acc[2] += row.overage
        acc[3] += row.prompt_tokens
        acc[4] += row.completion_tokens
        acc[5] += row.cached_prompt_tokens
    return [Sum(*key, *values) for key, values in sorted(totals.items())]


# ------------------------------------------------------------------------------------------ statement


class Money(msgspec.Struct, frozen=True, array_like=True):
    currency: str
    amount: int


class Balance(msgspec.Struct, frozen=True):
    credits: int
    deferred: list[Money]


class Line(msgspec.Struct, frozen=True):
    """One line of a section: credits (positive) and money per currency."""

    key: str  # category for grants, model for consumption, "" otherwise
    credits: int
    money: list[Money]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those served from a prefix cache


class Overage(msgspec.Struct, frozen=True):
    credits: int
    priced: int | None  # None: the tenant has no overage rate (reported, not priced)
    currency: str | None


class Adjustment(msgspec.Struct, frozen=True):
    entry_id: str
    cause_event_id: str  # the late event
    section: str
    own_time: int  # in the closed period it belongs to
    booked_at: int  # the close: the first open period
    credits: int  # change to the balance
    money: list[Money]  # change to deferred money


class Statement(msgspec.Struct, frozen=True):
    tenant_id: str
    period_start: int
    period_end: int
    opening: Balance
    grants: list[Line]
    consumption: list[Line]
    expiries: Line
    voids: Line
    overage: Overage
    adjustments: list[Adjustment]
    adjustments_total: Line
    closing: Balance


class OverageRate(NamedTuple):
    money_per_million_credits: int
    currency: str


def build_statement(
    tenant_id: str,
    start: int,
    end: int,
    sums: list[Sum],
    adjustment_rows: list[Movement],
    grants: dict[str, GrantTerms],
    overage_rate: OverageRate | None,
) -> Statement:
    """The statement of [start, end) from the sums of its movements (sum_movements or a store's SQL)."""
    assert start <= end, f"statement window reversed: {start} > {end}"
    opening_credits, opening_money = 0, {}
    lines: dict[tuple[str, str], list] = {}
    overage = 0
    for s in sums:
        currency = _currency(grants, s.grant_id)
        if s.before:
            opening_credits += s.credits
            _add(opening_money, currency, s.money)
            continue
        section = s.section
        key = grants[s.grant_id].category if section == GRANT else s.model if section == CONSUMPTION else ""
        line = lines.setdefault((section, key), [0, {}, 0, 0, 0])
        sign = 1 if section == GRANT or section.startswith(ADJUSTMENT) else -1
        line[0] += sign * s.credits
        _add(line[1], currency, sign * s.money)
        line[2] += s.prompt_tokens
        line[3] += s.completion_tokens
        line[4] += s.cached_prompt_tokens
        if section == CONSUMPTION:
            overage += s.overage
    adjustments = [
        Adjustment(
            row.entry_id,
            row.cause_event_id,
            row.section.removeprefix(ADJUSTMENT + ":"),
            row.own_time,
            row.booked_at,
            row.credits,
            _money({_currency(grants, row.grant_id): row.money} if row.money else {}),
        )
        for row in sorted(adjustment_rows, key=lambda row: (row.booked_at, row.entry_id))  # stable: row order
    ]
    adjustment_total = _merged(lines, lambda section: section.startswith(ADJUSTMENT), "")
    statement = Statement(
        tenant_id=tenant_id,
        period_start=start,
        period_end=end,
        opening=Balance(opening_credits, _money(opening_money)),
        grants=_section(lines, GRANT),
        consumption=_section(lines, CONSUMPTION),
        expiries=_merged(lines, lambda section: section == EXPIRY, ""),
        voids=_merged(lines, lambda section: section == VOID, ""),
        overage=_priced_overage(overage, overage_rate),
        adjustments=adjustments,
        adjustments_total=adjustment_total,
        closing=_closing(opening_credits, opening_money, lines),
    )
    check_ties_out(statement)
    return statement


def _closing(opening_credits: int, opening_money: dict, lines: dict) -> Balance:
    credits, money = opening_credits, dict(opening_money)
    for (section, _), (line_credits, line_money, *_tokens) in lines.items():
        sign = 1 if section == GRANT or section.startswith(ADJUSTMENT) else -1
        credits += sign * line_credits
        for currency, amount in line_money.items():
            _add(money, currency, sign * amount)
    return Balance(credits, _money(money))


def check_ties_out(statement: Statement) -> None:
    """opening + granted - consumed - expired - voided + adjustments == closing, in credits and per
    currency in deferred money; raises AssertionError."""
    credits = statement.opening.credits
    money = {m.currency: m.amount for m in statement.opening.deferred}
    for line, sign in (
        *((line, 1) for line in statement.grants),
        *((line, -1) for line in statement.consumption),
        (statement.expiries, -1),
        (statement.voids, -1),
        (statement.adjustments_total, 1),
    ):
        credits += sign * line.credits
        for m in line.money:
            _add(money, m.currency, sign * m.amount)
    assert credits == statement.closing.credits, f"credits: {credits} != closing {statement.closing.credits}"
    assert _money(money) == statement.closing.deferred, f"deferred: {money} != {statement.closing.deferred}"


def _priced_overage(credits: int, rate: OverageRate | None) -> Overage:
    if rate is None:
        return Overage(credits, None, None)
    return Overage(credits, credits * rate.money_per_million_credits // OVERAGE_RATE_CREDITS, rate.currency)


def _section(lines: dict, section: str) -> list[Line]:
    return [
        Line(key, credits, _money(money), *tokens)
        for (s, key), (credits, money, *tokens) in sorted(lines.items())
        if s == section
    ]


def _merged(lines: dict, wanted, key: str) -> Line:
    credits, money = 0, {}
    for (section, _), (line_credits, line_money, *_tokens) in lines.items():
        if wanted(section):
            credits += line_credits
            for currency, amount in line_money.items():
                _add(money, currency, amount)
    return Line(key, credits, _money(money))


def _currency(grants: dict[str, GrantTerms], grant_id: str) -> str | None:
    terms = grants.get(grant_id)
    return None if terms is None or terms.category != "paid" else terms.currency


def _add(money: dict, currency: str | None, amount: int) -> None:
    if currency is not None:
        money[currency] = money.get(currency, 0) + amount


def _money(money: dict) -> list[Money]:
    return [Money(currency, amount) for currency, amount in sorted(money.items())]


def grant_terms(entries) -> dict[str, GrantTerms]:
    return {
        e.grant_id: GrantTerms(e.category, e.price or 0, e.currency)
        for e in entries
        if type(e) is GrantRecorded
    }


def statement_of_entries(
    tenant_id: str, entries: list[Entry], start: int, end: int, overage_rate: OverageRate | None = None
) -> Statement:
    """The whole pure path: entries -> movements -> sums -> statement."""
    rows = [row for entry in entries for row in movements(entry)]
    adjustment_rows = [r for r in rows if start <= r.booked_at < end and r.section.startswith(ADJUSTMENT)]
    return build_statement(
        tenant_id,
        start,
        end,
        sum_movements(rows, start, end),
        adjustment_rows,
        grant_terms(entries),
        overage_rate,
    )


_encoder = msgspec.json.Encoder()


def encode_statement(statement: Statement) -> bytes:
    return _encoder.encode(statement)


class StatementLine(NamedTuple):
    """One row of a statement in long form (CSV and exports): credits once per line, money per currency;
    a consumption line's tokens on its credits row (None elsewhere)."""

    section: str  # opening, grants, consumption, expiries, voids, overage, adjustments, closing
    key: str  # the category of grants, the model of consumption, an adjustment's entry id
    credits: int | None
    currency: str | None
    money: int | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None  # of prompt_tokens, those served from a prefix cache


def statement_lines(statement: Statement) -> list[StatementLine]:
    lines: list[StatementLine] = []

    def add(section: str, key: str, credits: int, money: list[Money], tokens: tuple = ()) -> None:
        lines.append(StatementLine(section, key, credits, None, None, *tokens))
        lines.extend(StatementLine(section, key, None, m.currency, m.amount) for m in money)

    add("opening", "", statement.opening.credits, statement.opening.deferred)
    for line in statement.grants:
        add("grants", line.key, line.credits, line.money)
    for line in statement.consumption:
        tokens = (line.prompt_tokens, line.completion_tokens, line.cached_prompt_tokens)
        add("consumption", line.key, line.credits, line.money, tokens)
    add("expiries", "", statement.expiries.credits, statement.expiries.money)
    add("voids", "", statement.voids.credits, statement.voids.money)
    overage = statement.overage
    lines.append(StatementLine("overage", "", overage.credits, overage.currency, overage.priced))
    for adjustment in statement.adjustments:
        add("adjustments", adjustment.entry_id, adjustment.credits, adjustment.money)
    add("closing", "", statement.closing.credits, statement.closing.deferred)
    return lines
