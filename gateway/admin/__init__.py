"""The admin API (tenants, keys, grants, balances, entries), mounted by the gateway app."""

from gateway.admin.publisher import EventPublisher
from gateway.admin.router import build_admin_router, router
from gateway.admin.settings import AdminSettings, resolve_admin_token

__all__ = ["AdminSettings", "EventPublisher", "build_admin_router", "resolve_admin_token", "router"]
