"""Every table the migrations manage: autogenerate, `alembic check` and the schema tests compare the
database against these. They are all declared in `storage` on one metadata; this module imports nothing
else (no gateway, no streams), so running a migration loads no service code."""

from sqlalchemy import MetaData

from storage import METADATA, managed_table_names

TARGET_METADATA: MetaData = METADATA

__all__ = ["TARGET_METADATA", "managed_table_names"]
