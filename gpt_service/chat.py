"""Render chat messages to text, the same way for training and for serving.

The tokenizer's own chat template when it has one; otherwise a plain fallback
(`User: ...\\nAssistant: ...`), so an adapter trained on `messages` is prompted as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The text of `messages`, ending with the assistant's cue when `add_generation_prompt`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")
