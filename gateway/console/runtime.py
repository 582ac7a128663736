"""What every console and portal request needs, bound once to the app (`app.state.console`), and the
route class that puts the security headers on every page."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.admin.settings import AdminSettings
from gateway.console.overview import RateMeter
from gateway.console.settings import ConsoleSettings
from gateway.console.signing import Signer

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR, STATIC_DIR = PACKAGE_DIR / "templates", PACKAGE_DIR / "static"
STATE = "console"

# No inline script or style anywhere: scripts and styles come from /console/static only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a portal link's token never leaves in a Referer
    "Cache-Control": "no-store",
}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _templates() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR), autoescape=select_autoescape(default=True), auto_reload=False
    )
    environment.filters["credits"] = lambda value: "—" if value is None else f"{int(value):,}"
    environment.filters["signed"] = lambda value: f"{int(value):+,}"
    environment.filters["utc"] = _utc
    environment.filters["money"] = lambda minor, currency: (
        "—" if minor is None else f"{minor / 100:,.2f} {currency or ''}".strip()
    )
    return environment


def _utc(ms: int | None) -> str:
    if ms is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


@dataclass
class ConsoleRuntime:
    settings: ConsoleSettings
    admin_settings: AdminSettings
    admin_token: str
    signer: Signer
    worker_urls: list[str]
    clock_ms: Callable[[], int] = wall_clock_ms
    templates: Environment = field(default_factory=_templates)
    rate: RateMeter = field(default_factory=RateMeter)

    @property
    def secure_cookies(self) -> bool:
        """Secure outside development (`tollgate dev` runs plain HTTP on loopback)."""
        return self.settings.environment != "development"

    def render(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**context), status_code=status_code)


def console_runtime(request: Request) -> ConsoleRuntime:
    runtime = getattr(request.app.state, STATE, None)
    assert runtime is not None, "the console is mounted through gateway.console.mount.mount_console"
    return runtime


class SignInRequired(Exception):
    """No valid console session: the browser goes to the sign-in page."""


class PortalRefused(Exception):
    """No valid portal session or link: a 403 page saying why."""

    MESSAGES = {
        "expired": "This portal link has expired. Ask your provider for a new one.",
        "missing": "Open the portal with the link your provider sent you.",
    }

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = self.MESSAGES.get(
            reason, "This portal link is not valid: it was altered or is not one of ours."
        )


class ConsoleRoute(APIRoute):
    """Every console and portal response carries the security headers; a request without a session is sent
    to the sign-in page (an htmx request through HX-Redirect, so a fragment never shows the form)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired:
                if request.headers.get("hx-request"):
                    response = Response(status_code=204, headers={"HX-Redirect": "/console/sign-in"})
                else:
                    response = RedirectResponse("/console/sign-in", status_code=303)
            except StarletteHTTPException as error:  # a refused form or an unknown tenant: a page, not JSON
                response = console_runtime(request).render(
                    "message.html",
                    error.status_code,
                    session=None,
                    title="Not done",
                    message=error.detail,
                    back="",
                )
            except PortalRefused as refused:
                response = console_runtime(request).render(
                    "portal_refused.html", 403, session=None, message=refused.message
                )
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return handle
