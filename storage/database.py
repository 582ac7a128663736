"""PostgreSQL access: settings, the embedded server, engines, sessions, and start-up migrations.

The database is `DATABASE_URL` when set. Otherwise an embedded PostgreSQL is started from the
`pgserver` package in `TOLLGATE_EMBEDDED_DATA_DIR` (kept between runs). psycopg 3 is the driver for
both the sync engine (Alembic, scripts) and the async engine (gateway, projector).

Running as root: postgres refuses to run as root, so `pgserver` creates a system user named
`pgserver` (with `useradd`), chowns the data directory to it, opens read/traverse permissions on the
data directory's parents and on its bundled binaries, and runs `initdb`/`pg_ctl` as that user
(`subprocess.run(..., user="pgserver")`). The server listens on a Unix socket only, in the data
directory (or a short runtime directory when that path is too long for a socket name).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
ISOLATION_LEVEL = "READ COMMITTED"  # every writer here uses unique keys and ON CONFLICT, not read skew


class DatabaseSettings(BaseSettings):
    """Where the database is and how hard to try reaching it. Environment prefix `TOLLGATE_`."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",  # the one name every PostgreSQL tool and platform already sets
        description="PostgreSQL URL (postgresql://...); unset: an embedded server in embedded_data_dir",
    )
    embedded_data_dir: Path = Path(".tollgate/pgdata")  # used only when no database_url is set
    connect_attempts_max: int = Field(default=30, ge=1)  # tries to reach the database at start-up
    connect_retry_interval_ms: int = Field(default=1_000, ge=1)  # wait between those tries
    connect_timeout_ms: int = Field(default=5_000, ge=1_000)  # one connection attempt
    statement_timeout_ms: int = Field(default=30_000, ge=1)  # any one SQL statement (server side)
    pool_size_max: int = Field(default=10, ge=1)  # connections kept open per process
    pool_overflow_max: int = Field(default=5, ge=0)  # extra connections under load, closed when idle
    pool_timeout_ms: int = Field(default=10_000, ge=1)  # waiting for a free pooled connection


class DatabaseUnavailable(RuntimeError):
    """The database did not answer within the configured number of attempts."""


def start_embedded_postgres(data_dir: Path, *, delete_on_exit: bool = False) -> str:
    """Start (or reuse) an embedded PostgreSQL in `data_dir` and return its libpq URL.

    The server is stopped when this process exits; with `delete_on_exit` the data directory is
    removed too (tests). `data_dir`'s parent must exist; `data_dir` is created when missing.
    """
    import pgserver  # imported here: it starts nothing on import, but pulls in psutil and platformdirs

    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode="delete" if delete_on_exit else "stop")
    url = server.get_uri()
    logger.info("embedded postgres running in %s at %s", data_dir, url)
    return url


def resolve_database_url(settings: DatabaseSettings) -> str:
    """`DATABASE_URL` when set, else the URL of the embedded server (started if needed)."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings.embedded_data_dir)


def sqlalchemy_url(url: str) -> str:
    """A libpq-style URL (postgres://, postgresql://) as a SQLAlchemy URL that selects psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ValueError(f"database URL must be a postgresql:// URL, got driver {parsed.drivername!r}")


def libpq_url(url: str) -> str:
    """The URL as psycopg.connect() takes it (no SQLAlchemy driver suffix)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _connect_args(settings: DatabaseSettings) -> dict[str, object]:
    return {
        "connect_timeout": max(1, settings.connect_timeout_ms // 1000),
        "options": f"-c statement_timeout={settings.statement_timeout_ms}",
    }


def build_async_engine(url: str, settings: DatabaseSettings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(url),
        isolation_level=ISOLATION_LEVEL,
        pool_size=settings.pool_size_max,
        max_overflow=settings.pool_overflow_max,
        pool_timeout=settings.pool_timeout_ms / 1000,
        pool_pre_ping=True,
        connect_args=_connect_args(settings),
    )


def build_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (handlers return them after committing)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def wait_for_database(url: str, settings: DatabaseSettings) -> None:
    """Block until the database answers `SELECT 1`, at most `connect_attempts_max` tries."""
    last_error: Exception | None = None
    for attempt in range(1, settings.connect_attempts_max + 1):
        try:
            with psycopg.connect(
                libpq_url(url), connect_timeout=max(1, settings.connect_timeout_ms // 1000), autocommit=True
            ) as connection:
                connection.execute("SELECT 1")
            return
        except psycopg.OperationalError as error:
            last_error = error
            logger.warning(
                "database not ready (attempt %d/%d): %s", attempt, settings.connect_attempts_max, error
            )
            if attempt < settings.connect_attempts_max:
                time.sleep(settings.connect_retry_interval_ms / 1000)
    raise DatabaseUnavailable(
        f"database did not answer after {settings.connect_attempts_max} attempts: {last_error}"
    )


def alembic_config(url: str) -> Config:
    """An Alembic config for this package's migrations against `url` (independent of the cwd)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "heads") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def prepare_database(settings: DatabaseSettings) -> str:
    """Start-up step: find the database, wait for it (bounded), migrate it to head; return its URL."""
    url = resolve_database_url(settings)
    wait_for_database(url, settings)
    upgrade_database(url)
    return url
