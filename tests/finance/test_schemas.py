"""The committed JSON Schemas (schemas/) are the code's; records of every schema_version decode and
validate against them; what the fold writes today validates too."""

from __future__ import annotations

import json

import jsonschema
import msgspec

from ledger.chain import ChainLink
from ledger.codec import decode_event, encode_event
from ledger.entries import decode_entry, encode_entry
from ledger.events import CreditGranted, GrantVoided, PeriodClosed, UsageRecorded
from ledger.tenant import TenantLedger
from streams.topics import ENTRIES, EVENTS
from tollgate import schemas

# Version 1 records, as they were written before money (schema version 2): no category, price, money,
# booked_at; allocations are [grant, credits] pairs.
V1_EVENTS = [
    b'{"type":"credit_granted","event_id":"e1","tenant_id":"t","grant_id":"g","amount":5,"effective_at":0,'
    b'"expires_at":10,"priority":0,"schema_version":1}',
    b'{"type":"grant_voided","event_id":"e2","tenant_id":"t","grant_id":"g","voided_at":4,"schema_version":1}',
    b'{"type":"usage_recorded","event_id":"u","tenant_id":"t","amount":2,"occurred_at":1,"model":"m",'
    b'"prompt_tokens":3,"completion_tokens":4,"schema_version":1}',
    b'{"type":"credit_expired","event_id":"t/expired/g","tenant_id":"t","grant_id":"g","expired_at":10,'
    b'"amount":3,"schema_version":1}',
]
V1_ENTRIES = [
    b'{"type":"usage_allocated","entry_id":"t/usage/u","tenant_id":"t","event_id":"u","occurred_at":1,'
    b'"model":"m","prompt_tokens":3,"completion_tokens":4,"amount":2,"allocations":[["g",2]],"overage":0,'
    b'"schema_version":1}',
    b'{"type":"allocation_corrected","entry_id":"t/reallocation/e","tenant_id":"t","cause_event_id":"e",'
    b'"allocations":[["g",-1],["h",1]],"overage_delta":0,"schema_version":1}',
    b'{"type":"credit_voided","entry_id":"t/voided/g","tenant_id":"t","grant_id":"g","voided_at":4,"amount":3,'
    b'"schema_version":1}',
    b'{"type":"end_corrected","entry_id":"t/end-correction/u/g","tenant_id":"t","grant_id":"g",'
    b'"corrects":"t/expired/g","cause_event_id":"u","delta":-1,"schema_version":1}',
    V1_EVENTS[3],
]
LINK = ChainLink(sequence=1, offset=0, time=0, watermark=-1, previous="00" * 32, hash="11" * 32)


def chained(body: bytes) -> bytes:
    return body[:-1] + b',"chain":' + msgspec.json.encode(LINK) + b"}"


def validate(topic: str, record: bytes) -> None:
    jsonschema.validate(json.loads(record), schemas.topic_schemas()[topic])


def test_the_committed_schemas_are_the_codes():
    assert schemas.drifted() == [], "run: python -m tollgate.schemas"


def test_a_schema_that_differs_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(schemas, "SCHEMAS_DIR", tmp_path)
    assert schemas.main([]) == 0 and schemas.drifted() == []
    path = schemas.schema_path(EVENTS)
    path.write_text(path.read_text().replace('"amount"', '"amount_"', 1))
    assert schemas.drifted() == [EVENTS]
    assert schemas.main(["--check"]) == 1


def test_version_1_records_decode_and_validate():
    for record in V1_EVENTS:
        event = decode_event(record)
        assert event.schema_version == 1
        validate(EVENTS, record)
    for record in V1_ENTRIES:
        entry = decode_entry(record)
        assert entry.schema_version == 1
        validate(ENTRIES, chained(record))
    (allocation,) = decode_entry(V1_ENTRIES[0]).allocations
    assert (allocation.grant_id, allocation.amount, allocation.money) == ("g", 2, 0)


def test_what_the_fold_writes_today_validates():
    ledger = TenantLedger("t")
    paid = {"category": "paid", "price": 999, "currency": "EUR", "reference": "INV-1"}
    steps = [
        CreditGranted(
            event_id="e1", tenant_id="t", grant_id="g", amount=5, effective_at=0, expires_at=10, **paid
        ),
        UsageRecorded(event_id="u1", tenant_id="t", amount=2, occurred_at=3, model="m"),
        20,  # stream time: g's expiry is published
        PeriodClosed(event_id="c", tenant_id="t", closed_until=15),
        UsageRecorded(event_id="u0", tenant_id="t", amount=1, occurred_at=1, model="m"),
        CreditGranted(event_id="e2", tenant_id="t", grant_id="h", amount=4, effective_at=0, priority=-1),
        GrantVoided(event_id="v", tenant_id="t", grant_id="h", voided_at=2),
    ]
    entries = []
    for step in steps:
        if isinstance(step, int):
            entries += ledger.advance_to(step)
            continue
        validate(EVENTS, encode_event(step))
        entries += ledger.apply(step)
    kinds = {type(entry).__name__ for entry in entries}
    expected = {"GrantRecorded", "UsageAllocated", "CreditExpired", "CreditVoided", "EndCorrected"}
    assert expected | {"AllocationCorrected"} <= kinds, kinds
    for entry in entries:
        validate(ENTRIES, chained(encode_entry(entry)))
    try:
        validate(ENTRIES, encode_entry(entries[0]))  # without its chain link: not a topic record
    except jsonschema.ValidationError:
        return
    raise AssertionError("an entry without its chain link validated")
