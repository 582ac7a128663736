"""Old import path of the database access, kept only for gateway.__main__, tollgate.cli and tollgate.dev
until they import `storage.database` (their owners change those lines); new code imports `storage.database`."""

from storage.database import DatabaseSettings, build_async_engine, build_session_factory, prepare_database

__all__ = ["DatabaseSettings", "build_async_engine", "build_session_factory", "prepare_database"]
