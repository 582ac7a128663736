"""The asyncio front of the engine: streams, cancel from the consumer side, and shutdown with work in flight."""

from __future__ import annotations

import pytest
import torch

from inference.async_engine import AsyncEngine, EngineFailed
from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.request import FinishReason
from tests.inference.conftest import engine_settings


def make_async_engine(default_models, tokenizer) -> AsyncEngine:
    return AsyncEngine(Engine(default_models("cpu", torch.float32), tokenizer, engine_settings()))


async def test_stream_cancel_ends_with_one_cancelled_output(default_models, tokenizer):
    async_engine = make_async_engine(default_models, tokenizer)
    await async_engine.start()
    finished: list[RequestOutput] = []
    stream = async_engine.submit(GenerationRequest(request_id="a", prompt="The", max_tokens=200), finished.append)
    outputs = []
    async for output in stream:
        outputs.append(output)
        if len(outputs) == 3:
            stream.cancel()
    await async_engine.stop()
    assert outputs[-1].finish_reason is FinishReason.CANCELLED and sum(o.finished for o in outputs) == 1
    assert [output.request_id for output in finished] == ["a"]
    assert finished[0].completion_tokens == sum(o.token_id is not None for o in outputs) < 200


async def test_stop_cancels_work_in_flight_and_reports_each_request_once(default_models, tokenizer):
    async_engine = make_async_engine(default_models, tokenizer)
    await async_engine.start()
    finished: list[RequestOutput] = []
    streams = [
        async_engine.submit(GenerationRequest(request_id=f"r{i}", prompt="The", max_tokens=250), finished.append)
        for i in range(6)  # more than the 4 running places: some are still waiting at stop
    ]
    await anext(streams[0])
    await async_engine.stop()
    assert sorted(output.request_id for output in finished) == [f"r{i}" for i in range(6)]
    assert all(output.finish_reason is FinishReason.CANCELLED for output in finished)
    assert not async_engine.engine.has_unfinished_requests() and async_engine.engine.cache.free_slot_count == 4


class EngineThatBreaks(Engine):
    """Fails on its fourth step, as a bug in the model code would."""

    steps = 0

    def step(self):
        self.steps += 1
        if self.steps == 4:
            raise RuntimeError("simulated kernel failure")
        return super().step()


async def test_a_dying_loop_fails_streams_and_still_reports_each_request(default_models, tokenizer):
    engine = EngineThatBreaks(default_models("cpu", torch.float32), tokenizer, engine_settings())
    async_engine = AsyncEngine(engine)
    await async_engine.start()
    finished: list[RequestOutput] = []
    stream = async_engine.submit(GenerationRequest(request_id="a", prompt="The", max_tokens=50), finished.append)
    tokens = 0
    with pytest.raises(EngineFailed):
        async for output in stream:
            tokens += output.token_id is not None
    await async_engine.stop()
    assert not async_engine.healthy
    assert [(o.request_id, o.finish_reason, o.completion_tokens) for o in finished] == [("a", FinishReason.CANCELLED, 3)]
    assert tokens == 3
