"""Mount the console (/console), its static files (/console/static) and the tenant portal (/portal) on
the gateway app, with the admin API's settings and token."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gateway.admin.settings import AdminSettings
from gateway.console import portal, routes
from gateway.console.runtime import STATE, STATIC_DIR, ConsoleRuntime, wall_clock_ms
from gateway.console.settings import ConsoleSettings
from gateway.console.signing import signer_for


def mount_console(
    app: FastAPI,
    admin_settings: AdminSettings,
    admin_token: str,
    worker_urls: list[str],
    settings: ConsoleSettings | None = None,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> ConsoleRuntime:
    settings = settings or ConsoleSettings()
    secret = None if settings.signing_secret is None else settings.signing_secret.get_secret_value()
    runtime = ConsoleRuntime(
        settings, admin_settings, admin_token, signer_for(secret, admin_token), worker_urls, clock_ms
    )
    setattr(app.state, STATE, runtime)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.include_router(routes.router)
    app.include_router(portal.router)
    return runtime
