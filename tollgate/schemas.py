"""JSON Schemas of every topic's records, generated from their msgspec structs; committed under schemas/.

    python -m tollgate.schemas           write schemas/<topic>.schema.json
    python -m tollgate.schemas --check   exit 1 when a committed schema differs from the code's
    python -m tollgate.schemas validate TOPIC
                                         validate records, one JSON per line on stdin (what
                                         kafka-console-consumer prints), against schemas/TOPIC.schema.json

A record on `ledger.entries` is an entry with its hash-chain link appended (`chain`, ledger.chain), and a
record on `ledger.checkpoints` is a checkpoint with its `signature`: their schemas say so (allOf).
Schemas accept every earlier `schema_version` (new fields all have defaults); tests/finance decode and
validate records of each.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import msgspec

from ledger.alerts import AlertFired
from ledger.chain import ChainLink, Checkpoint
from ledger.entries import Entry
from ledger.events import Event
from streams.records import ApiKeyRevoked, BalanceRecord, DeadLetter
from streams.topics import ALERTS, BALANCES, CHECKPOINTS, DLQ, ENTRIES, EVENTS, KEYS

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(record_type, title: str, extra: dict | None = None) -> dict:
    types = [record_type] + ([ChainLink] if extra and "chain" in extra else [])
    (root, *_), components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    schema: dict = {"$schema": DIALECT, "title": title, **root, "$defs": components}
    if extra:
        schema = {
            "$schema": DIALECT,
            "title": title,
            "allOf": [root, {"type": "object", "properties": extra, "required": sorted(extra)}],
            "$defs": components,
        }
    return schema


def _cleaned_descriptions(node):
    """The schema with every description as `inspect.cleandoc` gives it: msgspec 0.23 dedents docstrings,
    0.22 kept their indentation, and the committed schemas must not depend on which one is installed."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _cleaned_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_cleaned_descriptions(value) for value in node]
    return node


def topic_schemas() -> dict[str, dict]:
    """Topic name -> the JSON Schema of its record values."""
    return {topic: _cleaned_descriptions(schema) for topic, schema in _topic_schemas().items()}


def _topic_schemas() -> dict[str, dict]:
    return {
        EVENTS: _schema(Event, "a ledger event (input or derived)"),
        ENTRIES: _schema(
            Entry, "a ledger entry with its hash-chain link", {"chain": {"$ref": "#/$defs/ChainLink"}}
        ),
        BALANCES: _schema(BalanceRecord, "a tenant's latest balance"),
        DLQ: _schema(DeadLetter, "a rejected record with the reason"),
        KEYS: _schema(ApiKeyRevoked, "an API key revocation"),
        CHECKPOINTS: _schema(
            Checkpoint, "a signed checkpoint of a tenant's entry chain", {"signature": {"type": "string"}}
        ),
        ALERTS: _schema(AlertFired, "an alert a tenant's rule fired, or an auto top-up decision"),
    }


def rendered(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_path(topic: str) -> Path:
    return SCHEMAS_DIR / f"{topic}.schema.json"


def drifted() -> list[str]:
    """Topics whose committed schema differs from the code's (or is missing)."""
    return [
        topic
        for topic, schema in topic_schemas().items()
        if not schema_path(topic).exists() or schema_path(topic).read_text() != rendered(schema)
    ]


def validate_lines(topic: str, lines) -> int:
    """Validate each non-empty line against the committed schema of `topic`; returns how many passed,
    raises jsonschema.ValidationError (naming the line) at the first that does not."""
    import jsonschema  # the finance consumer's tool: imported only here

    validator = jsonschema.Draft202012Validator(json.loads(schema_path(topic).read_text()))
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            validator.validate(json.loads(line))
        except jsonschema.ValidationError as error:
            error.message = f"line {number}: {error.message}"
            raise
        count += 1
    return count


def main(argv: list[str]) -> int:
    if argv[:1] == ["validate"] and len(argv) == 2:
        import jsonschema

        try:
            count = validate_lines(argv[1], sys.stdin)
        except jsonschema.ValidationError as error:
            print(f"invalid {argv[1]} record, {error.message}", file=sys.stderr)
            return 1
        print(f"{count} valid {argv[1]} records")
        return 0
    if "--check" in argv:
        stale = drifted()
        for topic in stale:
            print(
                f"{schema_path(topic)} differs from the code: run python -m tollgate.schemas", file=sys.stderr
            )
        return 1 if stale else 0
    SCHEMAS_DIR.mkdir(exist_ok=True)
    for topic, schema in topic_schemas().items():
        schema_path(topic).write_text(rendered(schema))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
