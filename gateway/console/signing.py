"""Signed, expiring tokens: console sessions, CSRF tokens and tenant portal links.

A token is `base64url(JSON payload) "." base64url(HMAC-SHA256(key, purpose "|" payload))`, the standard
library's `hmac` (what itsdangerous does, without the dependency); compared with `hmac.compare_digest`.
Each purpose signs with its own key, derived from the signing secret, so a portal link never passes as a
session cookie and the other way round. The payload carries `exp` (epoch ms); an expired token is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

SESSION, CSRF, PORTAL = "console-session", "console-csrf", "tenant-portal"
TOKEN_LENGTH_MAX = 2_048


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Refused(Exception):
    """A token that is malformed, altered, for another purpose, or expired; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Signer:
    secret: bytes

    def key(self, purpose: str) -> bytes:
        return hmac.new(self.secret, f"tollgate {purpose}".encode(), hashlib.sha256).digest()

    def mac(self, purpose: str, message: bytes) -> str:
        return _b64(hmac.new(self.key(purpose), message, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict) -> str:
        assert "exp" in payload, "every signed token expires"
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self.mac(purpose, body.encode())}"

    def verify(self, purpose: str, token: str, now_ms: int) -> dict:
        """The payload of a token this signer made for `purpose` that has not expired; else Refused."""
        if len(token) > TOKEN_LENGTH_MAX or token.count(".") != 1:
            raise Refused("malformed")
        body, mac = token.split(".")
        if not hmac.compare_digest(mac.encode(), self.mac(purpose, body.encode()).encode()):
            raise Refused("altered or not ours")
        try:
            payload = json.loads(_unb64(body))
        except ValueError:
            raise Refused("malformed") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int):
            raise Refused("malformed")
        if payload["exp"] <= now_ms:
            raise Refused("expired")
        return payload

    def csrf_token(self, session_nonce: str) -> str:
        """The CSRF token bound to one session (its nonce): a form must carry it."""
        return self.mac(CSRF, session_nonce.encode())

    def csrf_ok(self, session_nonce: str, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.csrf_token(session_nonce).encode())


def signer_for(signing_secret: str | None, admin_token: str) -> Signer:
    """The configured secret, else one derived from the admin token (every gateway derives the same)."""
    if signing_secret is not None:
        return Signer(signing_secret.encode())
    return Signer(hmac.new(admin_token.encode(), b"tollgate console signing", hashlib.sha256).digest())
