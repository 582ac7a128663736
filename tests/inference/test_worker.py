"""The worker over real HTTP (uvicorn on a free port): streaming, usage events (awaited before the last
line), authentication, sampling parameters, overload, disconnect, engine failures, health."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
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
    default_models,
    tokenizer,
    usage=None,
    worker_overrides: dict | None = None,
    on_fatal=None,
    **engine_overrides,
) -> Iterator[tuple[httpx.Client, RecordingUsage]]:
    engine_settings = EngineSettings(
        **(
            {
                "device": "cpu",
                "torch_threads": 0,
                "running_sequences_max": 32,
                "step_tokens_max": 64,
                "prefill_chunk_tokens_max": 32,
            }
            | engine_overrides
        )
    )
    settings = WorkerSettings(engine=engine_settings, retry_after_s=2, **(worker_overrides or {}))
    engine = GatedEngine(default_models("cpu", torch.float32), tokenizer, engine_settings)
    usage = usage or RecordingUsage()
    fatal_calls: list[float] = []
    app = create_app(
        settings,
        usage,
        engine=engine,
        internal_token=INTERNAL_TOKEN,
        on_fatal=on_fatal or (lambda: fatal_calls.append(time.monotonic())),
    )
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
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S, headers=AUTHORIZATION
        ) as client:
            client.app_engine = engine
            yield client, usage
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(WAIT_S)
    assert not fatal_calls, "the worker's health watchdog fired in a test that did not expect it"


@pytest.fixture(scope="module")
def worker(default_models, tokenizer):
    with serve(default_models, tokenizer, running_sequences_max=2, waiting_queue_depth_max=16) as running:
        yield running


def body(request_id: str, prompt: str = "The", max_tokens: int = 16, **extra) -> dict:
    return {
        "request_id": request_id,
        "tenant_id": "tenant-1",
        "tier": "standard",
        "model": "tollgate-tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
    } | extra


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
    payloads = [
        body(f"req-many-{i}", prompt=LONG_PROMPT[: 10 + 7 * i], max_tokens=8 + i, stop=["\n\n"])
        for i in range(6)
    ]
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        streams = list(pool.map(lambda payload: generate(client, payload), payloads))
    for payload, events in zip(payloads, streams, strict=True):
        event = usage.wait_for(payload["request_id"])
        assert (
            event.completion_tokens
            == sum(e["type"] == "token" for e in events)
            == events[-1]["completion_tokens"]
        )
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
    with serve(default_models, tokenizer, running_sequences_max=1, waiting_queue_depth_max=1) as (
        client,
        usage,
    ):
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
        with client.stream(
            "POST", "/internal/v1/generate", json=body("req-long", prompt=LONG_PROMPT, max_tokens=400)
        ) as running:
            assert first_token(running)["type"] == "token"
            engine.gate.clear()  # hold the engine so the request cannot run to its end meanwhile
        # The connection is closed; the worker notices at its next write and cancels.
        engine.gate.set()
        cancelled = usage.wait_for("req-long")
        assert 1 <= cancelled.completion_tokens < 400
        assert cancelled_count(client) == 1


# ---- authentication --------------------------------------------------------------------------------


def test_internal_routes_need_the_internal_token_and_health_and_metrics_do_not(worker):
    client, usage = worker
    url = str(client.base_url)
    wrong = {"Authorization": authorization_header(INTERNAL_TOKEN[:-1] + "x").decode()}
    for headers in ({}, wrong, {"Authorization": INTERNAL_TOKEN}):  # none, a wrong token, no Bearer prefix
        response = httpx.post(
            f"{url}/internal/v1/generate", json=body("req-no-auth", max_tokens=2), headers=headers
        )
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert (
            httpx.post(f"{url}/internal/v1/tokenize", json={"text": "hi"}, headers=headers).status_code == 401
        )
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
    events = generate(client, body("req-auth", max_tokens=2))  # the client sends the right token
    assert events[-1]["type"] == "done"
    assert usage.wait_for("req-auth") and not usage.for_request("req-no-auth")


def test_the_app_refuses_a_short_token():
    with pytest.raises(ValueError, match="TOLLGATE_INTERNAL_TOKEN"):
        create_app(WorkerSettings(), RecordingUsage(), internal_token="too-short")


# ---- usage before the last line --------------------------------------------------------------------


class BlockingUsage(RecordingUsage):
    """Records each event only once the test releases it (as a slow broker acknowledgement would)."""

    def __init__(self) -> None:
        super().__init__()
        self.called = threading.Event()
        self.release = threading.Event()

    async def __call__(self, event: UsageRecorded) -> None:
        self.called.set()
        assert await asyncio.to_thread(self.release.wait, WAIT_S), "the test never released the publish"
        await super().__call__(event)


def read_lines_in_background(client: httpx.Client, payload: dict) -> tuple[list[dict], threading.Thread]:
    lines: list[dict] = []

    def read() -> None:
        with client.stream("POST", "/internal/v1/generate", json=payload) as response:
            assert response.status_code == 200
            lines.extend(json.loads(line) for line in response.iter_lines() if line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def test_done_line_is_sent_only_after_the_usage_is_published(default_models, tokenizer):
    usage = BlockingUsage()
    with serve(default_models, tokenizer, usage=usage) as (client, _):
        lines, reader = read_lines_in_background(client, body("req-blocked", max_tokens=5))
        assert usage.called.wait(WAIT_S), "the request never ended"
        reader.join(0.5)  # a worker that wrote done before publishing would have ended the stream by now
        assert reader.is_alive() and not usage.events
        assert all(line["type"] == "token" for line in lines)
        usage.release.set()
        reader.join(WAIT_S)
        assert not reader.is_alive()
    event = usage.wait_for("req-blocked")
    assert (
        lines[-1]["type"] == "done"
        and lines[-1]["completion_tokens"] == event.completion_tokens == len(lines) - 1
    )


class FailingUsage(RecordingUsage):
    """A publish that fails (broker refused and spool unwritable) or hangs past the worker's timeout."""

    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang = hang
        self.calls = 0

    async def __call__(self, event: UsageRecorded) -> None:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(WAIT_S)
        raise RuntimeError("simulated: the event log refused the record")


@pytest.mark.parametrize("hang", [False, True], ids=["fails", "times-out"])
def test_a_usage_that_is_not_recorded_ends_the_stream_with_usage_not_recorded(
    default_models, tokenizer, hang
):
    usage = FailingUsage(hang)
    with serve(default_models, tokenizer, usage=usage, worker_overrides={"usage_emit_timeout_ms": 300}) as (
        client,
        _,
    ):
        lines = generate(client, body("req-unbilled", max_tokens=4))
        metrics = client.get("/metrics").text
    tokens, last = lines[:-1], lines[-1]
    assert all(line["type"] == "token" for line in tokens) and not any(
        line["type"] == "done" for line in lines
    )
    assert (last["type"], last["error"], last["retryable"]) == ("error", "usage_not_recorded", False)
    assert last["completion_tokens"] == len(tokens) and last["prompt_tokens"] == count_tokens("The")
    assert usage.calls == 1 and "tollgate_worker_usage_emit_failures_total 1.0" in metrics


# ---- sampling parameters ---------------------------------------------------------------------------


def test_logprobs_are_on_token_lines_only_when_asked(worker):
    client, _ = worker
    plain = generate(client, body("req-plain", max_tokens=4))
    assert all("logprob" not in line and "top_logprobs" not in line for line in plain)
    lines = generate(client, body("req-logprobs", max_tokens=4, logprobs=True, top_logprobs=3))
    tokens = [line for line in lines if line["type"] == "token"]
    assert [line["token_id"] for line in tokens] == [
        line["token_id"] for line in plain if line["type"] == "token"
    ]
    for line in tokens:
        chosen, alternatives = line["logprob"], line["top_logprobs"]
        assert chosen["token_id"] == line["token_id"] and chosen["logprob"] <= 0.0
        assert isinstance(chosen["token"], str) and all(0 <= byte < 256 for byte in chosen["bytes"])
        assert (
            len(alternatives) == 3 and alternatives[0]["token_id"] == line["token_id"]
        )  # greedy: the top one
        assert alternatives[0]["logprob"] == pytest.approx(chosen["logprob"])
        assert [a["logprob"] for a in alternatives] == sorted(
            (a["logprob"] for a in alternatives), reverse=True
        )


def test_logit_bias_reaches_the_engine(worker):
    client, _ = worker
    first = generate(client, body("req-unbiased", max_tokens=1))[0]["token_id"]
    biased = generate(client, body("req-biased", max_tokens=1, logit_bias={str(first): -100}))[0]
    assert biased["type"] == "token" and biased["token_id"] != first


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"seed": SEED_MAX + 1}, "seed"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"logit_bias": {"\u0663": 1.0}}, "logit_bias"),  # a non-ASCII digit is not a token id
        ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"admitted_at_ms": -1}, "admitted_at_ms"),
    ],
)
def test_bad_sampling_fields_are_a_400_naming_the_field(worker, extra, named):
    client, usage = worker
    response = client.post("/internal/v1/generate", json=body("req-bad-field", **extra))
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert named in response.json()["message"]
    assert not usage.for_request("req-bad-field")


def test_usage_is_billed_at_the_admission_time(worker):
    client, usage = worker
    generate(client, body("req-admitted", max_tokens=2, admitted_at_ms=1_700_000_000_123))
    assert usage.wait_for("req-admitted").occurred_at == 1_700_000_000_123


# ---- failures in the engine ------------------------------------------------------------------------


def test_a_request_that_fails_in_the_engine_gets_request_failed_after_its_usage(
    default_models, tokenizer, monkeypatch
):
    with serve(default_models, tokenizer) as (client, usage):
        model = client.app_engine.model

        def broken_forward(*args, **kwargs):
            raise RuntimeError("simulated numerical failure")

        monkeypatch.setattr(model, "forward_packed", broken_forward)
        lines = generate(client, body("req-fails", max_tokens=4))
        monkeypatch.undo()
        assert len(lines) == 1
        failed = lines[0]
        assert (failed["type"], failed["error"], failed["retryable"]) == ("error", "request_failed", False)
        event = usage.wait_for("req-fails")
        assert (failed["prompt_tokens"], failed["completion_tokens"]) == (
            event.prompt_tokens,
            event.completion_tokens,
        )
        assert generate(client, body("req-after-failure", max_tokens=3))[-1]["type"] == "done"
        assert client.get("/health").json()["status"] == "ok"


def test_a_dead_engine_loop_fails_its_requests_bills_them_and_is_rebuilt(default_models, tokenizer):
    with serve(default_models, tokenizer) as (client, usage):
        engine = client.app_engine
        with client.stream(
            "POST", "/internal/v1/generate", json=body("req-in-flight", max_tokens=200)
        ) as running:
            lines = running.iter_lines()
            assert json.loads(next(lines))["type"] == "token"

            def dies(*args, **kwargs):
                raise RuntimeError("simulated: the step loop dies")

            engine.step = dies  # this engine instance only; the rebuilt one steps normally
            rest = [json.loads(line) for line in lines if line]
        last = rest[-1]
        assert (last["type"], last["error"], last["retryable"]) == ("error", "engine_failed", False)
        event = usage.wait_for("req-in-flight")
        assert (last["prompt_tokens"], last["completion_tokens"]) == (
            event.prompt_tokens,
            event.completion_tokens,
        )
        assert event.completion_tokens == 1 + sum(line["type"] == "token" for line in rest) < 200
        after = generate(client, body("req-after-restart", max_tokens=3))
        assert after[-1]["type"] == "done" and usage.wait_for("req-after-restart").completion_tokens == 3
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["engine_restarts"] == 1
        assert "tollgate_worker_engine_restarts_total 1.0" in client.get("/metrics").text


def test_failures_past_the_restart_limit_end_the_process(default_models, tokenizer, monkeypatch):
    fatal = threading.Event()
    overrides = {"engine_restarts_max": 1, "health_failed_exit_ms": 200, "health_check_interval_ms": 20}
    with serve(default_models, tokenizer, worker_overrides=overrides, on_fatal=fatal.set) as (client, usage):

        def dies(self):
            raise RuntimeError("simulated: every step loop dies")

        monkeypatch.setattr(Engine, "step", dies)  # the rebuilt engine too
        for attempt in ("req-dies-1", "req-dies-2"):
            assert generate(client, body(attempt, max_tokens=3))[-1]["error"] == "engine_failed"
            assert usage.wait_for(attempt).completion_tokens == 0
        assert fatal.wait(WAIT_S), "on_fatal was not called"
        assert client.get("/health").status_code == 503
        refused = client.post("/internal/v1/generate", json=body("req-refused-down", max_tokens=3))
        assert refused.status_code == 503 and refused.json()["error"] == "engine_failed"


async def test_watch_health_calls_on_fatal_only_after_an_unbroken_failed_spell():
    readings = iter([False, False, False, True] + [False] * 100)  # a 20 ms failed spell, then for good
    reads: list[bool] = []
    fatal: list[int] = []

    def is_healthy() -> bool:
        reads.append(next(readings))
        return reads[-1]

    def clock() -> float:  # 10 ms per read, however slow the machine
        return len(reads) * 0.010

    await asyncio.wait_for(
        watch_health(
            is_healthy,
            failed_exit_ms=50,
            interval_ms=1,
            on_fatal=lambda: fatal.append(len(reads)),
            clock=clock,
        ),
        WAIT_S,
    )
    assert fatal == [4 + 6]  # the second spell began at read 5; read 10 is 50 ms later


@pytest.mark.parametrize("token", [None, "short-token"], ids=["missing", "too-short"])
def test_the_worker_process_refuses_to_start_without_a_usable_token(token):
    environment = {name: value for name, value in os.environ.items() if name != "TOLLGATE_INTERNAL_TOKEN"}
    if token is not None:
        environment["TOLLGATE_INTERNAL_TOKEN"] = token
    finished = subprocess.run(
        [sys.executable, "-m", "inference.worker"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert finished.returncode != 0 and "TOLLGATE_INTERNAL_TOKEN" in finished.stderr
