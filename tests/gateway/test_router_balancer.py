"""Picking a worker by queue depth and observed latency (gateway.balancer): the order on its own, and over
two real workers, one kept busy: the Responses API's requests go to the idle one."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import openai
import pytest

from gateway.balancer import order_by_load
from gateway.workers import GENERATE_PATH, GenerateCall
from inference.internal_auth import authorization_header
from inference.settings import EngineSettings
from tests.gateway.conftest import (
    INTERNAL_TOKEN,
    RecordingAdmission,
    gateway_settings,
    insert_tenant_with_key,
    start_gateway,
    start_worker,
)

MODEL = "tollgate-tiny"


class Named:
    def __init__(self, url: str) -> None:
        self.url = url


def test_the_least_queued_then_the_fastest_worker_comes_first():
    a, b, c, d = Named("a"), Named("b"), Named("c"), Named("d")
    depth = {"a": 3, "b": 0, "c": 0, "d": 0}
    latency = {"b": 40.0, "c": 10.0}  # d: never measured, so tried first among equals
    assert [worker.url for worker in order_by_load([a, b, c, d], depth, latency)] == ["d", "c", "b", "a"]
    assert [worker.url for worker in order_by_load([b, c], {}, {})] == ["b", "c"]  # equals keep the rotation


@pytest.fixture(scope="module")
def two_workers():
    engine = EngineSettings(device="cpu", running_sequences_max=1, waiting_queue_depth_max=8)
    workers = [start_worker(engine), start_worker(engine)]
    yield workers
    for worker in workers:
        worker.server.stop()


@pytest.mark.postgres
async def test_requests_go_to_the_worker_with_the_shorter_queue(two_workers, module_database_url):
    busy, idle = two_workers
    settings = gateway_settings([busy.url, idle.url], worker_load_poll_interval_ms=20)
    gateway = start_gateway(module_database_url, settings, RecordingAdmission())
    tenant = insert_tenant_with_key(module_database_url, "balancer-acme")
    client = openai.AsyncOpenAI(api_key=tenant.key, base_url=gateway.url + "/v1", max_retries=0)
    headers = {"Authorization": authorization_header(INTERNAL_TOKEN), "content-type": "application/json"}
    try:
        async with httpx.AsyncClient(base_url=busy.url, headers=headers, timeout=60) as direct:
            # Three long generations straight onto one worker: one running, two waiting.
            streams = []
            for _ in range(3):
                call = GenerateCall(
                    request_id=uuid.uuid4().hex,
                    tenant_id=tenant.tenant_id,
                    tier="pro",
                    model=MODEL,
                    prompt="Once upon a time",
                    max_tokens=250,
                    stop=(),
                    temperature=1.0,
                    top_p=1.0,
                    seed=1,
                )
                request = direct.build_request("POST", GENERATE_PATH, content=call.encode(call.request_id))
                streams.append(await direct.send(request, stream=True))
                assert streams[-1].status_code == 200
            await asyncio.sleep(0.2)  # a few polls of the workers' /health
            for _ in range(4):
                response = await client.responses.create(
                    model=MODEL, input="Hi", max_output_tokens=2, store=False
                )
                request_id = response.id.removeprefix("resp_")
                idle.usage_of(request_id)  # served (and billed) by the idle worker
                assert all(event.event_id != request_id for event in busy.usage)
            for stream in streams:
                await stream.aclose()
    finally:
        gateway.server.stop()
