"""Turning generated token ids into text pieces: whole characters only, stop strings held back and cut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def plain_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, straight from the Rust tokenizer where that
    is all the call does (no clean-up of spaces, no decode of its own): a few microseconds less a call."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as Fast
    except ImportError:  # transformers 4
        from transformers import PreTrainedTokenizerFast as Fast
    backend = getattr(tokenizer, "_tokenizer", None)
    kind = type(tokenizer)
    if (isinstance(tokenizer, Fast) and backend is not None and kind._decode is Fast._decode
            and kind.decode is Fast.decode and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextAssembler:
    """Decodes a growing token list and releases only text that is final.

    Text is held back while it ends in a partial UTF-8 character (a Chinese character spans
    several byte-level tokens) or while its end could still grow into a stop string.

    Each token decodes only a short window, not the whole answer again: the tokens since the
    last-but-one point where the text ended on a whole character. The window's text minus the text
    of its first, already decoded, part is what the new tokens add (as streaming detokenizers do it:
    the first part gives tokenizers whose spaces depend on the previous token their context).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self._decode = plain_decoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # the text handed out so far
        self._decoded = ""  # the text of tokens[:self._read], whole characters
        self._start = 0  # the window decoded for new tokens begins here...
        self._read = 0  # ...and its part up to here is in self._decoded already
        self._known = ""  # the text of tokens[self._start:self._read]

    def _full_text(self) -> str:
        """The text of every token so far (it may end in a partial character)."""
        window = self._decode(self.tokens[self._start:])
        if window.startswith(self._known):
            return self._decoded + window[len(self._known):]
        return self._decode(self.tokens)  # the window decodes differently: fall back to the whole answer

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new final text, whether a stop string was reached)."""
        self.tokens.append(token)
        text = self._full_text()
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at != -1:
                return self._release(text[:at]), True
        if text.endswith("\ufffd"):
            return "", False
        self._decoded = text
        chunk = self._decode(self.tokens[self._read:])
        if chunk:  # the chunk just finished (it begins on a whole character) is the next window's context
            self._start, self._known = self._read, chunk
        else:  # it shows nothing (a special token): keep the older context
            self._known = self._decode(self.tokens[self._start:])
        self._read = len(self.tokens)
        hold = max((self._overlap(text, s) for s in self.stop), default=0)
        return self._release(text[: len(text) - hold]), False

    def flush(self) -> str:
        """At the end: whatever was held back for a stop string that never came."""
        return self._release(self._full_text())

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
