"""The worker's usage events through the real EventProducer and a real broker."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from inference.engine import Engine
from inference.internal_auth import authorization_header
from inference.settings import EngineSettings, WorkerSettings
from inference.worker import create_app
from ledger.codec import decode_event
from ledger.events import UsageRecorded
from streams.producer import EventProducer
from tests.inference.conftest import INTERNAL_TOKEN
from tests.streams.helpers import create_ledger_topics, read_topic, stream_settings

pytestmark = pytest.mark.kafka


async def test_every_request_lands_once_on_the_events_topic(
    kafka_broker, topic_prefix, tmp_path, default_models, tokenizer
):
    settings = stream_settings(kafka_broker.bootstrap, topic_prefix, tmp_path)
    await create_ledger_topics(settings)
    engine_settings = EngineSettings(device="cpu", torch_threads=0, running_sequences_max=4)
    engine = Engine(default_models("cpu", torch.float32), tokenizer, engine_settings)
    streamed = {}
    async with EventProducer(settings) as producer:
        app = create_app(
            WorkerSettings(engine=engine_settings),
            emit_usage=producer.publish,
            engine=engine,
            internal_token=INTERNAL_TOKEN,
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": authorization_header(INTERNAL_TOKEN).decode()}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://worker", headers=headers
            ) as client:
                for index in range(3):
                    request_id = f"{topic_prefix}req-{index}"
                    payload = {
                        "request_id": request_id,
                        "tenant_id": f"tenant-{index}",
                        "tier": "pro",
                        "model": "tollgate-tiny",
                        "prompt": "The license",
                        "max_tokens": 3 + index,
                    }
                    response = await client.post("/internal/v1/generate", json=payload)
                    lines = [json.loads(line) for line in response.text.splitlines()]
                    assert lines[-1]["type"] == "done"
                    streamed[request_id] = lines[-1]
            # Read while the worker is still up: no done line went out before the broker acknowledged
            # that request's usage, so none of it waits for the shutdown drain.
            records = await read_topic(
                kafka_broker.bootstrap, topic_prefix + "ledger.events", 3, expected_count=3
            )
    events = [decode_event(record.value) for record in records]
    assert sorted(event.event_id for event in events) == sorted(streamed)
    for record, event in zip(records, events, strict=True):
        assert isinstance(event, UsageRecorded) and record.key == event.tenant_id.encode()
        done = streamed[event.event_id]
        assert (event.prompt_tokens, event.completion_tokens) == (
            done["prompt_tokens"],
            done["completion_tokens"],
        )
        assert event.amount == event.prompt_tokens + 2 * event.completion_tokens
