"""The per-tenant hash chain over `ledger.entries` and the RFC 6962 Merkle trees its checkpoints sign.

Pure: hashing and byte layout only (no keys, no I/O). Anyone can recompute every hash from the
published records with this module or by hand (README, "Audit").

An entry as the fold encodes it (`ledger.entries.encode_entry`: one JSON object) is its *body*. The
record published on `ledger.entries` is the body with one member appended, the chain link:

    record = body[:-1] + b',"chain":{"sequence":<n>,"offset":<o>,"time":<t>,"watermark":<w>,'
                         b'"previous":"<64 hex>","hash":"<64 hex>"}}'
    hash   = SHA-256( 0x00 || previous (32 bytes) || n || o || t || w || body )
             (n, o, t, w: 8 bytes each, big-endian, signed)

`n` counts a tenant's entries from 1; the first entry's previous hash is 32 zero bytes. `o`, `t` and `w`
say where the fold stood when it published the entry: the highest source offset of `ledger.events`
folded into the tenant, the tenant's stream time (its batch's end, or a sweep's time), and the time up
to which its account had published block ends when that batch began (batch ends that published
nothing still move it). They make the entries reproducible: `tollgate audit verify` re-folds
`ledger.events` with exactly those batch ends and sweeps and must get the same bytes. The body is
recovered from a record by cutting at the last `,"chain":{` (a JSON string never holds an unescaped
quote, so that text cannot occur inside a value) and closing the object again with `}`. Every field
of the entry, including fields added later, is covered, since the body is hashed as published.

A checkpoint covers the entries first..last since the tenant's previous checkpoint: the chain head
(`last`, its hash) and the Merkle tree head of RFC 6962 (2.1) over those entries. An entry's hash IS its
RFC 6962 leaf hash (the leaf's data: previous || n || o || t || w || body, behind the 0x00 prefix), so
the tree's leaves are the entry hashes themselves and one SHA-256 per entry serves both:

    node hash  = SHA-256( 0x01 || left || right )

The fold keeps the tree as its *frontier* (the roots of the perfect subtrees, largest first: at most
64 hashes), so an entry costs its own hash and on average one node hash, and the tree head is the
frontier folded right to left, equal to RFC 6962's MTH. Inclusion proofs are RFC 6962's audit paths,
verified as RFC 9162 (2.1.3.2) does.
"""

from __future__ import annotations

import struct
from binascii import hexlify
from hashlib import sha256

import msgspec

CHAIN_SCHEMA_VERSION = 1
ADMIN_CHAIN = "admin-audit"  # the admin audit log's chain (gateway.admin.audit_log): its checkpoints' name
HASH_BYTES = 32
GENESIS_HASH = bytes(HASH_BYTES)
CHAIN_MARKER = b',"chain":{'
SIGNATURE_MARKER = b',"signature":"'
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_SEQUENCE, _OFFSET, _TIME, _WATERMARK = (
    CHAIN_MARKER + b'"sequence":',
    b',"offset":',
    b',"time":',
    b',"watermark":',
)
_PREVIOUS, _HASH, _END = b',"previous":"', b'","hash":"', b'"}}'


class BrokenRecord(ValueError):
    """A record that does not have the chained or signed layout this module writes."""


# --------------------------------------------------------------------------------------------- entries


_pack_one, _pack_three = struct.Struct(">q").pack, struct.Struct(">qqq").pack


def _int8(value: int) -> bytes:
    return _pack_one(value)


def entry_hash(previous: bytes, sequence: int, position: tuple[int, int, int], body: bytes) -> bytes:
    """The entry's hash, which is also its RFC 6962 leaf hash; `position` is (offset, time, watermark)."""
    where = b"".join(_int8(value) for value in position)
    return sha256(_LEAF_PREFIX + previous + _int8(sequence) + where + body).digest()


class ChainLink(msgspec.Struct, frozen=True):
    sequence: int
    offset: int
    time: int
    watermark: int
    previous: str
    hash: str

    @property
    def position(self) -> tuple[int, int, int]:
        return (self.offset, self.time, self.watermark)


class _Linked(msgspec.Struct):
    chain: ChainLink


_link_decoder = msgspec.json.Decoder(_Linked)


def split_record(record: bytes) -> tuple[bytes, ChainLink]:
    """(body, link) of a record published on `ledger.entries`; BrokenRecord when it has no link."""
    cut = record.rfind(CHAIN_MARKER)
    if cut < 0 or not record.endswith(b"}}"):
        raise BrokenRecord("no chain link")
    try:
        link = _link_decoder.decode(record).chain
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise BrokenRecord(f"unreadable chain link: {error}") from None
    return record[:cut] + b"}", link


# ---------------------------------------------------------------------------------------- merkle trees


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(_NODE_PREFIX + left + right).digest()


def frontier_push(frontier: list[bytes], size: int, leaf: bytes) -> None:
    """Add the leaf hash `leaf` as leaf number `size` (0-based) of the tree whose frontier is given."""
    node = leaf
    while size & 1:
        node = node_hash(frontier.pop(), node)
        size >>= 1
    frontier.append(node)


def frontier_root(frontier: list[bytes]) -> bytes:
    """RFC 6962's MTH of the tree the frontier describes (the empty tree: SHA-256 of nothing)."""
    if not frontier:
        return sha256(b"").digest()
    root = frontier[-1]
    for node in reversed(frontier[:-1]):
        root = node_hash(node, root)
    return root


def _split(size: int) -> int:
    """The largest power of two strictly below `size` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962's MTH over leaf hashes, by its recursive definition (for verification and proofs)."""
    if not leaves:
        return sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def inclusion_proof(leaves: list[bytes], index: int) -> list[bytes]:
    """RFC 6962's PATH(m, D[n]): the audit path of leaf `index` among the leaf hashes."""
    assert 0 <= index < len(leaves), f"leaf {index} outside a tree of {len(leaves)}"
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*inclusion_proof(leaves[:k], index), merkle_root(leaves[k:])]
    return [*inclusion_proof(leaves[k:], index - k), merkle_root(leaves[:k])]


def root_from_proof(leaf: bytes, index: int, size: int, proof: list[bytes]) -> bytes | None:
    """The tree head an audit path leads to (RFC 9162 2.1.3.2), or None when the path cannot belong to
    leaf `index` of a tree of `size` leaves."""
    if not 0 <= index < size:
        return None
    fn, sn, root = index, size - 1, leaf
    for node in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            root = node_hash(node, root)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            root = node_hash(root, node)
        fn >>= 1
        sn >>= 1
    return root if sn == 0 else None


# ---------------------------------------------------------------------------------------- checkpoints


class Checkpoint(msgspec.Struct, frozen=True, tag="ledger_checkpoint", tag_field="type", kw_only=True):
    """What a signature covers: the tenant's chain head and the tree head of the entries first..last
    (those since its previous checkpoint). `number` counts the tenant's checkpoints from 1."""

    tenant_id: str
    number: int
    first_sequence: int
    last_sequence: int
    head_hash: str  # hex: the hash of entry `last_sequence`
    merkle_root: str  # hex: RFC 6962 MTH over the leaf hashes of entries first..last
    stream_time: int  # the tenant's stream (event) time when it was taken
    key_id: str  # hex: SHA-256 of the raw 32-byte Ed25519 public key that signed it
    schema_version: int = CHAIN_SCHEMA_VERSION


_checkpoint_encoder = msgspec.json.Encoder()
_checkpoint_decoder = msgspec.json.Decoder(Checkpoint)


def checkpoint_body(checkpoint: Checkpoint) -> bytes:
    """The bytes the signature is over (the record without its signature member)."""
    return _checkpoint_encoder.encode(checkpoint)


def signed_record(body: bytes, signature: bytes) -> bytes:
    return body[:-1] + SIGNATURE_MARKER + signature.hex().encode() + b'"}'


def split_signed(record: bytes) -> tuple[bytes, Checkpoint, bytes]:
    """(signed body, checkpoint, signature) of a record on `ledger.checkpoints`."""
    cut = record.rfind(SIGNATURE_MARKER)
    if cut < 0 or not record.endswith(b'"}'):
        raise BrokenRecord("no signature")
    body = record[:cut] + b"}"
    try:
        signature = bytes.fromhex(record[cut + len(SIGNATURE_MARKER) : -2].decode())
        checkpoint = _checkpoint_decoder.decode(body)
    except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as error:
        raise BrokenRecord(f"unreadable checkpoint: {error}") from None
    return body, checkpoint, signature


# ------------------------------------------------------------------------------------- a tenant's chain


class ChainState(msgspec.Struct, array_like=True):
    """A tenant's chain as the fold keeps it in its account record: the head, the frontier of the
    tree of entries since the last checkpoint, and where and when that checkpoint was."""

    sequence: int = 0
    head: bytes = GENESIS_HASH
    frontier: list[bytes] = msgspec.field(default_factory=list)
    checkpoints: int = 0
    checkpoint_sequence: int = 0  # the last entry the latest checkpoint covers
    checkpoint_time: int = -1  # stream time of the latest checkpoint (or of the first entry)

    @property
    def pending(self) -> int:
        """Entries not yet covered by a checkpoint."""
        return self.sequence - self.checkpoint_sequence


def append_entries(
    chain: ChainState,
    bodies: list[bytes],
    out: list[bytes],
    every: int,
    tenant_id: str,
    position: tuple[int, int, int],
    key_id: str,
) -> list[Checkpoint]:
    """Link `bodies`, published with the tenant's fold at `position` (source offset, stream time, the
    account's watermark when the batch began), onto the chain, appending each published record to `out`;
    a checkpoint is taken each time `every` entries are pending. Returns those checkpoints (unsigned).

    The fold's hot path (one pass per entry): `entry_hash` and `frontier_push` written inline, C calls only
    (a Python call per step costs as much as the hashing)."""
    assert every >= 1, f"a checkpoint every {every} entries"
    offset, stream_time, watermark = position
    sequence, previous, frontier = chain.sequence, chain.head, chain.frontier
    base = chain.checkpoint_sequence
    previous_hex = hexlify(previous)
    where = _pack_three(offset, stream_time, watermark)
    where_text = b"%s%d%s%d%s%d" % (_OFFSET, offset, _TIME, stream_time, _WATERMARK, watermark)
    join, pack, taken = b"".join, _pack_one, []
    for body in bodies:
        sequence += 1
        own = sha256(join((_LEAF_PREFIX, previous, pack(sequence), where, body))).digest()
        own_hex = hexlify(own)
        out.append(
            join(
                (
                    body[:-1],
                    _SEQUENCE,
                    b"%d" % sequence,
                    where_text,
                    _PREVIOUS,
                    previous_hex,
                    _HASH,
                    own_hex,
                    _END,
                )
            )
        )
        node, size = own, sequence - base - 1  # frontier_push(frontier, size, own), inline
        while size & 1:
            node = sha256(join((_NODE_PREFIX, frontier.pop(), node))).digest()
            size >>= 1
        frontier.append(node)
        previous, previous_hex = own, own_hex
        if sequence - base >= every:
            chain.sequence, chain.head = sequence, previous
            taken.append(take_checkpoint(chain, tenant_id, stream_time, key_id))
            base = chain.checkpoint_sequence
    chain.sequence, chain.head = sequence, previous
    return taken


def take_checkpoint(chain: ChainState, tenant_id: str, stream_time: int, key_id: str) -> Checkpoint:
    """The checkpoint over the pending entries (at least one), and the chain moved past them."""
    assert chain.pending > 0, f"{tenant_id}: a checkpoint over no entries"
    checkpoint = Checkpoint(
        tenant_id=tenant_id,
        number=chain.checkpoints + 1,
        first_sequence=chain.checkpoint_sequence + 1,
        last_sequence=chain.sequence,
        head_hash=chain.head.hex(),
        merkle_root=frontier_root(chain.frontier).hex(),
        stream_time=stream_time,
        key_id=key_id,
    )
    chain.checkpoint_sequence = chain.sequence
    chain.checkpoints += 1
    chain.checkpoint_time = stream_time
    chain.frontier.clear()
    return checkpoint
