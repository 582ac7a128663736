"""The shared secret between the gateway and its inference workers: one setting, read by both.

A worker serves `/internal/v1/*` only to a caller that sends `Authorization: Bearer <token>`, where the
token is `TOLLGATE_INTERNAL_TOKEN` (at least INTERNAL_TOKEN_CHARS_MIN characters). Without it anyone who
can reach a worker's port could generate for free, or bill any tenant by naming its id. The gateway
sends `authorization_header(token)` on every call; the worker checks it with `token_matches`, which
compares in constant time so the answer's timing tells nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

INTERNAL_TOKEN_CHARS_MIN = 32
INTERNAL_TOKEN_VARIABLE = "TOLLGATE_INTERNAL_TOKEN"  # the environment variable that holds it
BEARER_PREFIX = b"Bearer "


class InternalTokenMissing(ValueError):
    """No usable internal token is configured; the message says which variable to set."""


class InternalAuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_INTERNAL_")

    token: SecretStr | None = None  # TOLLGATE_INTERNAL_TOKEN: the gateway <-> worker shared secret

    def required_token(self) -> str:
        """The token, or InternalTokenMissing when it is absent or too short to be a secret."""
        if self.token is None:
            raise InternalTokenMissing(
                f"{INTERNAL_TOKEN_VARIABLE} is not set: the gateway and its workers need a shared secret "
                f"of at least {INTERNAL_TOKEN_CHARS_MIN} characters (e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))')"
            )
        token = self.token.get_secret_value()
        check_token(token)
        return token


def check_token(token: str) -> None:
    """Raise InternalTokenMissing unless `token` is long enough to be a shared secret."""
    if len(token) < INTERNAL_TOKEN_CHARS_MIN:
        raise InternalTokenMissing(
            f"{INTERNAL_TOKEN_VARIABLE} has {len(token)} characters; it needs at least {INTERNAL_TOKEN_CHARS_MIN}"  # noqa: E501
        )


def authorization_header(token: str) -> bytes:
    """The Authorization header value the gateway sends to a worker."""
    return BEARER_PREFIX + token.encode()


def token_matches(expected: str, presented_header: str | None) -> bool:
    """Whether an Authorization header carries `expected` as its bearer token (constant-time compare)."""
    if presented_header is None:
        return False
    return hmac.compare_digest(
        presented_header.encode("utf-8", "surrogateescape"), authorization_header(expected)
    )
