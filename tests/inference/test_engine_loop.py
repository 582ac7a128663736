"""The asyncio front of the engine: streams, cancel from the consumer side, shutdown with work in flight,
a dying loop (its requests billed, the engine rebuilt within limits), and delivery isolated per output."""

from __future__ import annotations

import asyncio

import pytest
import torch

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.engine_loop import EngineFailed, EngineLoop
from inference.metrics import WorkerMetrics
from inference.request import FinishReason
from tests.inference.conftest import engine_settings

WAIT_S = 60.0


def make_engine_loop(default_models, tokenizer) -> EngineLoop:
    return EngineLoop(Engine(default_models("cpu", torch.float32), tokenizer, engine_settings()))


async def test_stream_cancel_ends_with_one_cancelled_output(default_models, tokenizer):
    engine_loop = make_engine_loop(default_models, tokenizer)
    await engine_loop.start()
    finished: list[RequestOutput] = []
    stream = engine_loop.submit(
        GenerationRequest(request_id="a", prompt="The", max_tokens=200), finished.append
    )
    outputs = []
    async for output in stream:
        outputs.append(output)
        if len(outputs) == 3:
            stream.cancel()
    await engine_loop.stop()
    assert outputs[-1].finish_reason is FinishReason.CANCELLED and sum(o.finished for o in outputs) == 1
    assert [output.request_id for output in finished] == ["a"]
    assert finished[0].completion_tokens == sum(o.token_id is not None for o in outputs) < 200


async def test_stop_cancels_work_in_flight_and_reports_each_request_once(default_models, tokenizer):
    engine_loop = make_engine_loop(default_models, tokenizer)
    await engine_loop.start()
    finished: list[RequestOutput] = []
    streams = [
        engine_loop.submit(
            GenerationRequest(request_id=f"r{i}", prompt="The", max_tokens=250), finished.append
        )
        for i in range(6)  # more than the 4 running places: some are still waiting at stop
    ]
    await anext(streams[0])
    await engine_loop.stop()
    assert sorted(output.request_id for output in finished) == [f"r{i}" for i in range(6)]
    assert all(output.finish_reason is FinishReason.CANCELLED for output in finished)
    assert not engine_loop.engine.has_unfinished_requests() and engine_loop.engine.scheduler.kv.usage() == 0.0


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
    engine_loop = EngineLoop(engine)
    await engine_loop.start()
    finished: list[RequestOutput] = []
    stream = engine_loop.submit(
        GenerationRequest(request_id="a", prompt="The", max_tokens=50), finished.append
    )
    tokens = 0
    with pytest.raises(EngineFailed):
        async for output in stream:
            tokens += output.token_id is not None
    await engine_loop.stop()
    assert not engine_loop.healthy
    assert [(o.request_id, o.finish_reason, o.completion_tokens) for o in finished] == [
        ("a", FinishReason.CANCELLED, 3)
    ]
    assert tokens == 3


async def consume(stream) -> tuple[list[RequestOutput], BaseException | None]:
    outputs: list[RequestOutput] = []
    try:
        async for output in stream:
            outputs.append(output)
    except EngineFailed as error:
        return outputs, error
    return outputs, None


async def test_a_dead_loop_is_rebuilt_and_serves_new_requests(default_models, tokenizer):
    engine = EngineThatBreaks(default_models("cpu", torch.float32), tokenizer, engine_settings())
    engine_loop = EngineLoop(engine, restarts_max=1)
    await engine_loop.start()
    finished: list[RequestOutput] = []
    failed_stream = engine_loop.submit(
        GenerationRequest(request_id="a", prompt="The", max_tokens=50), finished.append
    )
    outputs, error = await asyncio.wait_for(consume(failed_stream), WAIT_S)
    assert isinstance(error, EngineFailed) and error.output == finished[0]
    assert len(outputs) == 3 and (finished[0].request_id, finished[0].completion_tokens) == ("a", 3)
    assert engine_loop.healthy and engine_loop.restarts == 1 and engine_loop.engine is not engine
    after = engine_loop.submit(GenerationRequest(request_id="b", prompt="The", max_tokens=5), finished.append)
    outputs, error = await asyncio.wait_for(consume(after), WAIT_S)
    await engine_loop.stop()
    assert error is None and outputs[-1].finish_reason is FinishReason.LENGTH
    assert [(o.request_id, o.completion_tokens) for o in finished] == [("a", 3), ("b", 5)]


class EngineThatAlwaysBreaks(Engine):
    def step(self):
        raise RuntimeError("simulated: broken for good")


async def test_failures_past_restarts_max_within_the_window_leave_it_down(default_models, tokenizer):
    model = default_models("cpu", torch.float32)
    rebuilt: list[Engine] = []

    def rebuild(failed: Engine) -> Engine:
        rebuilt.append(EngineThatAlwaysBreaks(failed.model, failed.tokenizer, failed.settings))
        return rebuilt[-1]

    engine_loop = EngineLoop(
        EngineThatAlwaysBreaks(model, tokenizer, engine_settings()), restarts_max=2, rebuild=rebuild
    )
    await engine_loop.start()
    finished: list[RequestOutput] = []
    for attempt in range(3):
        stream = engine_loop.submit(
            GenerationRequest(request_id=f"r{attempt}", prompt="The", max_tokens=5), finished.append
        )
        _, error = await asyncio.wait_for(consume(stream), WAIT_S)
        assert isinstance(error, EngineFailed)
    assert len(rebuilt) == 2 and engine_loop.restarts == 2 and not engine_loop.healthy
    with pytest.raises(EngineFailed):
        engine_loop.submit(GenerationRequest(request_id="r3", prompt="The", max_tokens=5))
    await engine_loop.stop()
    assert [(o.request_id, o.prompt_tokens, o.completion_tokens) for o in finished] == [
        (f"r{i}", 0, 0) for i in range(3)
    ]


class EngineWithAGhostOutput(Engine):
    """Adds, to its third step, an output for a request nobody submitted (as a bookkeeping bug would)."""

    steps = 0

    def step(self):
        outputs = super().step()
        self.steps += 1
        if self.steps == 3:
            ghost = RequestOutput(
                "ghost", token_id=1, text="x", finish_reason=None, prompt_tokens=1, completion_tokens=1
            )
            outputs = [ghost, *outputs]
        return outputs


async def test_one_undeliverable_output_costs_no_other_request_its_outputs(default_models, tokenizer):
    engine = EngineWithAGhostOutput(default_models("cpu", torch.float32), tokenizer, engine_settings())
    metrics = WorkerMetrics(kv_cache_bytes=engine.cache.bytes_total)
    engine_loop = EngineLoop(engine, metrics)
    await engine_loop.start()
    finished: list[RequestOutput] = []

    def on_finished_that_breaks(output: RequestOutput) -> None:
        raise RuntimeError("simulated: a broken on_finished")

    streams = [
        engine_loop.submit(
            GenerationRequest(request_id="a", prompt="The", max_tokens=6), on_finished_that_breaks
        ),
        engine_loop.submit(GenerationRequest(request_id="b", prompt="The", max_tokens=6), finished.append),
    ]
    results = await asyncio.wait_for(asyncio.gather(*(consume(stream) for stream in streams)), WAIT_S)
    await engine_loop.stop()
    for outputs, error in results:
        assert error is None and sum(o.token_id is not None for o in outputs) == 6
        assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert [(o.request_id, o.completion_tokens) for o in finished] == [("b", 6)]
    assert (
        metrics.registry.get_sample_value("tollgate_worker_delivery_failures_total") == 2
    )  # ghost, a's on_finished
