"""Audit routes of the admin API: the checkpoint signing key, and an entry's inclusion proof.

    GET /admin/v1/audit/public-key                              the Ed25519 key that signs checkpoints
    GET /admin/v1/tenants/{id}/entries/{entry_id}/proof          the entry, its RFC 6962 audit path up to
                                                                 the signed checkpoint that covers it, and
                                                                 that checkpoint

An entry id holds slashes (`acme/usage/req-1`): it is the rest of the path before `/proof`. A proof is
checked offline with `scripts/verify_proof.py` (the standard library and `cryptography` only): the
entry's bytes hash to its link, the audit path leads from that hash to the checkpoint's Merkle root,
and the checkpoint is signed by the key (README, "Audit").
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from sqlalchemy import select
from starlette.convertors import Convertor, register_url_convertor

from gateway.admin.deps import Identifier, Sessions, TenantIdPath, require_admin
from gateway.admin.errors import ERROR_RESPONSES, AdminError, AdminRoute
from ledger.chain import inclusion_proof
from storage.audit import LedgerCheckpoint
from storage.projections import LedgerEntry
from streams.audit_checkpoints import AuditSettings, key_id, load_signing_key, public_key_pem, raw_public_key


class _RestOfPath(Convertor):
    """Everything up to the route's next literal part, slashes and line breaks included. Starlette's `path`
    stops at a line break, so an entry id holding one fell through to the unknown-URL 404 instead of
    reaching the route's validation (a 4xx naming `entry_id`)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("rest", _RestOfPath())

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    route_class=AdminRoute,
    dependencies=[Depends(require_admin)],
    responses=ERROR_RESPONSES,
)


class PublicKeyView(BaseModel):
    algorithm: str
    key_id: str  # hex SHA-256 of the raw public key: what each checkpoint names
    public_key: str  # hex, the raw 32 bytes
    public_key_pem: str


class ProofView(BaseModel):
    tenant_id: str
    entry_id: str
    sequence: int
    entry: str  # the entry exactly as published on ledger.entries (UTF-8 JSON text)
    leaf_index: int  # its position among the checkpoint's entries (sequence - first_sequence)
    tree_size: int
    audit_path: list[str]  # hex hashes, RFC 6962 PATH, nearest the leaf first
    checkpoint: str  # the signed checkpoint exactly as published on ledger.checkpoints
    key_id: str


@lru_cache(maxsize=4)
def _public_key(path: Path) -> PublicKeyView:
    key = load_signing_key(path).public_key()
    return PublicKeyView(
        algorithm="Ed25519",
        key_id=key_id(key),
        public_key=raw_public_key(key).hex(),
        public_key_pem=public_key_pem(key),
    )


def audit_public_key() -> PublicKeyView:
    return _public_key(AuditSettings().signing_key_path)


PublicKey = Annotated[PublicKeyView, Depends(audit_public_key)]


@router.get("/audit/public-key", response_model=PublicKeyView)
async def get_public_key(key: PublicKey) -> PublicKeyView:
    return key


@router.get("/tenants/{tenant_id}/entries/{entry_id:rest}/proof", response_model=ProofView)
async def get_proof(
    tenant_id: TenantIdPath, entry_id: Identifier, sessions: Sessions, key: PublicKey
) -> ProofView:
    async with sessions() as session:
        entry = (
            await session.execute(
                select(LedgerEntry).where(
                    LedgerEntry.tenant_id == tenant_id, LedgerEntry.entry_id == entry_id
                )
            )
        ).scalar_one_or_none()
        if entry is None or entry.chain_sequence is None:
            raise AdminError(404, "entry_id", f"no chained entry {entry_id!r} of tenant {tenant_id!r}")
        checkpoint = (
            await session.execute(
                select(LedgerCheckpoint).where(
                    LedgerCheckpoint.tenant_id == tenant_id,
                    LedgerCheckpoint.first_sequence <= entry.chain_sequence,
                    LedgerCheckpoint.last_sequence >= entry.chain_sequence,
                )
            )
        ).scalar_one_or_none()
        if checkpoint is None:
            raise AdminError(
                409, "entry_id", f"entry {entry_id!r} is not yet covered by a signed checkpoint; retry later"
            )
        hashes = (
            await session.execute(
                select(LedgerEntry.chain_sequence, LedgerEntry.chain_hash)
                .where(
                    LedgerEntry.tenant_id == tenant_id,
                    LedgerEntry.chain_sequence.between(checkpoint.first_sequence, checkpoint.last_sequence),
                )
                .order_by(LedgerEntry.chain_sequence)
            )
        ).all()
    size = checkpoint.last_sequence - checkpoint.first_sequence + 1
    if [sequence for sequence, _ in hashes] != list(
        range(checkpoint.first_sequence, checkpoint.last_sequence + 1)
    ):
        raise AdminError(
            409, "entry_id", "the projection lacks entries of the checkpoint: run tollgate audit verify"
        )
    index = entry.chain_sequence - checkpoint.first_sequence
    path = inclusion_proof([bytes.fromhex(h) for _, h in hashes], index)
    return ProofView(
        tenant_id=tenant_id,
        entry_id=entry_id,
        sequence=entry.chain_sequence,
        entry=entry.record.decode(),
        leaf_index=index,
        tree_size=size,
        audit_path=[node.hex() for node in path],
        checkpoint=checkpoint.record.decode(),
        key_id=key.key_id,
    )
