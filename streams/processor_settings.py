"""The stream processor's own limits (env TOLLGATE_*), shared by both Kafka engines:
`streams.batch_processor` (the default) and `streams.faust_app`."""

from __future__ import annotations

from pydantic import Field

from streams.settings import StreamSettings


class ProcessorSettings(StreamSettings):
    """The processor's limits beside the Kafka settings it shares with every other component."""

    # The processor deployment's name: each engine derives its consumer group and changelog topic from it.
    processor_app_id: str = "tollgate-ledger"
    # Pull bounded batches: at most this many records, or what arrived within the wait.
    processor_batch_max: int = Field(default=2_000, ge=1, le=100_000)
    processor_batch_wait_ms: int = Field(default=20, ge=1, le=10_000)
    # How often offsets are committed (only ever offsets whose outputs and state the broker acked).
    processor_commit_interval_ms: int = Field(default=500, ge=10)
    # Expiries of quiet tenants are published when wall-clock time passes them, this often.
    processor_expiry_sweep_interval_ms: int = Field(default=5_000, ge=100)
    # Allowed lateness before wall-clock time publishes an expiry (later events still get corrections).
    processor_expiry_grace_ms: int = Field(default=60_000, ge=0)
    processor_stream_buffer_max: int = Field(default=20_000, ge=1)
    # faust's own producer (the table's changelog): linger so state writes go out in batches.
    processor_changelog_linger_ms: int = Field(default=5, ge=0, le=1_000)
    processor_changelog_batch_size_bytes: int = Field(default=256 * 1024, ge=1024)
    processor_data_dir: str = "var/tollgate/faust"
    # Batch engine: where each processor process keeps its on-disk state (RocksDB: accounts, seen usage ids
    # and the usage index; streams.state_store), one directory per process under this one. It is a cache of
    # the changelog topic (the source of truth): a (re)started process wipes the directories of processes
    # that are gone and reads its partitions' state back from the changelog. Under var/tollgate, beside the
    # faust engine's data dir and the spools, so the default does not depend on the machine.
    processor_state_dir: str = "var/tollgate/processor-state"
    # A crashed processor's partitions move to the others after this long without heartbeats.
    processor_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    processor_heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    # Batch engine: the most bytes one fetch brings per partition (bounds memory per batch).
    processor_fetch_partition_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Batch engine: a partition's state is read back from its changelog within this long, or it fails.
    processor_changelog_read_timeout_ms: int = Field(default=60_000, ge=100)
    # Batch engine: a batch whose outputs or state the broker did not acknowledge is retried from the
    # last committed offsets this many times, with doubling backoff; then the process exits (non-zero).
    processor_batch_retries_max: int = Field(default=5, ge=0, le=100)
    processor_retry_backoff_initial_ms: int = Field(default=200, ge=1)
