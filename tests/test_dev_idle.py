"""An idle `tollgate dev` is light: under 3% of one core for the whole of it (this process, its watchdog and
its PostgreSQL), sampled from /proc over 30 s. Before LISTEN/NOTIFY it burned about 40%: the embedded
log's readers queried every partition of every topic ten to twenty times a second."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures.processes import free_port
from tests.test_dev_smoke import postmaster_pid, start_dev, stop, wait_for_demo

IDLE_CPU_PERCENT_OF_ONE_CORE_MAX = 3.0
SAMPLE_WINDOW_S = 30
SETTLE_S = 5  # after the banner: the first sweeps and view checks are start-up work
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # fields 14 and 15 of proc(5)


def process_tree(*roots: int) -> set[int]:
    pids = set(roots)
    for root in roots:
        pids |= {child.pid for child in psutil.Process(root).children(recursive=True)}
    return pids


@pytest.mark.slow
def test_an_idle_tollgate_dev_uses_under_3_percent_of_one_core(tmp_path):
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    process = start_dev(data_dir, free_port(), free_port(), log_path)
    try:
        wait_for_demo(process, data_dir / "demo.json", log_path, time.time() - 1)
        time.sleep(SETTLE_S)
        pids = process_tree(process.pid, postmaster_pid(data_dir))  # postgres runs in its own session
        assert len(pids) >= 4, "this process, its watchdog, the postmaster and its backends"
        before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(SAMPLE_WINDOW_S)
        used = sum(max(0.0, cpu_seconds(pid) - before[pid]) for pid in pids)
        assert process.poll() is None, log_path.read_text()[-4000:]
    finally:
        code = stop(process)
    percent = 100 * used / SAMPLE_WINDOW_S
    assert percent < IDLE_CPU_PERCENT_OF_ONE_CORE_MAX, f"idle tollgate dev used {percent:.1f}% of one core"
    assert code == 0
