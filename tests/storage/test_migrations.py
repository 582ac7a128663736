"""Alembic migrations against real PostgreSQL: up from empty, down to empty, and the models agree."""

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from migrations.models import TARGET_METADATA, managed_table_names
from storage.database import alembic_config, downgrade_database, sqlalchemy_url, upgrade_database

pytestmark = pytest.mark.postgres

LEDGER_TABLES = {
    "tenants",
    "api_keys",
    "grants",
    "ledger_events",
    "ledger_entries",
    "balances",
    "projector_offsets",
}
EXPECTED_TABLES = managed_table_names()  # the ledger's and every other module's


def table_names(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {name for (name,) in rows}


def current_revision(url: str) -> str | None:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    engine.dispose()
    return revision


def test_upgrade_from_empty_then_downgrade_to_empty_then_upgrade_again(empty_database_url):
    head = ScriptDirectory.from_config(alembic_config(empty_database_url)).get_current_head()

    upgrade_database(empty_database_url)
    assert LEDGER_TABLES <= EXPECTED_TABLES
    assert table_names(empty_database_url) == EXPECTED_TABLES | {"alembic_version"}
    assert current_revision(empty_database_url) == head

    downgrade_database(empty_database_url, "base")
    assert table_names(empty_database_url) == {"alembic_version"}
    assert current_revision(empty_database_url) is None

    upgrade_database(empty_database_url)
    assert current_revision(empty_database_url) == head


def test_migrated_schema_matches_the_models(database_url):
    engine = create_engine(sqlalchemy_url(database_url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, TARGET_METADATA)
    engine.dispose()
    assert differences == []


def test_ledger_tables_refuse_update_and_delete(database_url):
    with psycopg.connect(database_url) as connection:
        connection.execute(
            "INSERT INTO ledger_entries (entry_id, tenant_id, entry_type, payload, source_topic,"
            " source_partition, source_offset, recorded_at_ms) VALUES ('e1', 't1', 'x', '{}', 'topic', 0, 0, 0)"  # noqa: E501
        )
        connection.commit()
        for statement in ("UPDATE ledger_entries SET amount = 1", "DELETE FROM ledger_entries"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                connection.execute(statement)
            connection.rollback()
        assert connection.execute("SELECT count(*) FROM ledger_entries").fetchone() == (1,)


def test_grant_constraints_refuse_bad_rows(database_url):
    with psycopg.connect(database_url) as connection:
        connection.execute("INSERT INTO tenants VALUES ('t1', 'Acme', 'free', 0)")
        insert = (
            "INSERT INTO grants (grant_id, tenant_id, event_id, amount, effective_at_ms, expires_at_ms, priority,"  # noqa: E501
            " idempotency_key, request_sha256, created_at_ms) VALUES (%s, 't1', %s, %s, 10, %s, 0, %s, %s, 0)"
        )
        digest = b"\x00" * 32
        with pytest.raises(psycopg.errors.CheckViolation, match="amount_positive"):
            connection.execute(insert, ("g1", "e1", 0, None, "k1", digest))
        connection.rollback()
        connection.execute("INSERT INTO tenants VALUES ('t1', 'Acme', 'free', 0)")
        with pytest.raises(psycopg.errors.CheckViolation, match="expiry_after_effective"):
            connection.execute(insert, ("g1", "e1", 5, 10, "k1", digest))
