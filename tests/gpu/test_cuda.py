"""The recipe's CUDA precisions and the engine on a GPU: `pytest -m gpu` on a machine with CUDA.

Without CUDA these tests are deselected (tests/conftest.py), not run. The fast paths' equality with
PEFT on CUDA is the family matrix's `cuda` case (tests/families/test_matrix.py), in the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import TrainConfig
from gpt_service.evaluation.generation import Question, greedy_answers
from gpt_service.inference.registry import ModelRegistry
from gpt_service.training.recipe import run_lora_finetune
from tests.conftest import QA_PAIRS, qa_prompt, write_jsonl

pytestmark = pytest.mark.gpu
ANSWERS = [a for _, a in QA_PAIRS]


def train(tiny_model: Path, tmp_path: Path, **precision: bool) -> tuple[Path, dict]:
    dataset = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS])
    result = run_lora_finetune(TrainConfig(
        base_model=str(tiny_model), dataset_path=str(dataset), output_dir=str(tmp_path / "run"), num_epochs=40,
        batch_size=4, learning_rate=1e-2, validation_split=0, save_steps=10_000,
        lora_config={"target_modules": "all-linear", "lora_dropout": 0.0}, **precision))
    return Path(result.adapter_dir), json.loads((tmp_path / "run" / "run.json").read_text())


def answers_on_cpu(tiny_model: Path, adapter: Path) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    out = []
    for question, _ in QA_PAIRS:
        ids = tokenizer(qa_prompt(question), return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=48, do_sample=False)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("precision", [{"fp16": True}, {"bf16": True}], ids=["fp16-grad-scaler", "bf16"])
def test_the_recipe_trains_in_cuda_mixed_precision(tiny_model: Path, tmp_path: Path, precision: dict) -> None:
    adapter, record = train(tiny_model, tmp_path, **precision)
    assert record["device"].startswith("cuda") and record["precision"] == next(iter(precision))[:4]
    losses = [point["loss"] for point in record["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < 0.01 * losses[0]
    assert answers_on_cpu(tiny_model, adapter) == ANSWERS  # a normal PEFT adapter, learned


def test_the_engine_on_cuda_answers_as_peft_does(tiny_model: Path, tmp_path: Path) -> None:
    adapter, _ = train(tiny_model, tmp_path, bf16=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    registry = ModelRegistry()
    try:
        for dtype in ("float32", "bfloat16", "float16"):
            served = registry.load(f"tiny-{dtype}", str(tiny_model), str(adapter), dtype)
            assert next(served.base.model.parameters()).device.type == "cuda"
            questions = [Question(tokenizer(qa_prompt(q)).input_ids, served.adapter, 48) for q, _ in QA_PAIRS]
            assert greedy_answers(served.base.engine, questions) == ANSWERS, dtype
    finally:
        registry.close()
