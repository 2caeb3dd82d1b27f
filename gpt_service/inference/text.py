"""Turning generated token ids into text pieces: whole characters only, stop strings held back and cut."""

from __future__ import annotations

from typing import Any


class TextAssembler:
    """Decodes a growing token list and releases only text that is final.

    Text is held back while it ends in a partial UTF-8 character (a Chinese character spans
    several byte-level tokens) or while its end could still grow into a stop string.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # the text handed out so far

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new final text, whether a stop string was reached)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at != -1:
                return self._release(text[:at]), True
        if text.endswith("\ufffd"):
            return "", False
        hold = max((self._overlap(text, s) for s in self.stop), default=0)
        return self._release(text[: len(text) - hold]), False

    def flush(self) -> str:
        """At the end: whatever was held back for a stop string that never came."""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        piece, self.text = upto[len(self.text):], upto
        return piece

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest end of `text` that begins `stop`."""
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0
