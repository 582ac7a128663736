"""Checkpoint signing for the hash chain (`ledger.chain`): the settings (env TOLLGATE_AUDIT_*), the
Ed25519 key, and the processor's step that links a tenant's new entries and signs its checkpoints.

A checkpoint is taken every `checkpoint_entries_max` entries of a tenant, and at the end of a batch when
`checkpoint_interval_ms` of the tenant's stream time (event time carried by its state, never the wall
clock: a refold or a republication must yield the same bytes) has passed since its previous one. Ed25519
signatures are deterministic (RFC 8032), so a checkpoint signed again is byte-identical; the processor
never signs again anyway: checkpoints ride in the outbox with the entries.

One key signs every checkpoint of a deployment. It is a PKCS#8 PEM file at `signing_key_path`, created
(mode 0600) by the first process that needs it when it does not exist; every processor and gateway must
read the same file (a volume or a secret), and the gateway serves its public key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ledger.chain import ChainState, append_entries, checkpoint_body, signed_record, take_checkpoint
from tollgate.common_settings import CommonSettings

log = logging.getLogger(__name__)


class AuditSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_AUDIT_", extra="ignore")

    checkpoint_entries_max: int = Field(
        default=1_000, ge=1, le=1_000_000, description="a tenant's entries covered by one signed checkpoint"
    )
    checkpoint_interval_ms: int = Field(
        default=60_000,
        ge=1,
        description="a tenant's stream time after which its pending entries get a checkpoint (event time)",
    )
    snapshot_every_events: int = Field(
        default=500,
        ge=16,
        le=1_000_000,
        description="a tenant's input events between two of its point-in-time snapshots (written by the "
        "projector); an as-known-at answer folds at most about this many events on top of one",
    )
    signing_key_path: Path = Field(
        default=Path("var/tollgate/audit/checkpoint-signing-key.pem"),
        description="the Ed25519 checkpoint signing key (PKCS#8 PEM), created when missing; "
        "shared by every processor and gateway",
    )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, created there first when missing (atomically: two processes starting at once
    end up with one key)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        # created 0600: the private key is never readable by others, not even for a moment
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        try:
            os.link(temporary, path)  # fails if another process created it first: theirs is kept
            log.warning("created the checkpoint signing key %s", path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key (TOLLGATE_AUDIT_SIGNING_KEY_PATH)")
    return key


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def key_id(key: Ed25519PublicKey) -> str:
    return sha256(raw_public_key(key)).hexdigest()


@dataclass(frozen=True)
class CheckpointPolicy:
    entries_max: int
    interval_ms: int
    key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_settings(cls, settings: AuditSettings | None = None) -> CheckpointPolicy:
        settings = settings or AuditSettings()
        key = load_signing_key(settings.signing_key_path)
        return cls(
            settings.checkpoint_entries_max, settings.checkpoint_interval_ms, key, key_id(key.public_key())
        )

    def link(
        self, chain: ChainState, tenant_id: str, position: tuple[int, int, int], bodies: list[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        """(published entries, signed checkpoint records) for a tenant's new entry bodies of one batch,
        published with its fold at `position` (applied source offset, stream time, the account's
        watermark when the batch began)."""
        records: list[bytes] = []
        taken = append_entries(chain, bodies, records, self.entries_max, tenant_id, position, self.key_id)
        stream_time = position[1]
        if chain.checkpoint_time < 0:
            chain.checkpoint_time = stream_time  # the interval counts from the tenant's first entry
        if chain.pending and stream_time - chain.checkpoint_time >= self.interval_ms:
            taken.append(take_checkpoint(chain, tenant_id, stream_time, self.key_id))
        return records, [self.sign(checkpoint_body(checkpoint)) for checkpoint in taken]

    def sign(self, body: bytes) -> bytes:
        return signed_record(body, self.key.sign(body))
