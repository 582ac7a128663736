"""Database settings and start-up: URL handling, the bounded wait, and migrate-on-start."""

import pytest

from storage.database import (
    DatabaseSettings,
    DatabaseUnavailable,
    libpq_url,
    prepare_database,
    sqlalchemy_url,
    wait_for_database,
)
from tests.storage.test_migrations import EXPECTED_TABLES, table_names


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/tollgate", "postgresql+psycopg://u:p@db:5432/tollgate"),
        ("postgres://u:p@db/tollgate", "postgresql+psycopg://u:p@db/tollgate"),
        ("postgresql+psycopg://u@/t?host=/tmp/sock", "postgresql+psycopg://u@/t?host=%2Ftmp%2Fsock"),
    ],
)
def test_urls_select_psycopg_3(given, expected):
    assert sqlalchemy_url(given) == expected
    assert libpq_url(given).startswith("postgresql://")


def test_other_drivers_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="postgresql://"):
        sqlalchemy_url("mysql://u@db/t")


def test_database_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db/t")
    assert DatabaseSettings().database_url == "postgresql://u@db/t"


def test_wait_gives_up_after_the_configured_attempts(tmp_path):
    settings = DatabaseSettings(connect_attempts_max=2, connect_retry_interval_ms=1, connect_timeout_ms=1_000)
    with pytest.raises(DatabaseUnavailable, match="after 2 attempts"):
        wait_for_database(f"postgresql://postgres@/postgres?host={tmp_path}", settings)


@pytest.mark.postgres
def test_prepare_database_waits_then_migrates_to_head(empty_database_url):
    url = prepare_database(DatabaseSettings(database_url=empty_database_url))

    assert url == empty_database_url
    assert table_names(url) == EXPECTED_TABLES | {"alembic_version"}
    prepare_database(DatabaseSettings(database_url=empty_database_url))  # again: nothing to do
