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
import pytest
from openai import OpenAI

from tests.fixtures.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
BALANCE_TIMEOUT_S = 20

pytestmark = pytest.mark.slow


def start_dev(data_dir: Path, port: int, worker_port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TOLLGATE_DATABASE_URL")}
    return subprocess.Popen(
        [sys.executable, "-m", "tollgate", "dev", "--data-dir", str(data_dir), "--port", str(port),
         "--worker-port", str(worker_port)],
        cwd=REPO_ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )


def wait_for_demo(process: subprocess.Popen, demo_file: Path, log_path: Path, since: float) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-4000:]
        if demo_file.exists() and demo_file.stat().st_mtime >= since and "Tollgate is running" in log_path.read_text():
            return json.loads(demo_file.read_text())
        time.sleep(0.5)
    raise AssertionError(f"not up within {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=STOP_TIMEOUT_S)


def balance(demo: dict) -> int:
    admin = httpx.Client(base_url=demo["base_url"].removesuffix("/v1"), headers={"Authorization": f"Bearer {demo['admin_token']}"})
    with admin:
        response = admin.get(f"/admin/v1/tenants/{demo['tenant_id']}/balance")
    response.raise_for_status()
    return response.json()["balance"]


def test_make_run_serves_a_billed_streaming_completion_and_restarts_on_its_data(tmp_path):
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    port, worker_port = free_port(), free_port()
    started = time.time()
    process = start_dev(data_dir, port, worker_port, log_path)
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, started - 1)
        assert set(demo) >= {"base_url", "api_key", "admin_token", "tenant_id"}
        assert demo["api_key"] in log_path.read_text(), "the key is printed for the newcomer"
        before = balance(demo)

        client = OpenAI(base_url=demo["base_url"], api_key=demo["api_key"])
        pieces, usage = [], None
        stream = client.chat.completions.create(
            model="tollgate-tiny", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=16,
            stream=True, stream_options={"include_usage": True},
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
