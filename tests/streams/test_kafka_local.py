"""The scripts/kafka-local command line (the broker itself is exercised through the kafka_broker fixture)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scripts import kafka_local

WRAPPER = Path(__file__).resolve().parents[2] / "scripts" / "kafka-local"


def test_status_of_a_directory_without_a_broker_fails(tmp_path):
    result = subprocess.run(
        [str(WRAPPER), "status", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "no broker running" in result.stderr


def test_stop_and_kill_without_a_broker_are_no_ops(tmp_path):
    assert kafka_local.stop(tmp_path) is False
    assert kafka_local.kill(tmp_path) is False


def test_a_stale_pid_file_is_not_mistaken_for_a_broker(tmp_path):
    (tmp_path / kafka_local.PID_FILE).write_text("1\n")  # pid 1 exists but is not this directory's broker
    assert kafka_local.running_pid(tmp_path) is None


def test_cluster_ids_look_like_kafka_uuids():
    for _ in range(50):
        cluster_id = kafka_local._cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")


@pytest.mark.kafka
def test_cli_status_reports_the_running_broker(kafka_broker):
    if not isinstance(getattr(kafka_broker, "directory", None), Path):
        pytest.skip("the testcontainers broker is not started by scripts/kafka-local")
    result = subprocess.run(
        [str(WRAPPER), "status", "--dir", str(kafka_broker.directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == kafka_broker.bootstrap
