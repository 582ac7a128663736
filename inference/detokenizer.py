"""Incremental text of one completion, with stop sequences.

Text is released only when it is final: a trailing partial UTF-8 character (decoded as U+FFFD) and any
suffix that could still grow into a stop sequence are held back. When a stop sequence appears, the text
ends just before it and the stop sequence itself is never released.
"""

from __future__ import annotations

from inference.tokenizer import TextTokenizer

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...]) -> None:
        assert all(stop), "stop sequences must be non-empty"
        self._tokenizer = tokenizer
        self._stop = stop
        self._stop_length_max = max((len(s) for s in stop), default=0)
        self._token_ids: list[int] = []
        self._released_length = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly final text (maybe empty). Sets `stopped` on a stop sequence."""
        assert not self.stopped, "push() after a stop sequence"
        self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids)
        stop_index = self._find_stop(text)
        if stop_index is not None:
            self.stopped = True
            return self._release(text, stop_index)
        return self._release(text, len(text) - self._held_back_length(text))

    def flush(self) -> str:
        """The completion ended (length, end-of-text, cancel): release what was held back."""
        if self.stopped:
            return ""
        text = self._tokenizer.decode(self._token_ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        if end <= self._released_length:
            return ""
        delta = text[self._released_length : end]
        self._released_length = end
        return delta

    def _find_stop(self, text: str) -> int | None:
        if not self._stop:
            return None
        # A stop sequence can only be new if it ends in the unreleased tail.
        search_from = max(0, self._released_length - self._stop_length_max)
        found = [index for index in (text.find(s, search_from) for s in self._stop) if index >= 0]
        return min(found) if found else None

    def _held_back_length(self, text: str) -> int:
        held = len(text) - len(text.rstrip(REPLACEMENT_CHARACTER))
        remaining = text[: len(text) - held]
        for length in range(min(self._stop_length_max - 1, len(remaining)), 0, -1):
            suffix = remaining[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return held + length
        return held
