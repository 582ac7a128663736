"""The admin API fixtures (a real Postgres, a recording publisher, a settable clock) for finance tests."""

from tests.admin.conftest import admin_app, client, clock, publisher, tenant_id  # noqa: F401
