"""Token figures against a direct transformers computation, prompts and references, answer scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from sacrebleu.metrics import CHRF
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.data.readers import DatasetError
from gpt_service.evaluation.evaluate import evaluate_job, evaluate_served
from gpt_service.evaluation.generation import score_answers
from gpt_service.evaluation.job import EvaluationJob, EvaluationOptions
from gpt_service.evaluation.samples import load_eval_set
from gpt_service.inference.registry import ModelRegistry
from tests.conftest import QA_PAIRS, qa_prompt
from tests.evaluation.conftest import QA_RECORDS


def direct_figures(model_dir: Path, adapter: Path | None) -> tuple[float, float, int]:
    """(mean loss, accuracy, tokens) over the answers + EOS, with plain transformers, one sample at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    total, hits, count = 0.0, 0, 0
    for question, answer in QA_PAIRS:
        prompt = tokenizer(qa_prompt(question), add_special_tokens=False).input_ids
        completion = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        labels = torch.tensor([[-100] * len(prompt) + completion])
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = len(completion)
        total += float(out.loss) * n  # transformers: the mean over the n labelled next tokens
        hits += int((out.logits[0, len(prompt) - 1 : -1].argmax(-1) == torch.tensor(completion)).sum())
        count += n
    return total / count, hits / count, count


@pytest.mark.parametrize("with_adapter", [False, True])
def test_figures_match_transformers_on_the_same_tokens(eval_workspace: dict, with_adapter: bool) -> None:
    workspace = eval_workspace["workspace"]
    adapter = workspace / eval_workspace["adapter"] if with_adapter else None
    result = evaluate_job(EvaluationJob(
        model_path=str(workspace / "models/tiny"), lora_adapter=str(adapter) if adapter else None,
        dataset_path=str(workspace / "data/qa.jsonl"), dtype="float32", batch_size=3, generation=False))
    loss, accuracy, tokens = direct_figures(workspace / "models/tiny", adapter)
    figures = result["metrics"]
    assert result["samples"] == len(QA_PAIRS) and result["tokens"] == tokens
    assert figures["loss"] == pytest.approx(loss, rel=1e-4)
    assert figures["token_accuracy"] == pytest.approx(accuracy)
    assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-12)
    assert figures["exact_match"] is None and result["generated_samples"] == 0 and result["examples"] == []


def test_one_shared_model_two_adapters_and_the_base(eval_workspace: dict) -> None:
    """The adapter asked for is the one measured; the shared PEFT model is left as it was found."""
    workspace = eval_workspace["workspace"]
    registry = ModelRegistry()
    try:
        tuned = registry.load("tuned", str(workspace / "models/tiny"), str(workspace / eval_workspace["adapter"]),
                              "float32")
        registry.load("again", str(workspace / "models/tiny"), str(workspace / eval_workspace["adapter"]), "float32")
        base = registry.load("base", str(workspace / "models/tiny"), None, "float32")
        model = tuned.base.model
        model.set_adapter("adapter_2", inference_mode=True)
        options = EvaluationOptions(dataset_path=str(workspace / "data/qa.jsonl"), compare_to_base=True,
                                    max_tokens=48)
        result = evaluate_served(tuned, QA_RECORDS, options)
        assert model.active_adapter == "adapter_2"
        assert not any(p.requires_grad for p in model.parameters())
        base_only = evaluate_served(base, QA_RECORDS, options.model_copy(update={"compare_to_base": False}))
    finally:
        registry.close()
    assert result["metrics"]["loss"] < 0.1 < result["base_metrics"]["loss"]
    assert result["base_metrics"] == pytest.approx(base_only["metrics"])
    assert result["metrics"]["exact_match"] == 1.0 > result["base_metrics"]["exact_match"]
    difference = {k: result["metrics"][k] - result["base_metrics"][k] for k in result["difference"]}
    assert result["difference"] == pytest.approx(difference)
    first = result["examples"][0]
    assert first["prompt"] == qa_prompt(QA_PAIRS[0][0]) and first["answer"] == first["reference"] == QA_PAIRS[0][1]
    assert first["exact_match"] and first["chrf"] == 100.0 and not first["base_exact_match"]


@pytest.mark.parametrize(("record", "prompt", "reference"), [
    ({"prompt": "Q: hi\nA: ", "completion": "hello"}, "Q: hi\nA: ", "hello"),
    ({"instruction": "Translate", "input": "猫", "output": "cat"}, "Translate\n猫\n", "cat"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "bye"}, {"role": "assistant", "content": "See you."}]},
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
     "<|im_start|>assistant\n", "See you."),
])
def test_prompts_are_the_trained_tokens_before_the_last_answer(tiny_model: Path, record: dict, prompt: str,
                                                               reference: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data = load_eval_set(tokenizer, [record, {"text": "plain text has no reference"}],
                         EvaluationOptions(dataset_path="x.jsonl"))
    assert len(data.examples) == 2 and len(data.prompted) == 1
    assert data.prompted[0].prompt == prompt and data.prompted[0].reference == reference
    assert data.prompted[0].prompt_ids == data.examples[0].input_ids[: len(data.prompted[0].prompt_ids)]


def test_generation_asked_for_without_references_is_refused(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = [{"text": "one"}, {"text": "two"}]
    with pytest.raises(DatasetError, match="no record has a reference"):
        load_eval_set(tokenizer, records, EvaluationOptions(dataset_path="p.txt", generation=True))
    assert load_eval_set(tokenizer, records, EvaluationOptions(dataset_path="p.txt")).prompted == []


def test_answer_scores_are_sacrebleu_chrf_and_exact_match() -> None:
    answers = ["  你好！有什么可以帮助你的吗？\n", "Python是一种语言。", "Paris"]
    references = ["你好！有什么可以帮助你的吗？", "Python是一种高级编程语言，简洁易读。", "London."]
    scores = score_answers(answers, references)
    assert scores.exact_match == pytest.approx(1 / 3)
    assert [exact for exact, _ in scores.per_answer] == [True, False, False]
    chrf = CHRF()
    assert scores.chrf == chrf.corpus_score([a.strip() for a in answers], [references]).score
    assert scores.per_answer[0][1] == 100.0 and 0 < scores.per_answer[1][1] < 100 and scores.per_answer[2][1] < 20
