"""Ten decoder families, each trained and served by our fast paths, each checked against PEFT's own code.

For every family: one training step (loss and every LoRA gradient) equals PEFT's model with its
own loss, in fp32 (tolerance: 1e-5 absolute on the loss, 1e-5 absolute + 1e-4 relative on the
gradients); a short training run follows the curve of the same run with `fast_paths: false`
(plain PEFT and PyTorch) and learns its answers; served in fp32, the engine's greedy answers, all
in one batch, equal PEFT's `generate` one prompt at a time; served in bf16 (the packed decode
where it applies), the engine reproduces the trained answers. Which fast path applies to which
family is asserted too (`APPLIES`), so a path that silently stops applying shows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import TrainConfig
from gpt_service.data.batching import collate
from gpt_service.data.tokenized import Example
from gpt_service.evaluation.generation import Question, greedy_answers
from gpt_service.hardware import Precision
from gpt_service.inference.fast_decoder import FastDecoder
from gpt_service.inference.registry import ModelRegistry
from gpt_service.training.loss import _plain_heads, summed_token_loss
from gpt_service.training.memory import head_fuses
from gpt_service.training.recipe import run_lora_finetune
from gpt_service.training.speedups import CPU_ATTENTION, speed_up
from tests.conftest import QA_PAIRS, qa_prompt
from tests.families.models import FAMILIES, build

LORA = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0}
# family -> (fused head loss, CPU attention on a CPU, fast decode step); the lean LoRA branch applies to all
APPLIES = {
    "llama": (True, True, True), "mistral": (True, True, True), "qwen2": (True, True, True),
    "qwen3": (True, True, False), "gemma2": (False, False, False), "phi3": (True, True, False),
    "olmo2": (True, True, False), "granite": (False, True, False), "gpt_neox": (True, True, False),
    "gpt2": (True, True, False),
}
assert set(APPLIES) == set(FAMILIES)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in FAMILIES}


def qa_examples(tokenizer: Any) -> list[Example]:
    """The QA pairs as training examples: loss on the answer and its EOS only."""
    examples = []
    for question, answer in QA_PAIRS[:4]:
        prompt = tokenizer(qa_prompt(question)).input_ids
        reply = [*tokenizer(answer).input_ids, tokenizer.eos_token_id]
        examples.append(Example(np.array(prompt + reply), np.array([False] * len(prompt) + [True] * len(reply))))
    return examples


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_equals_peft(models: dict[str, Path], family: str, device: str) -> None:
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32).to(device)
    reference = get_peft_model(base_model, LoraConfig(**LORA))
    for name, param in reference.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
            torch.nn.init.normal_(param, std=0.05)
    ours = copy.deepcopy(reference)
    speed_up(ours, Precision(torch.device(device), torch.float32, None, grad_scaler=False))
    tokenizer = AutoTokenizer.from_pretrained(models[family])
    batch = {k: v.to(device) for k, v in collate(qa_examples(tokenizer), tokenizer.eos_token_id).items()}

    expected = reference.train()(**batch).loss  # PEFT's model, transformers' own loss
    expected.backward()
    summed, count = summed_token_loss(ours.train(), batch)
    (summed / count).backward()

    assert abs(float(summed.detach() / count) - float(expected.detach())) <= 1e-5
    pairs = [(n, p, q) for (n, p), (_, q) in zip(reference.named_parameters(), ours.named_parameters(), strict=True)
             if p.requires_grad]
    assert len(pairs) >= 4 * 2 * 2  # A and B of at least four linear layers in each of two layers
    for name, want, got in pairs:
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4, msg=name)

    base = ours.get_base_model()
    fused_head, cpu_attention, fast_decoder = APPLIES[family]
    lora_layers = [m for m in ours.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert lora_layers and all("forward" in vars(m) for m in lora_layers)  # the lean LoRA branch, everywhere
    assert _plain_heads[base] is fused_head
    assert head_fuses(base.config) is fused_head  # the memory estimate counts the head the run will use
    assert (base.config._attn_implementation == CPU_ATTENTION) is (cpu_attention and device == "cpu")
    assert (FastDecoder.unsupported(ours.eval()) is None) is fast_decoder


def train(model: Path, dataset: Path, output: Path, fast_paths: bool, epochs: int) -> list[float]:
    losses: list[float] = []
    run_lora_finetune(TrainConfig(
        base_model=str(model), dataset_path=str(dataset), output_dir=str(output), num_epochs=epochs, batch_size=4,
        learning_rate=1e-2, lr_scheduler_type="constant", validation_split=0, bf16=False, save_steps=10_000,
        fast_paths=fast_paths,
        lora_config=LORA,
    ), on_progress=lambda progress: losses.append(progress.loss))
    return losses


@pytest.fixture(scope="module")
def qa_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = tmp_path_factory.mktemp("data") / "qa.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": qa_prompt(q), "completion": a}, ensure_ascii=False) + "\n"
                               for q, a in QA_PAIRS), encoding="utf-8")
    return dataset


@pytest.fixture(scope="module")
def trained(models: dict[str, Path], qa_dataset: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[float]]]:
    """Each family's adapter from 80 steps of our recipe (40 epochs of 8 answers), and its loss curve."""
    root = tmp_path_factory.mktemp("trained")
    return {family: (root / family / "lora_adapter", train(models[family], qa_dataset, root / family, True, 40))
            for family in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_training_follows_plain_peft_and_learns(models: dict[str, Path], qa_dataset: Path, trained: dict,
                                               family: str, tmp_path: Path) -> None:
    _, fast = trained[family]
    plain = train(models[family], qa_dataset, tmp_path / "plain", False, 5)
    assert fast[:len(plain)] == pytest.approx(plain, rel=1e-4)
    assert fast[-1] < 0.01 * fast[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_served_answers_equal_peft_generate_and_bf16_reproduces_training(
        models: dict[str, Path], trained: dict, family: str) -> None:
    adapter = trained[family][0]
    tokenizer = AutoTokenizer.from_pretrained(models[family])
    prompts = [qa_prompt(q) for q, _ in QA_PAIRS]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models[family]), adapter).eval()
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=48, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert expected == [a for _, a in QA_PAIRS]  # the adapter learned its answers

    registry = ModelRegistry()
    try:
        for dtype in ("float32", "bfloat16"):
            served = registry.load(f"{family}-{dtype}", str(models[family]), str(adapter), dtype)
            questions = [Question(tokenizer(p).input_ids, served.adapter, 48) for p in prompts]
            assert greedy_answers(served.base.engine, questions) == expected, dtype  # all in one batch
            runner = served.base.engine._runner
            fast = getattr(runner, "decoder", None)
            assert served.base.engine.paged is APPLIES[family][2]
            on_cpu = next(served.base.model.parameters()).device.type == "cpu"
            if fast is not None and dtype == "bfloat16" and on_cpu:  # the packed bf16 decode real CPUs use
                assert all(group.packed is not None for group in fast.groups())
    finally:
        registry.close()
