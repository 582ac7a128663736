"""The model registry: one description per model that the gateway and the workers both read; the gateway
counts a prompt with the served model's own tokenizer and chat template (issue 13: it used the default
model's whatever model was served)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from gateway.schemas import ChatCompletionBody, CompletionBody, parse_body, prepare
from gateway.settings import GatewaySettings
from inference.chat import CHAT_STOP, CHATML_STOP
from inference.registry import DEFAULT_MODEL_NAME, DEFAULT_REGISTRY, read_registry
from inference.settings import WorkerSettings
from inference.tokenizer import count_tokens
from ledger.pricing import Price
from tests.fixtures.registry import default_entry, write_registry

WORDS = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "there", "world"]


def write_word_tokenizer(directory: Path) -> Tokenizer:
    """A tiny whitespace word-level tokenizer: one token per word, nothing like the default BPE."""
    tokenizer = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


@pytest.fixture
def two_models(tmp_path, monkeypatch) -> Path:
    write_word_tokenizer(tmp_path / "words")
    other = {
        "name": "words",
        "checkpoint_dir": "words",  # relative to the registry file
        "chat_template": "chatml",
        "context_tokens_max": 64,
        "max_tokens_max": 16,
        "price": {"prompt_token_credits": 3, "completion_token_credits": 5, "cached_prompt_token_credits": 1},
    }
    path = write_registry(tmp_path, [default_entry(), other])
    monkeypatch.setenv("TOLLGATE_MODEL_REGISTRY_PATH", str(path))
    return path


def test_the_gateway_counts_with_the_served_models_own_tokenizer(two_models):
    settings = GatewaySettings()
    text = "hello there hello world " * 5
    prepared = prepare(
        parse_body(CompletionBody, json.dumps({"model": "words", "prompt": text}).encode()), settings
    )
    assert prepared.prompt_tokens == len(text.split()) == 20
    assert prepared.prompt_tokens != count_tokens(text)  # the default model's count differs
    default = prepare(
        parse_body(CompletionBody, json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": text}).encode()),
        settings,
    )
    assert default.prompt_tokens == count_tokens(text)


def test_the_gateway_renders_chat_with_the_models_template_and_stop(two_models):
    settings = GatewaySettings()
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    words = prepare(parse_body(ChatCompletionBody, json.dumps({**body, "model": "words"}).encode()), settings)
    assert words.prompt == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    assert words.stop == (CHATML_STOP,)
    assert words.prompt_tokens == len(words.prompt.split())
    default = prepare(
        parse_body(ChatCompletionBody, json.dumps({**body, "model": DEFAULT_MODEL_NAME}).encode()), settings
    )
    assert default.stop == (CHAT_STOP,) and default.prompt.startswith("<|user|>\n")


def test_gateway_and_worker_read_the_same_entry(two_models, monkeypatch):
    monkeypatch.setenv("TOLLGATE_WORKER_MODEL_NAME", "words")
    worker = WorkerSettings()
    assert worker.model == GatewaySettings().models["words"]
    assert worker.checkpoint_dir == two_models.parent / "words"
    assert worker.model.price == Price(3, 5, 1)


def test_a_worker_for_a_model_the_registry_lacks_is_refused(monkeypatch):
    monkeypatch.delenv("TOLLGATE_MODEL_REGISTRY_PATH", raising=False)
    with pytest.raises(ValueError, match="no model 'absent'"):
        WorkerSettings(model_name="absent")


def test_unset_the_registry_is_the_built_in_default_model(monkeypatch):
    monkeypatch.delenv("TOLLGATE_MODEL_REGISTRY_PATH", raising=False)
    assert GatewaySettings().models == DEFAULT_REGISTRY.by_name()
    assert WorkerSettings().model == DEFAULT_REGISTRY.by_name()[DEFAULT_MODEL_NAME]


def test_a_toml_registry_reads_as_json_does(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nname = "t"\ncheckpoint_dir = "ckpt"\ncontext_tokens_max = 32\nmax_tokens_max = 8\n'
        "price = { prompt_token_credits = 2, completion_token_credits = 4 }\n"
    )
    (model,) = read_registry(path).models
    assert (model.name, model.checkpoint_dir, model.price) == ("t", tmp_path / "ckpt", Price(2, 4, 2))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([default_entry(), default_entry()], "names a model twice"),
        ([default_entry(max_tokens_max=512)], "max_tokens_max"),
        (
            [default_entry(price={"prompt_token_credits": -1, "completion_token_credits": 1})],
            "must not be negative",
        ),
        (
            [default_entry(price={"prompt_token_credits": 1.5, "completion_token_credits": 1})],
            "prompt_token_credits",
        ),
    ],
)
def test_a_bad_registry_is_refused_naming_why(tmp_path, entries, message):
    with pytest.raises(ValueError, match=message):
        read_registry(write_registry(tmp_path, entries))
