"""Alembic environment. The URL is the one the caller set (storage.database.alembic_config), else the
one from settings: DATABASE_URL, or the embedded PostgreSQL started in TOLLGATE_EMBEDDED_DATA_DIR."""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from migrations.models import TARGET_METADATA
from storage.database import ISOLATION_LEVEL, DatabaseSettings, resolve_database_url, sqlalchemy_url

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = TARGET_METADATA


def database_url() -> str:
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    return sqlalchemy_url(resolve_database_url(DatabaseSettings()))


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        compare_type=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool, isolation_level=ISOLATION_LEVEL)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
