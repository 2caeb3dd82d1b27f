"""Chats rendered through the compiled template once (`ChatRenderer`): the very text, token ids and labels
that `tokenizer.apply_chat_template` gives, record by record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from gpt_service.chat import ChatRenderer
from gpt_service.data.examples import tokenize_records
from gpt_service.data.tokenized import IGNORE_INDEX
from gpt_service.model_loading import load_tokenizer
from tests.data.test_examples import CHAT
from tests.data.test_tokenized import llama_style_tokenizer

CHATS = [
    CHAT,
    {"messages": [{"role": "user", "content": "one turn"}, {"role": "assistant", "content": "ok"}]},
    {"messages": [  # a system prompt, three turns, unicode of every width, a tool message, an extra key
        {"role": "system", "content": "Tu es un assistant précis. Réponds en français, s'il te plaît."},
        {"role": "user", "content": "Ünïcödé: 学习率是多少？ 🚀🚀 e\u0301 \t tabs\nnew line"},
        {"role": "assistant", "content": "学习率 = 2e-4 ✓ — « guillemets »"},
        {"role": "user", "content": "  leading and trailing spaces  ", "name": "ana"},
        {"role": "assistant", "content": "<|im_end|> inside the text, and {{ braces }} {% raw %}"},
        {"role": "tool", "content": "{\"result\": 42}"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "empty question, fine.\n\n"},
    ]},
    {"messages": [  # ends on a user turn, which is not trained on
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "a last question with no answer"}]},
]


@pytest.fixture(scope="module", params=["demo", "llama-style-bos"])
def chat_tokenizer(request: pytest.FixtureRequest, tiny_model: Path) -> Any:
    """The demo model's tokenizer (ChatML), and one whose template reads `bos_token` and `eos_token`."""
    return load_tokenizer(str(tiny_model)) if request.param == "demo" else llama_style_tokenizer()


def with_apply_chat_template(tokenizer: Any, record: dict, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a chat record, each turn rendered by `apply_chat_template` and tokenized alone."""
    messages = record["messages"]
    input_ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, add_generation_prompt=False)
        for text, is_answer in [(prompt[len(done):], False), (full[len(prompt):], True)]:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            input_ids += ids
            labels += ids if is_answer or train_on_prompt else [IGNORE_INDEX] * len(ids)
        done = full
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids, labels


def test_every_prefix_renders_as_apply_chat_template_renders_it(chat_tokenizer: Any) -> None:
    render = ChatRenderer(chat_tokenizer)
    assert render.template is not None  # the compiled template is used, not `apply_chat_template`
    for record in CHATS:
        messages = record["messages"]
        for end in range(1, len(messages) + 1):
            for add_generation_prompt in (False, True):
                expected = chat_tokenizer.apply_chat_template(messages[:end], tokenize=False,
                                                              add_generation_prompt=add_generation_prompt)
                assert render(messages[:end], add_generation_prompt) == expected


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_token_ids_and_labels_equal_apply_chat_template_s(chat_tokenizer: Any, train_on_prompt: bool) -> None:
    data = tokenize_records(chat_tokenizer, CHATS * 3, max_length=4096, train_on_prompt=train_on_prompt,
                            source="x")
    expected = [with_apply_chat_template(chat_tokenizer, record, train_on_prompt) for record in CHATS * 3]
    assert [(example.input_ids, example.labels) for example in data.examples] == expected


def test_chats_that_apply_chat_template_rewrites_go_through_it() -> None:
    """`apply_chat_template` drops keys whose value is None and copies `reasoning_content` to `thinking`:
    such chats are rendered by it, so a template that reads those fields sees what it would."""
    tokenizer = llama_style_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['thinking'] is defined %}<think>{{ m['thinking'] }}"
        "</think>{% endif %}{% if m['name'] is defined %}({{ m['name'] }}){% endif %}{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    render = ChatRenderer(tokenizer)
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": "hello", "reasoning_content": "be kind"},
                {"role": "user", "content": "bye", "name": "ana"}]
    for add_generation_prompt in (False, True):
        assert render(messages, add_generation_prompt) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert "<think>be kind</think>" in render(messages, False) and "(None)" not in render(messages, False)


def test_a_tokenizer_without_a_template_renders_the_plain_fallback(tiny_model: Path) -> None:
    tokenizer: PreTrainedTokenizerFast = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = None
    render = ChatRenderer(tokenizer)
    assert render(CHAT["messages"][:2], True) == "System: Be brief.\nUser: 你好\nAssistant: "
