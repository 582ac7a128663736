"""`kill -9` of `tollgate dev` under load, several rounds: every response a client received in full is on
the ledger exactly once, no usage is billed twice, and the balance is the grant minus what was billed.

The kill lands at a seeded random moment of each round (TOLLGATE_CRASH_SEED replays a failing run), while
eight clients stream chat completions, so it hits requests at every stage: admitted, generating, between
the done line and its usage event, being folded or projected.
"""

from __future__ import annotations

import os
import random
import signal
import time

import httpx
import pytest

from tests.crash.load import Load, wait_ledger_settled
from tests.fixtures.processes import free_port
from tests.test_dev_smoke import START_TIMEOUT_S, start_dev, stop, wait_for_demo

pytestmark = pytest.mark.slow

ROUNDS = 4
CLIENTS = 32
MAX_TOKENS = 8
LOAD_BEFORE_KILL_S = (2.0, 6.0)  # each round's kill comes at a random moment in this range
SETTLE_TIMEOUT_S = 90
SEED = int(os.environ.get("TOLLGATE_CRASH_SEED", "11"))


def test_kill_9_of_tollgate_dev_under_load_bills_every_complete_response_once(tmp_path):
    rng = random.Random(SEED)
    data_dir, log_path = tmp_path / ".tollgate", tmp_path / "dev.log"
    port, worker_port = free_port(), free_port()
    outcomes = []
    demo = None
    for round_number in range(ROUNDS):
        started = time.time()
        process = start_dev(data_dir, port, worker_port, log_path)
        try:
            demo = wait_for_demo(process, data_dir / "demo.json", log_path, started - 1)
            with Load([demo["base_url"].removesuffix("/v1")], demo["api_key"], CLIENTS, MAX_TOKENS) as load:
                deadline = time.monotonic() + START_TIMEOUT_S
                while load.complete_count() < CLIENTS and time.monotonic() < deadline:
                    time.sleep(0.1)  # warm: every client has had a response before the kill window starts
                time.sleep(rng.uniform(*LOAD_BEFORE_KILL_S))
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            outcomes += load.outcomes
        finally:
            if process.poll() is None:
                process.kill()
        errors = [o.error for o in load.outcomes if o.error][:5]
        assert any(o.complete for o in load.outcomes), (
            f"round {round_number} served nothing (seed {SEED}): {errors}"
        )

    started = time.time()
    process = start_dev(data_dir, port, worker_port, log_path)
    try:
        demo = wait_for_demo(process, data_dir / "demo.json", log_path, started - 1)
        admin = httpx.Client(
            base_url=demo["base_url"].removesuffix("/v1"),
            headers={"Authorization": f"Bearer {demo['admin_token']}"},
            timeout=30,
        )
        with admin:
            figures = wait_ledger_settled(
                admin, demo["tenant_id"], demo_granted(admin, demo), outcomes, SETTLE_TIMEOUT_S
            )
        print(f"seed {SEED}: {figures}")
    finally:
        assert stop(process) == 0, log_path.read_text()[-4000:]


def demo_granted(admin: httpx.Client, demo: dict) -> int:
    """The demo tenant's credit granted: the sum of its blocks' amounts now."""
    blocks = admin.get(f"/admin/v1/tenants/{demo['tenant_id']}/balance").json()["blocks"]
    return sum(block["amount"] for block in blocks)
