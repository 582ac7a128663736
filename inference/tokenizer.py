"""Text <-> token ids through a local `tokenizer.json` (the `tokenizers` library); nothing is downloaded.

The gateway counts a prompt's tokens with the served model's own tokenizer (`ModelSpec.tokenizer()` in
`inference.registry`, through `load_tokenizer`), so its estimate matches what that model's worker bills.
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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: a byte-level BPE piece mapped back to its bytes (a special
        token, whose text is not byte-level, as its UTF-8)."""
        piece = self._tokenizer.id_to_token(token_id)
        assert piece is not None, f"token id {token_id} is not in the vocabulary"
        if all(character in _BYTE_OF_CHARACTER for character in piece):
            return bytes(_BYTE_OF_CHARACTER[character] for character in piece)
        return piece.encode("utf-8")


def _byte_level_characters() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + shifted)] = byte
            shifted += 1
    return characters


_BYTE_OF_CHARACTER = _byte_level_characters()


@functools.cache
def load_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer in one tokenizer.json file (loaded once per process and file)."""
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file {path}")
    return TextTokenizer(Tokenizer.from_file(str(path)))


def load_default_tokenizer() -> TextTokenizer:
    """The tokenizer of the committed default model."""
    return load_tokenizer(DEFAULT_MODEL_DIR / TOKENIZER_FILE_NAME)


def count_tokens(text: str) -> int:
    """Tokens of `text` under the default model's tokenizer (tests and benchmarks of the default model;
    the gateway counts with the served model's own tokenizer)."""
    return len(load_default_tokenizer().encode(text))
