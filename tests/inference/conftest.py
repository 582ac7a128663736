"""Fixtures for the inference tests: the committed default model, tiny random models, engine factories."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from inference.engine import Engine, GenerationRequest, RequestOutput
from inference.model import GPT, load_checkpoint
from inference.settings import EngineSettings
from inference.tokenizer import DEFAULT_MODEL_DIR, TextTokenizer, load_default_tokenizer

CUDA_AVAILABLE = torch.cuda.is_available()
INTERNAL_TOKEN = "inference-tests-internal-token-0123456789"  # the worker's shared secret in these tests


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is not None and not CUDA_AVAILABLE:
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny test models gain nothing from a second thread, and on a busy 2-core machine an
    intra-op thread that waits for a descheduled partner makes every small op many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    return load_default_tokenizer()


@pytest.fixture(scope="session")
def default_models() -> Callable[[str, torch.dtype], GPT]:
    """The committed default model, loaded once per (device, dtype)."""
    loaded: dict[tuple[str, torch.dtype], GPT] = {}

    def get(device: str, dtype: torch.dtype) -> GPT:
        key = (device, dtype)
        if key not in loaded:
            loaded[key] = load_checkpoint(DEFAULT_MODEL_DIR, torch.device(device), dtype)
        return loaded[key]

    return get


def engine_settings(**overrides) -> EngineSettings:
    values = dict(
        device="cpu",
        running_sequences_max=4,
        step_tokens_max=32,
        prefill_chunk_tokens_max=16,
        context_tokens_max=256,
        waiting_queue_depth_max=16,
        torch_threads=0,
    )
    values.update(overrides)
    return EngineSettings(**values)


def run_to_completion(
    engine: Engine, arrivals: dict[int, list[GenerationRequest]], step_limit: int = 5000
) -> dict[str, list[RequestOutput]]:
    """Step the engine, adding arrivals[k] before step k; returns every output per request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    last_arrival = max(arrivals, default=0)
    for step in range(step_limit):
        for generation in arrivals.get(step, []):
            engine.add_request(generation)
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        if step >= last_arrival and not engine.has_unfinished_requests():
            return outputs
    raise AssertionError(f"engine did not finish within {step_limit} steps")


def completion_token_ids(outputs: list[RequestOutput]) -> list[int]:
    return [output.token_id for output in outputs if output.token_id is not None]


def completion_text(outputs: list[RequestOutput]) -> str:
    return "".join(output.text for output in outputs)
