"""The hash chain and its Merkle trees (ledger.chain), the processor's chain and checkpoints, and the
simulation's chain check failing where it must."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.chain import (
    GENESIS_HASH,
    BrokenRecord,
    ChainState,
    entry_hash,
    frontier_push,
    frontier_root,
    inclusion_proof,
    merkle_root,
    root_from_proof,
    split_record,
    split_signed,
)
from ledger.codec import encode_event
from ledger.entries import decode_entry
from ledger.events import CreditGranted, UsageRecorded
from streams.audit_checkpoints import CheckpointPolicy, key_id
from streams.processor import LedgerProcessor
from streams.records import LogRecord
from tests.simulation.chain_check import ChainObserver, PropertyViolated

TOPIC = "ledger.events"


def policy(entries_max: int = 3, interval_ms: int = 10**9) -> CheckpointPolicy:
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test").digest())
    return CheckpointPolicy(entries_max, interval_ms, key, key_id(key.public_key()))


def test_the_frontier_root_is_rfc6962_mth_and_every_audit_path_leads_to_it():
    for size in range(1, 34):
        leaves = [hashlib.sha256(b"\x00%d" % i).digest() for i in range(size)]
        frontier: list[bytes] = []
        for index, leaf in enumerate(leaves):
            frontier_push(frontier, index, leaf)
        root = merkle_root(leaves)
        assert frontier_root(frontier) == root
        for index in range(size):
            proof = inclusion_proof(leaves, index)
            assert root_from_proof(leaves[index], index, size, proof) == root
            if size > 1:
                assert root_from_proof(leaves[index], (index + 1) % size, size, proof) != root


def test_rfc6962_known_answers():
    # RFC 6962 reference: the empty tree's head is SHA-256 of nothing; one leaf's head is its leaf hash
    assert merkle_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    leaf = hashlib.sha256(b"\x00" + b"x").digest()
    assert merkle_root([leaf]) == leaf
    two = [hashlib.sha256(b"\x00a").digest(), hashlib.sha256(b"\x00b").digest()]
    assert merkle_root(two) == hashlib.sha256(b"\x01" + two[0] + two[1]).digest()


def grant(tenant: str, grant_id: str, amount: int, at: int) -> bytes:
    event = CreditGranted(
        event_id=grant_id,
        tenant_id=tenant,
        grant_id=grant_id,
        amount=amount,
        effective_at=at,
        expires_at=None,
        priority=0,
    )
    return encode_event(event)


def usage(tenant: str, event_id: str, amount: int, at: int) -> bytes:
    event = UsageRecorded(
        event_id=event_id,
        tenant_id=tenant,
        occurred_at=at,
        model="m",
        prompt_tokens=1,
        completion_tokens=1,
        amount=amount,
    )
    return encode_event(event)


def records(values: list[tuple[str, bytes]]) -> list[LogRecord]:
    return [
        LogRecord(TOPIC, 0, offset, key.encode(), value, 1_000 + offset)
        for offset, (key, value) in enumerate(values)
    ]


class DictState(dict):
    def items_with_prefix(self, prefix):
        return ((k, v) for k, v in sorted(self.items()) if k.startswith(prefix))


def test_entries_are_chained_per_tenant_and_checkpoints_sign_their_merkle_root():
    values = [("t1", grant("t1", "g1", 100, 0)), ("t2", grant("t2", "g2", 100, 0))]
    values += [("t1", usage("t1", f"u{i}", 1, 10 + i)) for i in range(7)]
    processor = LedgerProcessor(DictState(), source_topic=TOPIC, checkpoints=policy(entries_max=3))
    output = processor.process(0, records(values))
    observer = ChainObserver(processor.checkpoints.key.public_key())
    chained = [r for r in output.entries if r.key == b"t1"]
    assert 7 <= len(chained) <= 8  # seven usage entries, and one for the grant where grants have entries
    assert [split_record(r.value)[1].sequence for r in chained] == list(range(1, len(chained) + 1))
    for record in output.entries:
        body, link = split_record(record.value)
        decode_entry(record.value)  # a finance consumer still reads the entry as before
        assert msgspec.json.decode(body) == {
            k: v for k, v in msgspec.json.decode(record.value).items() if k != "chain"
        }
        observer.entry(record.key.decode(), record.value)
    first = split_record(chained[0].value)[1]
    assert first.previous == GENESIS_HASH.hex()
    assert (
        first.hash
        == entry_hash(GENESIS_HASH, 1, first.position, split_record(chained[0].value)[0]).hex()
    )
    numbers = []
    for record in output.checkpoints:
        observer.checkpoint(record.key.decode(), record.value)
        numbers.append((record.key, split_signed(record.value)[1].last_sequence))
    observer.settle()
    assert numbers == [(b"t1", 3), (b"t1", 6)]
    assert observer.checked_checkpoints == 2 and not observer.pending_checkpoints


def test_a_checkpoint_falls_due_by_stream_time_not_the_wall_clock():
    values = [("t1", grant("t1", "g1", 100, 0)), ("t1", usage("t1", "u1", 1, 5))]
    processor = LedgerProcessor(DictState(), source_topic=TOPIC, checkpoints=policy(10**6, interval_ms=50))
    assert processor.process(0, records(values)).checkpoints == []
    later = [LogRecord(TOPIC, 0, 2, b"t1", usage("t1", "u2", 1, 2_000), 2_000)]
    (checkpoint,) = processor.process(0, later).checkpoints
    assert split_signed(checkpoint.value)[1].stream_time == 2_000


def test_the_chain_survives_a_restart_from_the_account_record():
    state = DictState()
    first = LedgerProcessor(state, source_topic=TOPIC, checkpoints=policy())
    output = first.process(0, records([("t1", grant("t1", "g1", 100, 0)), ("t1", usage("t1", "u1", 1, 5))]))
    state.update(output.state_writes)
    restarted = LedgerProcessor(state, source_topic=TOPIC, checkpoints=policy())
    later = restarted.process(0, [LogRecord(TOPIC, 0, 2, b"t1", usage("t1", "u2", 1, 6), 6)])
    # the stored outbox goes out again byte for byte, then the new entry links onto its last
    assert [r.value for r in later.entries[: len(output.entries)]] == [r.value for r in output.entries]
    last = split_record(output.entries[-1].value)[1]
    new = split_record(later.entries[-1].value)[1]
    assert (new.sequence, new.previous) == (last.sequence + 1, last.hash)


def test_the_observer_catches_two_contents_for_one_sequence_and_a_broken_link():
    processor = LedgerProcessor(DictState(), source_topic=TOPIC, checkpoints=policy())
    output = processor.process(
        0, records([("t1", grant("t1", "g1", 100, 0)), ("t1", usage("t1", "u1", 1, 5))])
    )
    observer = ChainObserver(processor.checkpoints.key.public_key())
    record = output.entries[0].value
    observer.entry("t1", record)
    with pytest.raises(PropertyViolated, match="two contents"):
        observer.entry("t1", record.replace(b'"amount":1', b'"amount":2'))
    with pytest.raises(PropertyViolated, match="hash mismatch"):
        ChainObserver(observer.public_key).entry("t1", record.replace(b'"amount":1', b'"amount":2'))
    with pytest.raises(BrokenRecord):
        split_record(b'{"type":"x"}')


def test_a_chain_not_kept_with_the_state_is_caught_by_the_simulation(monkeypatch):
    """A processor that does not restore its chain from the account record (a chain derived again after
    a restart) gives one (tenant, sequence) two contents: the simulation names it."""
    import streams.processor
    from tests.simulation.simulator import simulate

    decode = streams.processor.decode_account_record
    monkeypatch.setattr(
        streams.processor,
        "decode_account_record",
        lambda value: msgspec.structs.replace(decode(value), chain=None),
    )
    caught = []
    for seed in range(30):
        try:
            simulate(seed)
        except PropertyViolated as error:
            caught.append(str(error))
    assert caught and all("carries two contents" in message or "previous" in message for message in caught)


def test_chain_state_round_trips_in_msgpack():
    chain = ChainState(3, b"\x01" * 32, [b"\x02" * 32], 1, 2, 10)
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(chain), type=ChainState)
    assert again == chain
