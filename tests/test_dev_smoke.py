"""`make run`'s entry point, as a newcomer uses it: start, read .tollgate/demo.json, stream a chat
completion through the openai client, see the balance fall, Ctrl-C; a second start finds it all again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.fixtures.processes import free_port
from tollgate.dev import OWNER_FILE_NAME, SECRET_FILE_MODE, write_secret_file

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
BALANCE_TIMEOUT_S = 20

POSTGRES_GONE_TIMEOUT_S = 45


def start_dev(data_dir: Path, port: int, worker_port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tollgate",
            "dev",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            "--worker-port",
            str(worker_port),
        ],
        cwd=REPO_ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for_demo(
    process: subprocess.Popen, demo_file: Path, log_path: Path, since: float, banners: int = 1
) -> dict:
    """Until the run's banner is printed (the `banners`-th one in the log, which earlier runs append to)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-4000:]
        printed = log_path.read_text().count("Tollgate is running")
        if demo_file.exists() and demo_file.stat().st_mtime >= since and printed >= banners:
            return json.loads(demo_file.read_text())
        time.sleep(0.5)
    raise AssertionError(f"not up within {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=STOP_TIMEOUT_S)


def balance(demo: dict) -> int:
    admin = httpx.Client(
        base_url=demo["base_url"].removesuffix("/v1"),
        headers={"Authorization": f"Bearer {demo['admin_token']}"},
    )
    with admin:
        response = admin.get(f"/admin/v1/tenants/{demo['tenant_id']}/balance")
    response.raise_for_status()
    return response.json()["balance"]


@pytest.mark.slow
def test_make_run_serves_a_billed_streaming_completion_and_restarts_on_its_data(tmp_path):
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    port, worker_port = free_port(), free_port()
    started = time.time()
    process = start_dev(data_dir, port, worker_port, log_path)
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, started - 1)
        assert set(demo) >= {"base_url", "api_key", "admin_token", "tenant_id"}
        assert (data_dir / "demo.json").stat().st_mode & 0o777 == SECRET_FILE_MODE, "it holds the admin token"
        assert demo["api_key"] in log_path.read_text(), "the key is printed for the newcomer"
        before = balance(demo)

        client = OpenAI(base_url=demo["base_url"], api_key=demo["api_key"])
        pieces, usage = [], None
        stream = client.chat.completions.create(
            model="tollgate-tiny",
            messages=[{"role": "user", "content": "Once upon a time"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            elif chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) and usage is not None and usage.completion_tokens > 0

        deadline = time.monotonic() + BALANCE_TIMEOUT_S
        while balance(demo) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        after = balance(demo)
        assert after < before, "the balance falls by the request's cost"
    finally:
        code = stop(process)
    assert code == 0, log_path.read_text()[-4000:]

    restarted_at = time.time()
    again = start_dev(data_dir, port, worker_port, log_path)
    try:
        demo_again = wait_for_demo(again, data_dir / "demo.json", log_path, restarted_at - 1)
        assert (demo_again["tenant_id"], demo_again["api_key"]) == (demo["tenant_id"], demo["api_key"])
        assert balance(demo_again) == after
    finally:
        assert stop(again) == 0


def test_secret_files_are_written_owner_only_and_replace_a_wider_file(tmp_path):
    path = tmp_path / "demo.json"
    path.write_text("old")
    path.chmod(0o644)
    write_secret_file(path, '{"admin_token": "x"}')
    assert path.read_text() == '{"admin_token": "x"}'
    assert path.stat().st_mode & 0o777 == SECRET_FILE_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"], "no temporary file is left behind"


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not running(pid)


def crash(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL: no atexit, no cleanup
    process.wait(timeout=STOP_TIMEOUT_S)


@pytest.mark.slow
def test_a_killed_dev_leaves_no_postgres_running_and_the_next_runs_start_fresh_on_the_same_data(tmp_path):
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    port, worker_port = free_port(), free_port()
    first = start_dev(data_dir, port, worker_port, log_path)
    try:
        demo = wait_for_demo(first, data_dir / "demo.json", log_path, time.time() - 1)
        first_postmaster = postmaster_pid(data_dir)
    finally:
        crash(first)
    assert wait_gone(first_postmaster, POSTGRES_GONE_TIMEOUT_S), (
        "the watchdog stops the killed run's Postgres"
    )

    second, watchdog = start_dev(data_dir, port, worker_port, log_path), None
    try:
        again = wait_for_demo(second, data_dir / "demo.json", log_path, time.time() - 1, banners=2)
        assert (again["tenant_id"], again["api_key"]) == (demo["tenant_id"], demo["api_key"])
        second_postmaster = postmaster_pid(data_dir)
        assert second_postmaster != first_postmaster
        watchdog = json.loads((data_dir / OWNER_FILE_NAME).read_text())["watchdog_pid"]
    finally:
        if watchdog is not None:
            os.kill(watchdog, signal.SIGKILL)  # the watchdog gone too: only the next start can clean up
        crash(second)
    time.sleep(1)
    assert running(second_postmaster), "nothing stopped it yet"

    third = start_dev(data_dir, port, worker_port, log_path)
    try:
        third_demo = wait_for_demo(third, data_dir / "demo.json", log_path, time.time() - 1, banners=3)
        assert not running(second_postmaster), "the next start stopped the orphaned Postgres"
        assert postmaster_pid(data_dir) != second_postmaster
        assert balance(third_demo) > 0
        third_postmaster = postmaster_pid(data_dir)
    finally:
        assert stop(third) == 0, log_path.read_text()[-4000:]
    assert wait_gone(third_postmaster, POSTGRES_GONE_TIMEOUT_S), (
        "a clean stop after crashes stops Postgres too"
    )


def test_the_internal_token_is_the_configured_one_or_a_fresh_random_one(monkeypatch):
    from inference.internal_auth import INTERNAL_TOKEN_CHARS_MIN, InternalTokenMissing
    from tollgate.dev import dev_internal_token

    monkeypatch.delenv("TOLLGATE_INTERNAL_TOKEN", raising=False)
    first, second = dev_internal_token(), dev_internal_token()
    assert first != second and min(len(first), len(second)) >= INTERNAL_TOKEN_CHARS_MIN
    monkeypatch.setenv("TOLLGATE_INTERNAL_TOKEN", "k" * INTERNAL_TOKEN_CHARS_MIN)
    assert dev_internal_token() == "k" * INTERNAL_TOKEN_CHARS_MIN
    monkeypatch.setenv("TOLLGATE_INTERNAL_TOKEN", "short")
    with pytest.raises(InternalTokenMissing):
        dev_internal_token()
