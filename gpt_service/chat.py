"""Render chat messages to text, the same way for training and for serving.

The tokenizer's own chat template when it has one; otherwise a plain fallback
(`User: ...\\nAssistant: ...`), so an adapter trained on `messages` is prompted as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:  # the template as `apply_chat_template` compiles it: its sandbox, filters, globals and cache
    from transformers.utils.chat_template_utils import _compile_jinja_template
except ImportError:  # a transformers that moved it: every chat goes through `apply_chat_template`
    _compile_jinja_template = None

Message = dict[str, Any]
# Message fields that `apply_chat_template` copies under each other's names before rendering.
_REASONING_FIELDS = frozenset({"reasoning_content", "thinking", "reasoning"})


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The text of `messages`, ending with the assistant's cue when `add_generation_prompt`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant: " if add_generation_prompt else "")


def _only_strings(messages: Sequence[Message]) -> bool:
    """Whether every message is a dict of strings (as a JSON dataset's chats are) with no reasoning field."""
    return all(
        type(message) is dict and not _REASONING_FIELDS.intersection(message)
        and all(type(key) is str and type(value) is str for key, value in message.items())
        for message in messages
    )


class ChatRenderer:
    """`render_chat` for many chats of one tokenizer: the same text, with a fraction of the Python work.

    `apply_chat_template` rebuilds each chat out of plain JSON types, drops the keys whose value is
    None and copies reasoning fields under each other's names, then renders its compiled template with
    `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's special
    tokens. For messages that hold only strings that preparation changes nothing, so they are rendered
    here straight through that same compiled template with the same variables; any other chat (and a
    tokenizer whose template takes no such call) still goes through `render_chat`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template: Any = None
        self.variables: dict[str, str] = {}
        if getattr(tokenizer, "chat_template", None) and _compile_jinja_template is not None:
            self.template = _compile_jinja_template(tokenizer.get_chat_template())
            self.variables = {str(name): str(token) for name, token in tokenizer.special_tokens_map.items()}

    def __call__(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        if self.template is None or not _only_strings(messages):
            return render_chat(self.tokenizer, messages, add_generation_prompt)
        return self.template.render(messages=list(messages), tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.variables)
