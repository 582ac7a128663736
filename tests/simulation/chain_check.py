"""The hash chain as an auditor reading the output topics checks it (ledger.chain): one content per
(tenant, sequence) and per checkpoint number, every hash recomputed from the published body, every link
to the previous entry's hash, every checkpoint's signature, chain head and Merkle root over its entries.

Republication after a crash must yield the identical chain: a repeat of an entry or a checkpoint must be
byte-identical, so two contents for one (tenant, sequence) or (tenant, number) break the property."""

from __future__ import annotations

from collections import defaultdict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.chain import GENESIS_HASH, entry_hash, merkle_root, split_record, split_signed


class PropertyViolated(AssertionError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PropertyViolated(message)


class ChainObserver:
    def __init__(self, public_key: Ed25519PublicKey) -> None:
        self.public_key = public_key
        self.records: dict[tuple[str, int], bytes] = {}  # (tenant, sequence) -> published record
        self.hashes: dict[str, dict[int, bytes]] = defaultdict(dict)  # tenant -> sequence -> own hash
        self.checkpoints: dict[tuple[str, int], bytes] = {}  # (tenant, number) -> published record
        self.pending_checkpoints: list[bytes] = []  # whose entries have not all arrived yet
        self.checked_checkpoints = 0

    def entry(self, tenant_id: str, record: bytes) -> None:
        body, link = split_record(record)
        key = (tenant_id, link.sequence)
        first = self.records.setdefault(key, record)
        _check(
            first == record,
            f"{tenant_id} sequence {link.sequence} carries two contents:\n  {first!r}\n  {record!r}",
        )
        previous, own = bytes.fromhex(link.previous), bytes.fromhex(link.hash)
        _check(
            entry_hash(previous, link.sequence, link.position, body) == own,
            f"{tenant_id} #{link.sequence}: hash mismatch",
        )
        hashes = self.hashes[tenant_id]
        hashes[link.sequence] = own
        before = GENESIS_HASH if link.sequence == 1 else hashes.get(link.sequence - 1)
        _check(
            before in (None, previous), f"{tenant_id} #{link.sequence}: previous is not #{link.sequence - 1}"
        )
        after = self.records.get((tenant_id, link.sequence + 1))
        if after is not None:
            _check(
                split_record(after)[1].previous == link.hash, f"{tenant_id} #{link.sequence + 1}: bad link"
            )

    def checkpoint(self, tenant_id: str, record: bytes) -> None:
        body, checkpoint, signature = split_signed(record)
        _check(checkpoint.tenant_id == tenant_id, f"checkpoint of {checkpoint.tenant_id} keyed {tenant_id}")
        first = self.checkpoints.setdefault((tenant_id, checkpoint.number), record)
        _check(first == record, f"{tenant_id} checkpoint {checkpoint.number} carries two contents")
        try:
            self.public_key.verify(signature, body)
        except InvalidSignature:
            raise PropertyViolated(f"{tenant_id} checkpoint {checkpoint.number}: bad signature") from None
        self.pending_checkpoints.append(record)

    def settle(self) -> None:
        """Check the Merkle roots of the checkpoints whose entries have all been read."""
        waiting = []
        for record in self.pending_checkpoints:
            _, checkpoint, _ = split_signed(record)
            hashes = self.hashes[checkpoint.tenant_id]
            span = range(checkpoint.first_sequence, checkpoint.last_sequence + 1)
            if any(sequence not in hashes for sequence in span):
                waiting.append(record)
                continue
            where = f"{checkpoint.tenant_id} checkpoint {checkpoint.number}"
            root = merkle_root([hashes[sequence] for sequence in span])
            _check(root.hex() == checkpoint.merkle_root, f"{where}: Merkle root mismatch")
            _check(hashes[checkpoint.last_sequence].hex() == checkpoint.head_hash, f"{where}: head mismatch")
            previous = self.checkpoints.get((checkpoint.tenant_id, checkpoint.number - 1))
            expected_first = split_signed(previous)[1].last_sequence + 1 if previous else None
            if checkpoint.number == 1:
                expected_first = 1
            _check(expected_first in (None, checkpoint.first_sequence), f"{where}: does not follow the last")
            self.checked_checkpoints += 1
        self.pending_checkpoints = waiting

    def check_complete(self, tenant_id: str) -> None:
        """At the end: the tenant's sequences are 1..n without a gap, and every checkpoint was settled."""
        sequences = sorted(self.hashes.get(tenant_id, {}))
        _check(
            sequences == list(range(1, len(sequences) + 1)), f"{tenant_id}: sequence gaps {sequences[:20]}"
        )
        self.settle()
        _check(
            not [r for r in self.pending_checkpoints if split_signed(r)[1].tenant_id == tenant_id],
            f"{tenant_id}: a checkpoint over entries never published",
        )
