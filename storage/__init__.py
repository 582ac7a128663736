"""Every PostgreSQL table, on one metadata (`storage.base.Base.metadata`), and the database access.

    storage.base        the declarative base and its naming convention
    storage.tenants     command side, written by the admin API: tenants, api_keys, grants
    storage.projections written by the projector from the log, with its offsets in the same
                        transaction: ledger_events, ledger_entries, balances, projector_offsets
    storage.embedded    the embedded event log and the embedded processor's state (`make run`'s
                        single-process mode only; with Kafka they stay empty)
    storage.admission   strict admission's owner row per tenant and its open holds
    storage.idempotency the stored responses of requests sent with an Idempotency-Key
    storage.conversations the Responses and Conversations APIs' stored text; tenants' retention and
                        safety policies
    storage.finance     every entry's movements (statements sum them) and the grants' money terms
    storage.audit       checkpoints of the entries' hash chains, admin credentials, the admin audit log
    storage.webhooks    tenants' webhook endpoints, the alerts' deliveries to them and every attempt
    storage.database    settings, the embedded server, engines, sessions and start-up migrations

One style: every table is a declarative ORM class. Most of the code (the admin API, the projector,
admission) already reads and writes through these classes, their columns are typed (`Mapped[...]`),
and one `Base` carries the naming convention, so a table cannot end up on a metadata of its own. Core
statements (`insert`, `select`, `update`) take the classes' attributes directly where a query wants
Core, and `Class.__table__` is the `Table` where one is needed.

Money is BIGINT credit units; every time is BIGINT epoch milliseconds (`*_at_ms`), like the ledger.
The migrations (`migrations/`) import only this package: `METADATA` is what they compare against, and
importing `storage` registers every table on it. A new table's module is imported below.
"""

from sqlalchemy import MetaData

import storage.audit  # noqa: F401  (registers its tables)
import storage.conversations  # noqa: F401  (registers its tables)
import storage.finance  # noqa: F401  (registers its tables)
import storage.snapshots  # noqa: F401  (registers its table and index)
import storage.webhooks  # noqa: F401  (registers its tables: webhook endpoints and deliveries)
from storage import admission, embedded, idempotency, projections, tenants  # noqa: F401  (register tables)
from storage.base import Base

METADATA: MetaData = Base.metadata


def managed_table_names() -> set[str]:
    return set(METADATA.tables)
