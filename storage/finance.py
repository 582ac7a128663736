"""Finance's projection: every entry's movements (ledger.statement.movements), one row each, written by
the projector with the entry; statements sum them in SQL. And the queries statements and exports run."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Index, Integer, Text, and_, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from ledger.statement import GrantTerms, Movement, OverageRate, Statement, Sum, build_statement
from storage.base import Base
from storage.projections import LedgerEntry
from storage.tenants import Tenant


class LedgerMovement(Base):
    """One movement of one entry: what it did to the prepaid balance (credits) and to deferred money, in
    the section and period it is booked in. Unique on (entry_id, row); entries replayed are no-ops."""

    __tablename__ = "ledger_movements"

    entry_id: Mapped[str] = mapped_column(Text, primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    booked_at_ms: Mapped[int] = mapped_column(BigInteger)
    own_time_ms: Mapped[int] = mapped_column(BigInteger)
    section: Mapped[str] = mapped_column(Text)
    adjustment: Mapped[bool] = mapped_column(Boolean)
    model: Mapped[str] = mapped_column(Text)
    grant_id: Mapped[str] = mapped_column(Text)
    credits: Mapped[int] = mapped_column(BigInteger)
    money: Mapped[int] = mapped_column(BigInteger)
    overage: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    # Of prompt_tokens, those served from a prefix cache (0 on rows written before migration 0012).
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cause_event_id: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index(None, "tenant_id", "booked_at_ms"), Index(None, "booked_at_ms"))


class LedgerMovementDay(Base):
    """ledger_movements summed per tenant, UTC day of booking, section, model and grant: what statements
    read for whole days (the projector adds each movement once, when its row is first inserted)."""

    __tablename__ = "ledger_movement_days"

    tenant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    day: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # booked_at_ms // DAY_MS
    section: Mapped[str] = mapped_column(Text, primary_key=True)
    model: Mapped[str] = mapped_column(Text, primary_key=True)
    grant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    credits: Mapped[int] = mapped_column(BigInteger)
    money: Mapped[int] = mapped_column(BigInteger)
    overage: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")


class GrantTermsRow(Base):
    """Each grant's money terms as the fold accepted them (its GrantRecorded entry)."""

    __tablename__ = "grant_terms"

    grant_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text, index=True)
    category: Mapped[str] = mapped_column(Text)
    price: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text)
    terms: Mapped[dict] = mapped_column(JSONB)  # the GrantRecorded entry as written
    models: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default="{}")  # empty: any (0013)


def movement_values(tenant_id: str, rows) -> list[dict]:
    """ledger.statement.Movement rows -> ledger_movements values."""
    return [
        {
            "entry_id": m.entry_id,
            "row": number,
            "tenant_id": tenant_id,
            "booked_at_ms": m.booked_at,
            "own_time_ms": m.own_time,
            "section": m.section,
            "adjustment": m.section.startswith("adjustment:"),
            "model": m.model,
            "grant_id": m.grant_id,
            "credits": m.credits,
            "money": m.money,
            "overage": m.overage,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "cached_prompt_tokens": m.cached_prompt_tokens,
            "cause_event_id": m.cause_event_id,
        }
        for number, m in enumerate(rows)
    ]


DAY_MS = 86_400_000
SUMMED = ("credits", "money", "overage", "prompt_tokens", "completion_tokens", "cached_prompt_tokens")
GROUPED = ("section", "model", "grant_id")
# Rows per INSERT: 16 parameters each stays under the driver's 32,767 parameters per statement.
MOVEMENT_ROWS_PER_STATEMENT_MAX = 2_000


def entry_finance_columns(rows: list[dict]) -> dict:
    """The finance columns of an entry's ledger_entries row, from its movement rows."""
    return {
        "booked_at_ms": rows[0]["booked_at_ms"],
        "credits": sum(row["credits"] for row in rows),
        "money": sum(row["money"] for row in rows),
        "model": rows[0]["model"] or None,
        "adjustment": rows[0]["adjustment"],
    }


async def write_movements(session: AsyncSession, rows: list[dict]) -> None:
    """Insert movement rows (a repeat is a no-op) and add the new ones to their days, in one statement per
    chunk: INSERT ... ON CONFLICT DO NOTHING RETURNING feeds the days' upsert."""
    m, d = LedgerMovement, LedgerMovementDay
    for first in range(0, len(rows), MOVEMENT_ROWS_PER_STATEMENT_MAX):
        chunk = rows[first : first + MOVEMENT_ROWS_PER_STATEMENT_MAX]
        new = (
            insert(m)
            .values(chunk)
            .on_conflict_do_nothing()
            .returning(m.tenant_id, m.booked_at_ms, *(m.__table__.c[c] for c in GROUPED + SUMMED))
            .cte("new")
        )
        day = new.c.booked_at_ms // DAY_MS
        summed = select(
            new.c.tenant_id, day, *(new.c[c] for c in GROUPED), *(func.sum(new.c[c]) for c in SUMMED)
        ).group_by(new.c.tenant_id, day, *(new.c[c] for c in GROUPED))
        upsert = insert(d).from_select(["tenant_id", "day", *GROUPED, *SUMMED], summed)
        await session.execute(
            upsert.on_conflict_do_update(
                index_elements=["tenant_id", "day", *GROUPED],
                set_={c: d.__table__.c[c] + upsert.excluded[c] for c in SUMMED},
            )
        )


def grant_terms_values(entry, payload: dict) -> dict:
    """A GrantRecorded entry -> grant_terms values."""
    return {
        "grant_id": entry.grant_id,
        "tenant_id": entry.tenant_id,
        "category": entry.category,
        "price": entry.price,
        "currency": entry.currency,
        "reference": entry.reference,
        "terms": payload,
        "models": list(entry.models),
    }


async def movement_sums(
    session: AsyncSession, tenant_id: str, start: int, end: int, as_known_at_ms: int | None = None
) -> list[Sum]:
    """(before start?, section, model, grant_id, credits, money, overage, prompt, completion, cached prompt)
    summed over the tenant's rows booked before `end`: ledger.statement.sum_movements in SQL. Whole UTC
    days come from ledger_movement_days, the partial days at the edges from ledger_movements. With K
    (`as_known_at_ms`), only the movements of entries published by K, all from ledger_movements (the daily
    sums do not know when their rows were published)."""
    totals: dict[tuple, list[int]] = {}
    for before, (low, high) in ((True, (0, start)), (False, (start, end))):
        for row in await _range_sums(session, tenant_id, low, high, as_known_at_ms):
            acc = totals.setdefault((before, *row[:3]), [0] * len(SUMMED))
            for index, value in enumerate(row[3:]):
                acc[index] += int(value)
    return [Sum(*key, *values) for key, values in sorted(totals.items())]


def _known_by(tenant_id: str, as_known_at_ms: int | None):
    """Movements whose entry ledger.entries had accepted by K (its knowledge time; README "Audit")."""
    if as_known_at_ms is None:
        return true()
    known = select(LedgerEntry.entry_id).where(
        LedgerEntry.tenant_id == tenant_id,
        func.coalesce(LedgerEntry.known_at_ms, LedgerEntry.recorded_at_ms) <= as_known_at_ms,
    )
    return LedgerMovement.entry_id.in_(known)


async def _range_sums(
    session: AsyncSession, tenant_id: str, low: int, high: int, as_known_at_ms: int | None
) -> list:
    if low >= high:
        return []
    m, d = LedgerMovement, LedgerMovementDay
    first_day, end_day = -(-low // DAY_MS), high // DAY_MS  # the whole days inside [low, high)
    if first_day >= end_day or as_known_at_ms is not None:
        edges = [(low, high)]
        rows = []
    else:
        edges = [(low, first_day * DAY_MS), (end_day * DAY_MS, high)]
        days = (
            select(*(d.__table__.c[c] for c in GROUPED), *(func.sum(d.__table__.c[c]) for c in SUMMED))
            .where(and_(d.tenant_id == tenant_id, d.day >= first_day, d.day < end_day))
            .group_by(*(d.__table__.c[c] for c in GROUPED))
        )
        rows = list((await session.execute(days)).all())
    known = _known_by(tenant_id, as_known_at_ms)
    for edge_low, edge_high in edges:
        if edge_low >= edge_high:
            continue
        raw = (
            select(*(m.__table__.c[c] for c in GROUPED), *(func.sum(m.__table__.c[c]) for c in SUMMED))
            .where(
                and_(m.tenant_id == tenant_id, m.booked_at_ms >= edge_low, m.booked_at_ms < edge_high, known)
            )
            .group_by(*(m.__table__.c[c] for c in GROUPED))
        )
        rows += (await session.execute(raw)).all()
    return rows


async def adjustment_rows(
    session: AsyncSession, tenant_id: str, start: int, end: int, as_known_at_ms: int | None = None
) -> list[LedgerMovement]:
    m = LedgerMovement
    in_period = and_(m.tenant_id == tenant_id, m.adjustment, m.booked_at_ms >= start, m.booked_at_ms < end)
    query = (
        select(m)
        .where(in_period, _known_by(tenant_id, as_known_at_ms))
        .order_by(m.booked_at_ms, m.entry_id, m.row)
    )
    return list((await session.execute(query)).scalars())


async def grant_terms_of(session: AsyncSession, tenant_id: str) -> list[GrantTermsRow]:
    query = select(GrantTermsRow).where(GrantTermsRow.tenant_id == tenant_id)
    return list((await session.execute(query)).scalars())


async def overage_rate_of(session: AsyncSession, tenant_id: str) -> tuple[int, str] | None:
    query = select(Tenant.overage_rate_per_million_credits, Tenant.overage_currency).where(
        Tenant.tenant_id == tenant_id
    )
    row = (await session.execute(query)).first()
    if row is None or row[0] is None:
        return None
    return int(row[0]), row[1]


async def tenant_statement(
    session: AsyncSession, tenant_id: str, start: int, end: int, as_known_at_ms: int | None = None
) -> Statement:
    """The statement of [start, end): sums in SQL, assembled by ledger.statement.build_statement. With K,
    the statement as the books stood at K: built from the entries published by then."""
    sums = await movement_sums(session, tenant_id, start, end, as_known_at_ms)
    adjustments = [
        Movement(
            r.booked_at_ms,
            r.section,
            r.model,
            r.grant_id,
            r.credits,
            r.money,
            r.overage,
            r.prompt_tokens,
            r.completion_tokens,
            r.cached_prompt_tokens,
            r.entry_id,
            r.cause_event_id,
            r.own_time_ms,
        )
        for r in await adjustment_rows(session, tenant_id, start, end, as_known_at_ms)
    ]
    grants = {
        g.grant_id: GrantTerms(g.category, g.price or 0, g.currency)
        for g in await grant_terms_of(session, tenant_id)
    }
    rate = await overage_rate_of(session, tenant_id)
    return build_statement(
        tenant_id, start, end, sums, adjustments, grants, None if rate is None else OverageRate(*rate)
    )


# ------------------------------------------------------------------------------------------- exports
# Bulk reads for `tollgate export`, as COPY ... TO STDOUT (CSV): Postgres writes the rows, pyarrow parses
# them; no Python object per row. Parameters: the window [%(start)s, %(end)s) of booked time.

ENTRIES_EXPORT_SQL = """
SELECT sequence, entry_id, tenant_id, entry_type, occurred_at_ms, booked_at_ms, amount, credits, money, model,
       adjustment
FROM ledger_entries WHERE booked_at_ms >= {start} AND booked_at_ms < {end}
"""  # unordered: the exporter sorts by sequence in pyarrow (a million-row ORDER BY spills to disk here)

REVENUE_EXPORT_SQL = """
SELECT m.tenant_id, m.booked_at_ms / 86400000 AS day, m.model, g.currency, m.adjustment,
       -sum(m.credits) AS credits, -sum(m.money) AS revenue, sum(m.overage) AS overage,
       sum(m.prompt_tokens) AS prompt_tokens, sum(m.completion_tokens) AS completion_tokens,
       sum(m.cached_prompt_tokens) AS cached_prompt_tokens
FROM ledger_movements AS m LEFT JOIN grant_terms AS g ON g.grant_id = m.grant_id AND g.category = 'paid'
WHERE m.section IN ('consumption', 'adjustment:consumption')
  AND m.booked_at_ms >= {start} AND m.booked_at_ms < {end}
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
"""


def export_sql(template: str, start: int, end: int) -> str:
    """The COPY statement of an export query for [start, end) (integers, formatted, not interpolated text)."""
    return (
        f"COPY ({template.format(start=int(start), end=int(end))}) TO STDOUT WITH (FORMAT csv, HEADER true)"
    )


async def tenants_with_movements(session: AsyncSession, start: int, end: int) -> list[str]:
    m = LedgerMovement
    query = select(m.tenant_id).where(m.booked_at_ms < end).distinct().order_by(m.tenant_id)
    return list((await session.execute(query)).scalars())
