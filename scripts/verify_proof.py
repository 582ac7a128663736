#!/usr/bin/env python3
"""Check a Tollgate inclusion proof offline, trusting nothing but the checkpoint signing key.

    curl -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
        "$TOLLGATE_URL/admin/v1/tenants/$TENANT/entries/$ENTRY_ID/proof" > proof.json
    python scripts/verify_proof.py proof.json --public-key <64 hex chars, or a PEM file>

Standalone on purpose: the standard library and `cryptography` only (no Tollgate code), so an auditor can
read it in one sitting. It checks, exiting 1 with the reason at the first failure:
  1. the entry's bytes hash to its chain link:
       hash = SHA-256(0x00 || previous || sequence || offset || time || watermark || body)
     (each number 8 bytes big-endian signed; body = the entry without its `,"chain":{...}` member);
  2. the audit path (RFC 6962) leads from that hash, leaf `leaf_index` of `tree_size`, to a root;
  3. the checkpoint names that root, covers that sequence (first_sequence + leaf_index) for the same
     tenant, and is signed (Ed25519) by the key given, over its bytes without the `,"signature"` member.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

CHAIN_MARKER = b',"chain":{'
SIGNATURE_MARKER = b',"signature":"'


class ProofFailed(Exception):
    pass


def int8(value: int) -> bytes:
    return value.to_bytes(8, "big", signed=True)


def entry_hash(record: bytes) -> tuple[bytes, dict]:
    cut = record.rfind(CHAIN_MARKER)
    if cut < 0:
        raise ProofFailed("the entry has no chain link")
    body = record[:cut] + b"}"
    link = json.loads(record)["chain"]
    position = int8(link["sequence"]) + int8(link["offset"]) + int8(link["time"]) + int8(link["watermark"])
    own = hashlib.sha256(b"\x00" + bytes.fromhex(link["previous"]) + position + body).digest()
    if own.hex() != link["hash"]:
        raise ProofFailed("the entry's bytes do not hash to its chain link: the entry was altered")
    return own, link


def root_from_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """RFC 9162, 2.1.3.2: the root an inclusion proof leads to."""
    if not 0 <= index < size:
        raise ProofFailed(f"leaf {index} is outside a tree of {size}")
    fn, sn, root = index, size - 1, leaf
    for node in path:
        if sn == 0:
            raise ProofFailed("the audit path is too long")
        if fn & 1 or fn == sn:
            root = hashlib.sha256(b"\x01" + node + root).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            root = hashlib.sha256(b"\x01" + root + node).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofFailed("the audit path is too short")
    return root


def check_checkpoint(record: bytes, key: Ed25519PublicKey) -> dict:
    cut = record.rfind(SIGNATURE_MARKER)
    if cut < 0:
        raise ProofFailed("the checkpoint is not signed")
    body = record[:cut] + b"}"
    signature = bytes.fromhex(json.loads(record)["signature"])
    try:
        key.verify(signature, body)
    except InvalidSignature:
        raise ProofFailed("the checkpoint's signature does not verify with this key") from None
    return json.loads(body)


def verify(proof: dict, key: Ed25519PublicKey) -> str:
    own, link = entry_hash(proof["entry"].encode())
    checkpoint = check_checkpoint(proof["checkpoint"].encode(), key)
    entry = json.loads(proof["entry"])
    if entry["tenant_id"] != checkpoint["tenant_id"]:
        raise ProofFailed("the checkpoint is another tenant's")
    size = checkpoint["last_sequence"] - checkpoint["first_sequence"] + 1
    if proof["tree_size"] != size or link["sequence"] != checkpoint["first_sequence"] + proof["leaf_index"]:
        raise ProofFailed("the proof's position does not match the checkpoint's range")
    root = root_from_path(own, proof["leaf_index"], size, [bytes.fromhex(h) for h in proof["audit_path"]])
    if root.hex() != checkpoint["merkle_root"]:
        raise ProofFailed("the audit path does not lead to the checkpoint's Merkle root")
    return (
        f"OK: entry {entry.get('entry_id') or entry.get('event_id')} is entry {link['sequence']} of tenant "
        f"{checkpoint['tenant_id']}, included in checkpoint {checkpoint['number']} (entries "
        f"{checkpoint['first_sequence']}..{checkpoint['last_sequence']}), "
        f"signed by key {checkpoint['key_id'][:16]}..."
    )


def load_key(text: str) -> Ed25519PublicKey:
    path = Path(text)
    if path.is_file():
        key = load_pem_public_key(path.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise SystemExit(f"{text}: not an Ed25519 public key")
        return key
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("proof", help="the proof JSON file (- for stdin)")
    parser.add_argument("--public-key", required=True, help="the signing key: 64 hex chars or a PEM file")
    arguments = parser.parse_args(argv)
    text = sys.stdin.read() if arguments.proof == "-" else Path(arguments.proof).read_text()
    try:
        print(verify(json.loads(text), load_key(arguments.public_key)))
    except (ProofFailed, KeyError, ValueError) as error:
        print(f"FAILED: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
