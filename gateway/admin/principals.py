"""Who calls the admin API: the bootstrap token or a named credential, and its role (gateway.admin.credentials
creates them)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from storage.audit import ADMIN_ROLES, AdminCredential

CREDENTIAL_SCHEME = "tga_"
SECRET_BYTES = 32
PRESENTED_LENGTH_MAX = 128
BOOTSTRAP_NAME = "bootstrap"
OPERATOR, FINANCE = ADMIN_ROLES
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a credential's name and role."""

    name: str
    role: str

    def may(self, method: str) -> bool:
        return self.role == OPERATOR or method in READ_ONLY_METHODS


def hash_credential(presented: str) -> bytes:
    return hashlib.sha256(presented.encode("utf-8")).digest()


async def authenticate(
    presented: str, bootstrap_token: bytes, sessions: async_sessionmaker
) -> Principal | None:
    """The principal behind a bearer token: the bootstrap token (constant-time compare, no database), or
    a named credential that exists and is not revoked; else None."""
    if hmac.compare_digest(presented.encode(), bootstrap_token):
        return Principal(BOOTSTRAP_NAME, OPERATOR)
    if not presented.startswith(CREDENTIAL_SCHEME) or len(presented) > PRESENTED_LENGTH_MAX:
        return None
    async with sessions() as session:
        row = (
            await session.execute(
                select(AdminCredential).where(AdminCredential.secret_hash == hash_credential(presented))
            )
        ).scalar_one_or_none()
    if row is None or row.revoked_at_ms is not None:
        return None
    return Principal(row.name, row.role)
