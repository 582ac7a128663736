"""Tenant API keys: `tg_<prefix>_<secret>`.

The prefix (12 hex characters) is public: it names the key in logs and admin screens and is the
lookup index. The secret is 32 random bytes (256 bits, URL-safe base64); only its SHA-256 is stored.
A fast hash is the right choice here: slow hashes (scrypt, bcrypt) exist to make guessing
low-entropy passwords expensive, but nobody can enumerate 2**256 random secrets however fast the hash,
and the gateway verifies a key on every request, where a 50 ms KDF would be the bottleneck. Digests
are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.tenants import ApiKey, Tenant

KEY_SCHEME = "tg"
PREFIX_BYTES = 6  # 12 hex characters
SECRET_BYTES = 32  # 256 bits
PRESENTED_KEY_LENGTH_MAX = 128  # a real key is 59 characters; anything longer is refused unhashed


@dataclass(frozen=True)
class GeneratedKey:
    """A new key. `presented` is what the tenant sends; it is shown once and never stored."""

    key_id: str
    prefix: str
    secret: str

    @property
    def presented(self) -> str:
        return f"{KEY_SCHEME}_{self.prefix}_{self.secret}"

    @property
    def secret_sha256(self) -> bytes:
        return hash_secret(self.secret)


def generate_api_key() -> GeneratedKey:
    return GeneratedKey(
        key_id=f"key_{secrets.token_hex(8)}",
        prefix=secrets.token_hex(PREFIX_BYTES),
        secret=secrets.token_urlsafe(SECRET_BYTES),
    )


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def split_presented_key(presented_key: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None. The secret may itself contain '_'."""
    if len(presented_key) > PRESENTED_KEY_LENGTH_MAX:
        return None
    parts = presented_key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        return None
    _, prefix, secret = parts
    if len(prefix) != 2 * PREFIX_BYTES or not secret:
        return None
    return prefix, secret


async def resolve_key(session: AsyncSession, presented_key: str) -> Tenant | None:
    """The tenant owning this key, or None when the key is malformed, unknown, wrong or revoked."""
    resolved = await resolve_api_key(session, presented_key)
    return None if resolved is None else resolved[1]


async def resolve_api_key(session: AsyncSession, presented_key: str) -> tuple[ApiKey, Tenant] | None:
    """The key's row and its tenant, or None when the key is malformed, unknown, wrong or revoked."""
    parts = split_presented_key(presented_key)
    if parts is None:
        return None
    prefix, secret = parts
    row = (
        await session.execute(
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.tenant_id == ApiKey.tenant_id)
            .where(ApiKey.prefix == prefix)
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    api_key, tenant = row
    if not hmac.compare_digest(api_key.secret_sha256, hash_secret(secret)):
        return None
    if api_key.revoked_at_ms is not None:
        return None
    return api_key, tenant
