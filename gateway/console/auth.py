"""Console sign-in: an admin credential (the bootstrap token or a named one, gateway.admin.principals)
posted once in a form, then a signed session cookie (gateway.console.signing): HttpOnly, SameSite=Strict,
Secure outside development, path /console. The credential itself is never kept nor put in a URL.

CSRF: every console form carries a token bound to the session (HMAC of the session's nonce); the sign-in
form, before there is a session, a double-submit token (a random cookie that the form repeats).
A named credential revoked after sign-in stops the session at its next request (checked each time).
"""

from __future__ import annotations

import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response
from sqlalchemy import select

from gateway.admin.principals import BOOTSTRAP_NAME, OPERATOR, Principal
from gateway.console.runtime import ConsoleRuntime, SignInRequired, console_runtime
from gateway.console.signing import SESSION, Refused
from storage.audit import AdminCredential

SESSION_COOKIE = "tollgate_console"
PRE_SIGN_IN_COOKIE = "tollgate_console_pre"
COOKIE_PATH = "/console"
FORM_BYTES_MAX = 16_384


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    principal: Principal
    nonce: str
    csrf: str

    @property
    def may_change(self) -> bool:
        return self.principal.role == OPERATOR


Runtime = Annotated[ConsoleRuntime, Depends(console_runtime)]


async def current_session(request: Request, runtime: Runtime) -> ConsoleSession:
    token = request.cookies.get(SESSION_COOKIE)
    if token is None:
        raise SignInRequired()
    try:
        payload = runtime.signer.verify(SESSION, token, runtime.clock_ms())
    except Refused:
        raise SignInRequired() from None
    principal = Principal(str(payload["sub"]), str(payload["role"]))
    if principal.name != BOOTSTRAP_NAME and not await _still_valid(request, principal):
        raise SignInRequired()
    nonce = str(payload["n"])
    return ConsoleSession(principal, nonce, runtime.signer.csrf_token(nonce))


async def _still_valid(request: Request, principal: Principal) -> bool:
    async with request.app.state.session_factory() as session:
        row = (
            await session.execute(
                select(AdminCredential.role, AdminCredential.revoked_at_ms).where(
                    AdminCredential.name == principal.name
                )
            )
        ).one_or_none()
    return row is not None and row.revoked_at_ms is None and row.role == principal.role


SignedIn = Annotated[ConsoleSession, Depends(current_session)]


def start_session(runtime: ConsoleRuntime, response: Response, principal: Principal) -> None:
    ttl_ms = runtime.settings.session_ttl_s * 1000
    payload = {
        "sub": principal.name,
        "role": principal.role,
        "n": secrets.token_urlsafe(16),
        "exp": runtime.clock_ms() + ttl_ms,
    }
    response.set_cookie(
        SESSION_COOKIE,
        runtime.signer.sign(SESSION, payload),
        max_age=runtime.settings.session_ttl_s,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=runtime.secure_cookies,
    )
    response.delete_cookie(PRE_SIGN_IN_COOKIE, path=COOKIE_PATH)


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def set_pre_sign_in(runtime: ConsoleRuntime, response: Response, token: str) -> None:
    """The sign-in form's double-submit CSRF token, as a cookie the form repeats."""
    response.set_cookie(
        PRE_SIGN_IN_COOKIE,
        token,
        max_age=3600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=runtime.secure_cookies,
    )


async def form_of(request: Request) -> dict[str, str]:
    """The urlencoded form (one value per field); a 413 beyond FORM_BYTES_MAX."""
    body = await request.body()
    if len(body) > FORM_BYTES_MAX:
        raise HTTPException(413, "form too large")
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


async def checked_form(request: Request, signed_in: ConsoleSession, *, change: bool = True) -> dict[str, str]:
    """A console form whose CSRF token is the session's; a 403 otherwise, or when a read-only (finance)
    session posts a change."""
    form = await form_of(request)
    if not secrets.compare_digest(form.get("csrf", "").encode(), signed_in.csrf.encode()):
        raise HTTPException(403, "the form's CSRF token is missing or not this session's")
    if change and not signed_in.may_change:
        raise HTTPException(
            403, f"{signed_in.principal.name} has the {signed_in.principal.role} role: read-only"
        )
    return form
