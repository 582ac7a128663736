"""Settings of the Kafka side: broker address, topic layout, producer limits and the spool
(env TOLLGATE_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DAY_MS = 24 * 60 * 60 * 1000


class StreamSettings(BaseSettings):
    """Every limit is explicit and named with its unit last. Read from TOLLGATE_<FIELD> variables."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore")

    # Where the brokers are: "host:port[,host:port...]".
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # Prepended to every topic name ("" in production; unique per test so tests stay apart).
    topic_prefix: str = ""
    # One partition owns a tenant; every ledger topic has the same count so they stay co-partitioned.
    topic_partitions: int = Field(default=6, ge=1, le=1024)
    # replicas of each topic (tollgate topics creates them so)
    topic_replication_factor: int = Field(default=1, ge=1, le=16)
    # Dead letters are kept for inspection, not forever.
    dlq_retention_ms: int = Field(default=30 * DAY_MS, gt=0)

    # Producer: acks=all and idempotence are fixed in code; these are its limits.
    producer_linger_ms: int = Field(default=5, ge=0, le=1000)
    # bytes a producer batch may fill before it is sent. A stream processor publishes thousands of records a
    # batch: 256 KiB makes a quarter of the produce requests 64 KiB did (bench.streams, fold rate 27.6k-29.4k
    # -> 29.5k-32.8k events/s); single events never fill one. Below the broker's 1 MiB record batch limit.
    producer_batch_size_bytes: int = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    producer_request_timeout_ms: int = Field(default=10_000, ge=100)  # one produce request to the broker
    # wait before the client's own retry of a produce request
    producer_retry_backoff_ms: int = Field(default=100, ge=1)
    # topic metadata refreshed at least this often
    producer_metadata_max_age_ms: int = Field(default=60_000, ge=1000)
    # idle broker connections closed after this long
    producer_connections_max_idle_ms: int = Field(default=540_000, ge=1000)
    # How long publish() waits for the broker's ack before the event goes to the spool.
    publish_ack_timeout_ms: int = Field(default=5_000, ge=10)
    # How long stop() lets the Kafka client flush before it gives up (spooled events stay on disk).
    producer_close_timeout_ms: int = Field(default=5_000, ge=10)

    # The durable spool for events the broker did not acknowledge: each process has its own file in
    # spool_dir (producer-<pid>.sqlite3) and adopts the files of dead processes there on start;
    # spool_path, when set, names one file instead (one process at a time).
    spool_dir: Path = Path("var/tollgate/spool")
    # one named spool file instead of a per-process one in spool_dir (one owner at a time)
    spool_path: Path | None = None
    # key and value bytes the spool holds; a full spool refuses the event (the publish fails, nothing dropped)
    spool_size_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Resending from the spool: bounded batches, exponential backoff while the broker stays away.
    resend_batch_max: int = Field(default=500, ge=1, le=100_000)
    # first wait before resending spooled events, doubled per failure
    resend_backoff_initial_ms: int = Field(default=200, ge=1)
    resend_backoff_max_ms: int = Field(default=5_000, ge=1)  # longest wait between resends of spooled events

    # Admin requests (topic creation, config reads).
    admin_request_timeout_ms: int = Field(default=15_000, ge=100)
