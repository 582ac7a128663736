"""The Kafka topics, declared in code (partitions, retention, cleanup policy), and their idempotent creation.

ledger.events    source of truth; key = tenant id; kept forever (retention.ms=-1); each record stamped
                 with the broker's append time (message.timestamp.type=LogAppendTime): its knowledge time
ledger.entries   finance: allocations, forfeits, corrections; kept forever
ledger.balances  latest balance per tenant (cleanup.policy=compact)
ledger.dlq       rejected records with the reason; kept dlq_retention_ms (30 days by default)
ledger.checkpoints signed checkpoints of each tenant's entry hash chain (ledger.chain); kept forever
ledger.alerts    balance alerts and top-up decisions the fold derived (ledger.alerts); kept forever
tenant.keys      API key revocations (key = key id; compacted): every gateway evicts the key at once
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from streams.settings import StreamSettings

log = logging.getLogger(__name__)

EVENTS = "ledger.events"
ENTRIES = "ledger.entries"
BALANCES = "ledger.balances"
DLQ = "ledger.dlq"
KEYS = "tenant.keys"
CHECKPOINTS = "ledger.checkpoints"
ALERTS = "ledger.alerts"

RETAIN_FOREVER_MS = -1
# The events' record time is when the log accepted them (their knowledge time, `known_at_ms`), not a time a
# producer chose: as-known-at answers and the audit snapshots need it never to go back within a partition
APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
TOPIC_NAME_LENGTH_MAX = 249  # Kafka's own limit
METADATA_POLL_INTERVAL_MS = 50


class TopicSetupError(RuntimeError):
    """A topic could not be created, or an existing one does not match its declaration."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert 0 < len(self.name) <= TOPIC_NAME_LENGTH_MAX, f"topic name length out of range: {self.name!r}"
        assert self.partitions >= 1, f"{self.name}: partitions must be >= 1"
        assert self.replication_factor >= 1, f"{self.name}: replication factor must be >= 1"
        object.__setattr__(self, "configs", MappingProxyType(dict(self.configs)))


@dataclass(frozen=True)
class LedgerTopics:
    """The names of the ledger topics after the prefix is applied."""

    events: str
    entries: str
    balances: str
    dlq: str
    keys: str = KEYS
    checkpoints: str = CHECKPOINTS
    alerts: str = ALERTS

    @classmethod
    def from_settings(cls, settings: StreamSettings) -> LedgerTopics:
        prefix = settings.topic_prefix
        return cls(
            events=prefix + EVENTS,
            entries=prefix + ENTRIES,
            balances=prefix + BALANCES,
            dlq=prefix + DLQ,
            keys=prefix + KEYS,
            checkpoints=prefix + CHECKPOINTS,
            alerts=prefix + ALERTS,
        )


def ledger_topic_specs(settings: StreamSettings) -> list[TopicSpec]:
    names = LedgerTopics.from_settings(settings)
    partitions = settings.topic_partitions
    replicas = settings.topic_replication_factor
    min_in_sync = str(min(2, replicas))
    kept_forever = {
        "cleanup.policy": "delete",
        "retention.ms": str(RETAIN_FOREVER_MS),
        "retention.bytes": "-1",
    }
    return [
        TopicSpec(
            names.events,
            partitions,
            replicas,
            {**kept_forever, **APPEND_TIME, "min.insync.replicas": min_in_sync},
        ),
        TopicSpec(names.entries, partitions, replicas, {**kept_forever, "min.insync.replicas": min_in_sync}),
        TopicSpec(
            names.checkpoints, partitions, replicas, {**kept_forever, "min.insync.replicas": min_in_sync}
        ),
        TopicSpec(names.alerts, partitions, replicas, {**kept_forever, "min.insync.replicas": min_in_sync}),
        TopicSpec(
            names.balances,
            partitions,
            replicas,
            {
                "cleanup.policy": "compact",
                "min.insync.replicas": min_in_sync,
                "min.cleanable.dirty.ratio": "0.1",
            },
        ),
        TopicSpec(
            names.dlq,
            partitions,
            replicas,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.dlq_retention_ms),
                "min.insync.replicas": "1",
            },
        ),
        TopicSpec(
            names.keys,
            partitions,
            replicas,
            {"cleanup.policy": "compact", "min.insync.replicas": min_in_sync},
        ),
    ]


def state_changelog_spec(settings: StreamSettings, name: str) -> TopicSpec:
    """A processor's state changelog: compacted (the latest value per key), one partition per source
    partition, so a processor that takes over a partition reads back exactly that partition's state."""
    return TopicSpec(
        name,
        settings.topic_partitions,
        settings.topic_replication_factor,
        {"cleanup.policy": "compact", "min.insync.replicas": str(min(2, settings.topic_replication_factor))},
    )


async def ensure_topics(
    bootstrap: str, specs: Iterable[TopicSpec], *, request_timeout_ms: int = 15_000
) -> list[str]:
    """Create the declared topics that are missing; return the names created (empty when all exist).

    Idempotent: existing topics are left as they are, but one whose partition count differs from its
    declaration raises TopicSetupError, because the tenant -> partition mapping depends on that count.
    Returns once the broker's metadata lists every declared topic, so producers can use them at once.
    """
    specs = list(specs)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = await _partition_counts(admin, [spec.name for spec in specs])
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            await _create(admin, missing, request_timeout_ms)
            existing = await _wait_until_visible(admin, [spec.name for spec in specs], request_timeout_ms)
        for spec in specs:
            count = existing[spec.name]
            if count != spec.partitions:
                raise TopicSetupError(f"topic {spec.name} has {count} partitions, declared {spec.partitions}")
        return [spec.name for spec in missing]
    finally:
        await admin.close()


async def _wait_until_visible(
    admin: AIOKafkaAdminClient, names: list[str], timeout_ms: int
) -> dict[str, int]:
    """The broker's metadata lags the controller a little after a create: wait until it lists every name."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        counts = await _partition_counts(admin, names)
        if len(counts) == len(set(names)):
            return counts
        if time.monotonic() >= deadline:
            raise TopicSetupError(
                f"topics {sorted(set(names) - set(counts))} not in metadata after {timeout_ms} ms"
            )
        await asyncio.sleep(METADATA_POLL_INTERVAL_MS / 1000)


async def describe_topic_configs(bootstrap: str, names: Iterable[str], *, request_timeout_ms: int = 15_000):
    """The broker's view of each topic's configuration: {topic: {config name: value}}."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()
    configs: dict[str, dict[str, str]] = {}
    for response in responses:
        for error_code, error_message, _type, name, entries in response.resources:
            if error_code != 0:
                raise TopicSetupError(
                    f"describe configs of {name} failed: {for_code(error_code).__name__} {error_message}"
                )
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


async def describe_partition_counts(
    bootstrap: str, names: Iterable[str], *, request_timeout_ms: int = 15_000
):
    """{topic: partition count} for those of `names` that exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        return await _partition_counts(admin, list(names))
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    wanted = set(names)
    topics = await admin.describe_topics()  # all topics: asking for a missing one by name reports an error
    return {topic["topic"]: len(topic["partitions"]) for topic in topics if topic["topic"] in wanted}


async def _create(admin: AIOKafkaAdminClient, specs: list[TopicSpec], request_timeout_ms: int) -> None:
    new_topics = [
        NewTopic(spec.name, spec.partitions, spec.replication_factor, topic_configs=dict(spec.configs))
        for spec in specs
    ]
    response = await admin.create_topics(new_topics, timeout_ms=request_timeout_ms)
    failures = []
    for topic_error in response.topic_errors:
        name, error_code = topic_error[0], topic_error[1]
        error_message = topic_error[2] if len(topic_error) > 2 else None
        error = for_code(error_code)
        if error_code == 0 or error is TopicAlreadyExistsError:  # a concurrent creator won the race
            continue
        failures.append(f"{name}: {error.__name__} {error_message or ''}".strip())
    if failures:
        raise TopicSetupError("could not create topics: " + "; ".join(failures))
    log.info("created topics %s", [spec.name for spec in specs])
