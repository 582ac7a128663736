"""The worker over real HTTP (uvicorn on a free port): streaming, usage events (awaited before the last
line), authentication, sampling parameters, overload, disconnect, engine failures, health."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn

from inference.engine import Engine
from inference.internal_auth import authorization_header
from inference.request import SEED_MAX
from inference.settings import EngineSettings, WorkerSettings
from inference.tokenizer import count_tokens
from inference.worker import create_app, watch_health
from ledger.events import UsageRecorded
from tests.inference.conftest import INTERNAL_TOKEN

STARTUP_POLLS_MAX = 600
WAIT_S = 60.0
LONG_PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"


class RecordingUsage:
    """The injected emit_usage: records every event; tests wait for a given request id."""

    def __init__(self) -> None:
        self.events: list[UsageRecorded] = []
        self._changed = threading.Condition()

    async def __call__(self, event: UsageRecorded) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def wait_for(self, request_id: str) -> UsageRecorded:
        with self._changed:
            found = self._changed.wait_for(lambda: self.for_request(request_id), timeout=WAIT_S)
        assert found, f"no UsageRecorded for {request_id}"
        events = self.for_request(request_id)
        assert len(events) == 1, f"{len(events)} UsageRecorded events for {request_id}"
        return events[0]

    def for_request(self, request_id: str) -> list[UsageRecorded]:
        return [event for event in self.events if event.event_id == request_id]


class GatedEngine(Engine):
    """The real engine whose step waits while `gate` is clear, so a test can hold the loop still."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()

    def step(self):
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return super().step()


AUTHORIZATION = {"Authorization": authorization_header(INTERNAL_TOKEN).decode()}


@contextmanager
def serve(
    default_models, tokenizer, usage=None, worker_overrides: dict | None = None, on_fatal=None, **engine_overrides
) -> Iterator[tuple[httpx.Client, RecordingUsage]]:
    engine_settings = EngineSettings(**({"device": "cpu", "torch_threads": 0, "step_tokens_max": 64, "prefill_chunk_tokens_max": 32} | engine_overrides))
    settings = WorkerSettings(engine=engine_settings, retry_after_s=2, **(worker_overrides or {}))
    engine = GatedEngine(default_models("cpu", torch.float32), tokenizer, engine_settings)
    usage = usage or RecordingUsage()
    app = create_app(settings, usage, engine=engine, internal_token=INTERNAL_TOKEN, on_fatal=on_fatal or unexpected_fatal)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(STARTUP_POLLS_MAX):
        if server.started:
            break
        started.wait(0.05)
    assert server.started, "worker did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S, headers=AUTHORIZATION) as client:
            client.app_engine = engine
            yield client, usage
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(WAIT_S)


def unexpected_fatal() -> None:
    raise AssertionError("the worker's health watchdog fired in a test that did not expect it")


@pytest.fixture(scope="module")
def worker(default_models, tokenizer):
    with serve(default_models, tokenizer, running_sequences_max=2, waiting_queue_depth_max=16) as running:
        yield running


def body(request_id: str, prompt: str = "The", max_tokens: int = 16, **extra) -> dict:
    return {"request_id": request_id, "tenant_id": "tenant-1", "tier": "standard", "model": "tollgate-tiny",
            "prompt": prompt, "max_tokens": max_tokens} | extra


def generate(client: httpx.Client, payload: dict) -> list[dict]:
    with client.stream("POST", "/internal/v1/generate", json=payload) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line]


def test_stream_ends_with_done_and_usage_matches_what_was_streamed(worker):
    client, usage = worker
    events = generate(client, body("req-stream", prompt=LONG_PROMPT, max_tokens=12))
    tokens, done = events[:-1], events[-1]
    assert all(event["type"] == "token" and isinstance(event["token_id"], int) for event in tokens)
    assert done["type"] == "done" and done["finish_reason"] in ("length", "stop")
    assert done["completion_tokens"] == len(tokens) and done["prompt_tokens"] == count_tokens(LONG_PROMPT)
    event = usage.wait_for("req-stream")
    assert (event.tenant_id, event.model) == ("tenant-1", "tollgate-tiny")
    assert (event.prompt_tokens, event.completion_tokens) == (done["prompt_tokens"], len(tokens))
    assert event.amount == event.prompt_tokens * 1 + event.completion_tokens * 2


def test_concurrent_requests_each_emit_exactly_one_usage(worker):
    client, usage = worker
    payloads = [body(f"req-many-{i}", prompt=LONG_PROMPT[: 10 + 7 * i], max_tokens=8 + i, stop=["\n\n"]) for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        streams = list(pool.map(lambda payload: generate(client, payload), payloads))
    for payload, events in zip(payloads, streams, strict=True):
        event = usage.wait_for(payload["request_id"])
        assert event.completion_tokens == sum(e["type"] == "token" for e in events) == events[-1]["completion_tokens"]
        assert event.prompt_tokens == count_tokens(payload["prompt"])


def test_prompt_tokens_are_accepted_instead_of_text(worker, tokenizer):
    client, usage = worker
    prompt_tokens = tokenizer.encode("A class definition")
    payload = body("req-ids", max_tokens=3) | {"prompt": None, "prompt_tokens": prompt_tokens}
    events = generate(client, payload)
    assert events[-1]["prompt_tokens"] == len(prompt_tokens)
    assert usage.wait_for("req-ids").prompt_tokens == len(prompt_tokens)


def test_bad_input_is_a_400_and_unknown_model_a_404(worker):
    client, usage = worker
    response = client.post("/internal/v1/generate", json=body("req-bad", max_tokens=100_000))
    assert response.status_code == 400 and "exceeds the context" in response.json()["message"]
    response = client.post("/internal/v1/generate", json=body("req-model", model="gpt-9"))
    assert response.status_code == 404 and response.json()["error"] == "model_not_found"
    response = client.post("/internal/v1/generate", json={"request_id": "x"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"  # never retried
    assert "tenant_id" in response.json()["message"]
    assert not usage.for_request("req-bad") and not usage.for_request("req-model")


def test_tokenize_counts_like_the_importable_function(worker):
    client, _ = worker
    text = "Hello, worker: count me the same way."
    answer = client.post("/internal/v1/tokenize", json={"text": text}).json()
    assert answer["count"] == len(answer["token_ids"]) == count_tokens(text)


def test_health_and_metrics(worker):
    client, _ = worker
    generate(client, body("req-metrics", max_tokens=4))
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["kv_cache_bytes"] > 0
    metrics = client.get("/metrics").text
    for name in (
        "tollgate_worker_queue_depth",
        "tollgate_worker_running",
        "tollgate_worker_batch_size_bucket",
        "tollgate_worker_tokens_per_second",
        "tollgate_worker_time_to_first_token_seconds_count",
        "tollgate_worker_kv_cache_bytes",
    ):
        assert name in metrics, name


def first_token(response: httpx.Response) -> dict:
    assert response.status_code == 200
    for line in response.iter_lines():
        if line:
            return json.loads(line)
    raise AssertionError("stream ended without a line")


def cancelled_count(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('tollgate_worker_requests_finished_total{finish_reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_full_queue_is_503_overloaded_at_once(default_models, tokenizer):
    with serve(default_models, tokenizer, running_sequences_max=1, waiting_queue_depth_max=1) as (client, usage):
        client.app_engine.gate.clear()  # the engine loop stops before its next schedule: nothing is admitted
        with client.stream("POST", "/internal/v1/generate", json=body("req-queued", max_tokens=3)) as queued:
            assert queued.status_code == 200  # accepted: it fills the one waiting place
            refused = client.post("/internal/v1/generate", json=body("req-refused"))
            assert refused.status_code == 503
            assert refused.json()["error"] == "overloaded" and refused.json()["retryable"] is True
            assert refused.headers["Retry-After"] == "2"
            client.app_engine.gate.set()
            events = [json.loads(line) for line in queued.iter_lines() if line]
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] in ("length", "stop")
        assert usage.wait_for("req-queued").completion_tokens == events[-1]["completion_tokens"]
        assert not usage.for_request("req-refused")


def test_client_disconnect_cancels_the_request(default_models, tokenizer):
    with serve(default_models, tokenizer, running_sequences_max=1) as (client, usage):
        engine = client.app_engine
        with client.stream("POST", "/internal/v1/generate", json=body("req-long", prompt=LONG_PROMPT, max_tokens=400)) as running:
            assert first_token(running)["type"] == "token"
            engine.gate.clear()  # hold the engine so the request cannot run to its end meanwhile
        # The connection is closed; the worker notices at its next write and cancels.
        engine.gate.set()
        cancelled = usage.wait_for("req-long")
        assert 1 <= cancelled.completion_tokens < 400
        assert cancelled_count(client) == 1
