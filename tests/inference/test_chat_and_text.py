"""The chat template, incremental detokenization with stop sequences, and token counting."""

from __future__ import annotations

import pytest

from inference.chat import CHAT_STOP, InvalidChat, render_chat
from inference.detokenizer import IncrementalDetokenizer
from inference.tokenizer import count_tokens


def test_render_chat_follows_the_documented_template():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
    ]
    assert render_chat(messages) == "<|system|>\nYou are terse.\n<|user|>\nHello\n<|assistant|>\n"
    assert CHAT_STOP in render_chat(
        messages + [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}]
    )


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ],
)
def test_render_chat_names_the_bad_field(messages, field):
    with pytest.raises(InvalidChat, match=field.replace("[", r"\[").replace("]", r"\]")):
        render_chat(messages)


def feed(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token_id in tokenizer.encode(text):
        deltas.append(detokenizer.push(token_id))
        if detokenizer.stopped:
            break
    else:
        deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_text_round_trips_including_multibyte_characters(tokenizer):
    text = "naïve café — 日本語 ok"
    deltas, detokenizer = feed(tokenizer, text, stop=())
    assert "".join(deltas) == text and not detokenizer.stopped
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_sequence_is_never_released(tokenizer):
    deltas, detokenizer = feed(tokenizer, "first line END second line", stop=("END", "zzz"))
    assert detokenizer.stopped and "".join(deltas) == "first line "


def test_text_held_back_as_a_possible_stop_is_released_at_the_end(tokenizer):
    deltas, detokenizer = feed(tokenizer, "value: EN", stop=("END",))
    assert not detokenizer.stopped and "".join(deltas) == "value: EN"


def test_count_tokens_matches_the_tokenizer(tokenizer):
    text = "Permission is hereby granted"
    assert count_tokens(text) == len(tokenizer.encode(text)) > 0
