"""Batched tokenization into flat arrays: the same tokens as one tokenizer call per segment, a few bytes a token."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from gpt_service.data import examples as examples_module
from gpt_service.data.examples import record_segments, tokenize_records
from gpt_service.data.tokenized import IGNORE_INDEX, id_dtype
from gpt_service.model_loading import load_tokenizer
from tests.data.test_examples import CHAT, RECORD_KINDS

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that puts a BOS before plain text, and whose chat template writes its own BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox", "你好 world", "assistant user system"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   chat_template=LLAMA_TEMPLATE)


class WithoutBackend(PreTrainedTokenizerFast):
    """As a slow (pure Python) tokenizer shows itself: no `backend_tokenizer`, only its call."""

    backend_tokenizer = None


@pytest.fixture(scope="module", params=["qwen2-chatml", "no-template", "llama-style-bos", "without-backend"])
def any_tokenizer(request: pytest.FixtureRequest, tiny_model: Path) -> Any:
    if request.param == "llama-style-bos":
        return llama_style_tokenizer()
    tokenizer = load_tokenizer(str(tiny_model))
    if request.param == "no-template":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    if request.param == "without-backend":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.__class__ = WithoutBackend
    return tokenizer


def one_call_per_segment(tokenizer: Any, record: dict, max_length: int, train_on_prompt: bool) -> tuple[list, list]:
    """(input_ids, labels) as the tokenization before batching made them: a tokenizer call per segment."""
    chat = "messages" in record
    bos = tokenizer.bos_token_id
    input_ids = [bos] if not chat and bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
    labels = [IGNORE_INDEX] * len(input_ids)
    for text, is_answer in record_segments(tokenizer, record, "reference"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return input_ids[:max_length], labels[:max_length]


RECORDS = [*RECORD_KINDS.values(), {"text": "ends with its EOS already"}, {"text": "  spaces  and\ttabs \n"},
           {"prompt": "Q " * 30, "completion": "A long answer " * 10}, CHAT,
           {"messages": [{"role": "user", "content": "only one turn"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "a last question with no answer"}]}]


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("max_length", [12, 512])
def test_batched_tokens_equal_one_call_per_segment(any_tokenizer: Any, train_on_prompt: bool, max_length: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(examples_module, "CHUNK_CHARS", 100)  # records spread over several batch calls
    records = [*RECORDS, {"text": "ends with its EOS already" + any_tokenizer.eos_token}]
    data = tokenize_records(any_tokenizer, records, max_length=max_length, train_on_prompt=train_on_prompt,
                            source="data/x.jsonl")
    expected = [one_call_per_segment(any_tokenizer, r, max_length, train_on_prompt) for r in records]
    assert [(e.input_ids, e.labels) for e in data.examples] == expected
    assert data.truncated == sum(len(one_call_per_segment(any_tokenizer, r, 10**6, False)[0]) > max_length
                                 for r in records)


def test_a_bos_tokenizer_starts_plain_text_with_its_bos_but_not_a_rendered_chat() -> None:
    tokenizer = llama_style_tokenizer()
    data = tokenize_records(tokenizer, [{"text": "the fox"}, CHAT], max_length=512, train_on_prompt=False,
                            source="x")
    text, chat = data.examples
    assert text.input_ids[0] == tokenizer.bos_token_id and text.labels[0] == IGNORE_INDEX
    assert chat.input_ids.count(tokenizer.bos_token_id) == 1  # the template's own, not a second one


def test_samples_are_held_in_three_bytes_a_token(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    data = tokenize_records(tokenizer, RECORDS * 50, max_length=512, train_on_prompt=False, source="x").examples
    assert data.ids.dtype == np.uint16 and data.trained.dtype == np.bool_
    assert data.ids.nbytes + data.trained.nbytes == 3 * data.tokens == 3 * sum(data.lengths)
    assert len(data) == len(RECORDS) * 50


def test_ids_past_65536_take_four_bytes() -> None:
    assert id_dtype(151_936) is np.uint32 and id_dtype(65_536) is np.uint16 and id_dtype(512) is np.uint16


def test_a_subset_shares_the_token_arrays_and_counts_the_loss_positions(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    data = tokenize_records(tokenizer, RECORDS, max_length=512, train_on_prompt=False, source="x").examples
    part = data.subset([4, 0])
    assert part.ids is data.ids and len(part) == 2
    assert part[0].input_ids == data[4].input_ids and part.lengths == [len(data[4]), len(data[0])]
    # the labels a causal LM scores: every labelled position after each sample's first
    assert part.label_count([0, 1]) == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in part)


def test_ids_past_the_expected_type_widen_it_rather_than_wrap(tiny_model: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    expected = tokenize_records(tokenizer, RECORDS, max_length=512, train_on_prompt=False, source="x").examples
    monkeypatch.setattr(examples_module, "id_dtype", lambda size: np.uint8)  # as if the tokenizer said 256 ids
    data = tokenize_records(tokenizer, RECORDS, max_length=512, train_on_prompt=False, source="x").examples
    assert data.ids.dtype == np.uint32 and int(data.ids.max()) > 255
    assert [e.input_ids for e in data] == [e.input_ids for e in expected]
