"""From records to training examples: answer-only labels, the EOS, truncation, the validation split."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gpt_service.config import build_train_config
from gpt_service.data.batching import collate
from gpt_service.data.examples import TokenizedDataset, tokenize_records
from gpt_service.data.prepare import prepare_data
from gpt_service.data.readers import DatasetError
from gpt_service.data.tokenized import IGNORE_INDEX, Example
from gpt_service.model_loading import load_tokenizer
from tests.conftest import write_json, write_jsonl

SOURCE = "data/train.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: Any) -> Any:
    """The same tokenizer without a chat template, as many base models ship."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def tokenize(tokenizer: Any, records: list[dict], *, max_length: int = 512,
             train_on_prompt: bool = False) -> TokenizedDataset:
    return tokenize_records(tokenizer, records, max_length=max_length, train_on_prompt=train_on_prompt,
                            source=SOURCE)


def one(tokenizer: Any, record: dict, *, train_on_prompt: bool = False) -> Example:
    return tokenize(tokenizer, [record], train_on_prompt=train_on_prompt).examples[0]


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def trained_text(tokenizer: Any, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def masked_text(tokenizer: Any, example: Example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                             if label == IGNORE_INDEX])


def dataset_error(tokenizer: Any, records: list[dict]) -> str:
    with pytest.raises(DatasetError) as info:
        tokenize(tokenizer, records)
    return str(info.value)


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                     {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1?"},
                     {"role": "assistant", "content": "2"}]}
RECORD_KINDS = {
    "text": {"text": "用户：你好\n助手：你好！"},
    "prompt": {"prompt": "用户：你好\n助手：", "completion": "你好！"},
    "instruction": {"instruction": "Translate", "input": "猫", "output": "cat"},
    "instruction_no_input": {"instruction": "Say hi", "output": "hi"},
    "messages": CHAT,
}


# Labels: only the answer unless train_on_prompt


def test_text_records_train_on_every_token(tokenizer: Any) -> None:
    example = one(tokenizer, {"text": "Hello world"})
    assert example.input_ids == [*ids(tokenizer, "Hello world"), tokenizer.eos_token_id]
    assert example.labels == example.input_ids


def test_prompt_completion_trains_only_the_completion(tokenizer: Any) -> None:
    prompt, completion = ids(tokenizer, "用户：你好\n助手："), ids(tokenizer, "你好！")
    example = one(tokenizer, RECORD_KINDS["prompt"])
    assert example.input_ids == [*prompt, *completion, tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + [*completion, tokenizer.eos_token_id]


@pytest.mark.parametrize(("kind", "prompt"), [("instruction", "Translate\n猫\n"),
                                              ("instruction_no_input", "Say hi\n")])
def test_instruction_records_train_only_the_output(tokenizer: Any, kind: str, prompt: str) -> None:
    record = RECORD_KINDS[kind]
    example = one(tokenizer, record)
    assert masked_text(tokenizer, example) == prompt
    assert trained_text(tokenizer, example) == record["output"] + tokenizer.eos_token


def test_an_empty_instruction_input_is_left_out(tokenizer: Any) -> None:
    with_empty = one(tokenizer, {"instruction": "Say hi", "input": "", "output": "hi"})
    without = one(tokenizer, RECORD_KINDS["instruction_no_input"])
    assert (with_empty.input_ids, with_empty.labels) == (without.input_ids, without.labels)


def test_chat_records_train_only_the_assistant_turns(tokenizer: Any) -> None:
    example = one(tokenizer, CHAT)
    assert tokenizer.decode(example.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|endoftext|>"
    )
    assert trained_text(tokenizer, example) == "你好！<|im_end|>\n2<|im_end|>\n<|endoftext|>"
    assert masked_text(tokenizer, example) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_without_a_template_uses_the_plain_fallback(plain_tokenizer: Any) -> None:
    example = one(plain_tokenizer, CHAT)
    assert plain_tokenizer.decode(example.input_ids) == (
        "System: Be brief.\nUser: 你好\nAssistant: 你好！\nUser: 1+1?\nAssistant: 2\n<|endoftext|>"
    )
    assert trained_text(plain_tokenizer, example) == "你好！\n2\n<|endoftext|>"


@pytest.mark.parametrize("kind", list(RECORD_KINDS))
def test_train_on_prompt_trains_every_token(tokenizer: Any, kind: str) -> None:
    masked = one(tokenizer, RECORD_KINDS[kind])
    example = one(tokenizer, RECORD_KINDS[kind], train_on_prompt=True)
    assert example.input_ids == masked.input_ids
    assert example.labels == example.input_ids


# The EOS


@pytest.mark.parametrize("kind", list(RECORD_KINDS))
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_every_example_ends_with_an_eos_that_is_trained(tokenizer: Any, kind: str, train_on_prompt: bool) -> None:
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case where masking by id would hide it
    example = one(tokenizer, RECORD_KINDS[kind], train_on_prompt=train_on_prompt)
    assert example.input_ids[-1] == example.labels[-1] == tokenizer.eos_token_id
    assert example.input_ids.count(tokenizer.eos_token_id) == 1


def test_text_that_already_ends_with_eos_gets_no_second_one(tokenizer: Any) -> None:
    example = one(tokenizer, {"text": "Hello<|endoftext|>"})
    assert example.input_ids == [*ids(tokenizer, "Hello"), tokenizer.eos_token_id]


def test_padding_in_a_batch_keeps_the_eos_label(tokenizer: Any) -> None:
    short, long = tokenize(tokenizer, [{"text": "Hi"}, {"text": "Hello there, a longer one"}]).examples
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n, width = len(short), batch["input_ids"].shape[1]
    assert width % 16 == 0 and width >= len(long)  # a multiple of 16 positions
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][1].tolist() == long.labels + [IGNORE_INDEX] * (width - len(long))
    assert batch["input_ids"][1, len(long):].tolist() == [tokenizer.pad_token_id] * (width - len(long))
    capped = collate([short, long], pad_id=tokenizer.pad_token_id, max_width=len(long))  # a position limit
    assert capped["input_ids"].shape[1] == len(long)
    assert collate([long], pad_id=0, max_width=1)["input_ids"].shape[1] == len(long)  # never cut a sample


# Truncation


def test_long_samples_are_truncated_and_counted(tokenizer: Any) -> None:
    n = len(ids(tokenizer, "Hello world")) + 1  # with the EOS
    records = [{"text": "Hello world"}, {"text": "Hello world " * 40}, {"prompt": "Q " * 40, "completion": "A"}]
    data = tokenize(tokenizer, records, max_length=n)
    assert data.truncated == 2
    assert [len(e) for e in data.examples] == [n, n, n]
    assert data.examples[0].input_ids[-1] == tokenizer.eos_token_id
    assert all(len(e.labels) == len(e.input_ids) for e in data.examples)
    assert tokenize(tokenizer, records[:1], max_length=n).truncated == 0
    assert tokenize(tokenizer, records[:1], max_length=n - 1).truncated == 1


# Record errors name the file and the record


def test_a_record_without_text_lists_its_keys(tokenizer: Any) -> None:
    message = dataset_error(tokenizer, [{"text": "a"}, {"text": "b"}, {"question": "q", "answer": "a"}])
    assert SOURCE in message and "record 3" in message
    assert 'has no "text"' in message and '"question", "answer"' in message


def test_an_empty_record_says_it_has_no_keys(tokenizer: Any) -> None:
    message = dataset_error(tokenizer, [{}])
    assert "record 1" in message and "its keys: none" in message


@pytest.mark.parametrize(("record", "expected"), [
    ({"text": 5}, '"text" must be a str, found int'),
    ({"text": None}, '"text" must be a str, found NoneType'),
    ({"prompt": "q", "completion": ["a"]}, '"completion" must be a str, found list'),
    ({"prompt": 1, "completion": "a"}, '"prompt" must be a str, found int'),
    ({"instruction": "i", "output": 2.5}, '"output" must be a str, found float'),
    ({"instruction": "i", "input": 0, "output": "o"}, '"input" must be a str, found int'),
    ({"instruction": "i", "input": ["x"], "output": "o"}, '"input" must be a str, found list'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, 'message 1 needs a string "role" and "content"'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     'message 2 needs a string "role" and "content"'),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
])
def test_a_value_of_the_wrong_type_names_the_record_and_the_key(
    tokenizer: Any, record: dict, expected: str
) -> None:
    message = dataset_error(tokenizer, [{"text": "fine"}, record])
    assert message.startswith(f"{SOURCE}: record 2")
    assert expected in message


# prepare_data: the split, a separate validation file, the truncation count


def prepare(tiny_model: Path, dataset: Path, **overrides: Any) -> Any:
    config = build_train_config({"base_model": str(tiny_model), "dataset_path": str(dataset), **overrides},
                                config_path=None)
    return prepare_data(config, load_tokenizer(str(tiny_model)))


def numbered(n: int) -> list[dict]:
    return [{"text": f"sample number {i}"} for i in range(n)]


@pytest.fixture
def no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/models.yaml here, so the defaults apply


@pytest.mark.usefixtures("no_config_file")
@pytest.mark.parametrize("n", [1, 9, 10, 25, 47])
def test_the_default_split_holds_out_a_tenth_rounded_down(tiny_model: Path, tmp_path: Path, n: int) -> None:
    data = prepare(tiny_model, write_json(tmp_path / "train.json", numbered(n)))
    assert len(data.eval) == int(n * 0.1)
    assert len(data.train) + len(data.eval) == n
    assert sorted(e.input_ids for e in [*data.train, *data.eval]) == sorted(
        e.input_ids for e in prepare(tiny_model, tmp_path / "train.json", validation_split=0).train)


@pytest.mark.usefixtures("no_config_file")
def test_the_split_is_seeded(tiny_model: Path, tmp_path: Path) -> None:
    dataset = write_json(tmp_path / "train.json", numbered(40))

    def held_out(seed: int) -> list[list[int]]:
        return [e.input_ids for e in prepare(tiny_model, dataset, validation_split=0.25, seed=seed).eval]

    assert len(held_out(7)) == 10
    assert held_out(7) == held_out(7)
    assert held_out(7) != held_out(8)


@pytest.mark.usefixtures("no_config_file")
def test_a_separate_eval_file_replaces_the_split(tiny_model: Path, tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json", numbered(20))
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Q: ", "completion": "A " * 30}, {"text": "x"}])
    data = prepare(tiny_model, train, eval_dataset_path=str(evals), max_length=16)
    assert len(data.train) == 20 and len(data.eval) == 2
    assert data.truncated == 1  # counted over both files


@pytest.mark.usefixtures("no_config_file")
def test_a_bad_eval_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json", numbered(3))
    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DatasetError, match=r"eval\.jsonl: malformed JSON at line 2"):
        prepare(tiny_model, train, eval_dataset_path=str(evals))


@pytest.mark.usefixtures("no_config_file")
def test_the_dataset_hash_is_of_the_training_file(tiny_model: Path, tmp_path: Path) -> None:
    dataset = write_json(tmp_path / "train.json", numbered(3))
    first = prepare(tiny_model, dataset).dataset_sha256
    assert len(first) == 64 and first == prepare(tiny_model, dataset).dataset_sha256
    write_json(dataset, numbered(4))
    assert prepare(tiny_model, dataset).dataset_sha256 != first
