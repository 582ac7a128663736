"""Text <-> token ids through a local `tokenizer.json` (the `tokenizers` library); nothing is downloaded.

The gateway counts prompt tokens with `count_tokens(text)`, which uses the default model's tokenizer,
so its estimate matches what the worker will bill.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE_NAME = "tokenizer.json"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
END_OF_TEXT = "<|endoftext|>"


class TextTokenizer:
    """A loaded tokenizer: encode, decode, and the end-of-text id when the vocabulary has one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = tokenizer.token_to_id(END_OF_TEXT)

    @classmethod
    def from_directory(cls, directory: Path) -> TextTokenizer:
        path = directory / TOKENIZER_FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE_NAME} in {directory}")
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)


@functools.cache
def load_default_tokenizer() -> TextTokenizer:
    """The tokenizer of the committed default model (loaded once per process)."""
    return TextTokenizer.from_directory(DEFAULT_MODEL_DIR)


def count_tokens(text: str) -> int:
    """Prompt tokens of `text` under the default model's tokenizer, as the worker counts them."""
    return len(load_default_tokenizer().encode(text))
