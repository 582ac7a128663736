"""Every table the migrations manage: autogenerate, `alembic check` and the schema tests compare the
database against these. Importing a module that declares tables on `streams.schema.Base` registers
them; a module with its own MetaData adds it to the list. A new table's module goes here too."""

from sqlalchemy import MetaData

import gateway.admission.tables  # noqa: F401  (declares admission_accounts, admission_holds on Base)
from gateway.idempotency import metadata as idempotency_metadata
from streams.schema import Base

TARGET_METADATA: list[MetaData] = [Base.metadata, idempotency_metadata]


def managed_table_names() -> set[str]:
    return {name for metadata in TARGET_METADATA for name in metadata.tables}
