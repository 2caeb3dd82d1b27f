"""Training in less memory: activation checkpointing and a 4- or 8-bit base (QLoRA).

Checkpointing must not change a step: the same loss and LoRA gradients as keeping the activations,
with every fast path on, for families that take different fast paths (Qwen2: all of them; GPT-2:
Conv1D layers; Gemma 2: soft-capped logits and attention, so neither the fused head nor the CPU
attention); with LoRA dropout on, the recompute draws the very masks of its forward. A quantized
base trains through our lean LoRA branch exactly as through PEFT's own bitsandbytes layers, learns
its answers, and leaves an adapter PEFT loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import QuantizationSettings, TrainConfig
from gpt_service.data.batching import collate
from gpt_service.evaluation.generation import Question, greedy_answers
from gpt_service.hardware import Precision
from gpt_service.inference.registry import ModelRegistry
from gpt_service.quantization import bitsandbytes_config, keep_trainable_layout
from gpt_service.training.loss import summed_token_loss
from gpt_service.training.recipe import run_lora_finetune
from gpt_service.training.speedups import speed_up
from tests.conftest import QA_PAIRS, qa_prompt, write_jsonl
from tests.families.models import build
from tests.families.test_matrix import qa_examples

FP32_CPU = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in ("qwen2", "gpt2", "gemma2")}


def peft_model(path: Path, dropout: float, **loading: Any) -> Any:
    torch.manual_seed(0)
    base = keep_trainable_layout(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **loading))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
            torch.nn.init.normal_(param, std=0.05)
    return model


def one_step(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout draws for every model
    summed, count = summed_token_loss(model.train(), batch)
    (summed / count).backward()
    return float(summed.detach() / count), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(got: tuple[float, dict], want: tuple[float, dict]) -> None:
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    assert got[1].keys() == want[1].keys() and len(got[1]) >= 8
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_checkpointing_gives_the_same_step(families: dict[str, Path], family: str, dropout: float) -> None:
    reference = peft_model(families[family], dropout)
    tokenizer = AutoTokenizer.from_pretrained(families[family])
    batch = collate(qa_examples(tokenizer), tokenizer.eos_token_id)
    kept, recomputed = copy.deepcopy(reference), copy.deepcopy(reference)  # before any step
    # Without dropout the masks are moot and `kept` shares them as it does when not checkpointing;
    # with dropout both draw one mask per layer, so that any difference is the recompute's.
    speed_up(kept, FP32_CPU, checkpointing=dropout > 0)
    speed_up(recomputed, FP32_CPU, checkpointing=True)
    recomputed.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    want = one_step(kept, batch)
    assert_same_step(one_step(recomputed, batch), want)
    if dropout == 0:  # and that is PEFT's step
        assert_same_step(one_step(reference, batch), want)


@pytest.mark.parametrize("settings", [QuantizationSettings(bits=4, type="nf4"), QuantizationSettings(bits=8)],
                         ids=["nf4", "int8"])
def test_quantized_step_through_the_lean_branch_equals_peft(tiny_model: Path, settings: QuantizationSettings,
                                                             ) -> None:
    loading = {"quantization_config": bitsandbytes_config(settings, torch.float32), "device_map": {"": "cpu"}}
    reference, ours = peft_model(tiny_model, 0.0, **loading), peft_model(tiny_model, 0.0, **loading)
    speed_up(ours, FP32_CPU)
    lean = [m for m in ours.modules() if hasattr(m, "lora_A") and "forward" in vars(m)]
    assert lean and all("bnb" in type(m).__module__ for m in lean)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = collate(qa_examples(tokenizer), tokenizer.eos_token_id)
    assert_same_step(one_step(ours, batch), one_step(reference, batch))


@pytest.mark.slow
def test_a_4bit_run_with_checkpointing_learns_its_answers_and_is_served_4bit(tiny_model: Path, tmp_path: Path) -> None:
    dataset = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": qa_prompt(q), "completion": a} for q, a in QA_PAIRS])
    losses: list[float] = []
    result = run_lora_finetune(TrainConfig(
        base_model=str(tiny_model), dataset_path=str(dataset), output_dir=str(tmp_path / "run"), num_epochs=40,
        batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant", validation_split=0, save_steps=10_000,
        quantization={"bits": 4, "type": "nf4", "double_quant": True}, gradient_checkpointing=True,
        lora_config={"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
    ), on_progress=lambda progress: losses.append(progress.loss))
    assert losses[-1] < 0.05 * losses[0]

    quantized = AutoModelForCausalLM.from_pretrained(tiny_model, device_map={"": "cpu"}, quantization_config=(
        bitsandbytes_config(QuantizationSettings(bits=4, type="nf4"), torch.bfloat16)))
    model = PeftModel.from_pretrained(keep_trainable_layout(quantized), result.adapter_dir).eval()  # plain PEFT
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for example in qa_examples(tokenizer):  # each answer token is the adapted model's first choice
        ids = torch.tensor([example.input_ids])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            predicted = model(input_ids=ids).logits[0, :-1].argmax(-1)
        answer = torch.tensor(example.labels[1:]) != -100
        assert predicted[answer].tolist() == ids[0, 1:][answer].tolist()

    # Served on a 4-bit base by our engine, all prompts in one batch: PEFT's `generate`, one at a time.
    registry = ModelRegistry()
    try:
        served = registry.load("qlora", str(tiny_model), result.adapter_dir, "float32",
                               quantization=QuantizationSettings(bits=4, type="nf4"))
        assert served.describe()["quantization"] == "4-bit nf4"
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
            tiny_model, device_map={"": "cpu"}, dtype=torch.float32,
            quantization_config=bitsandbytes_config(QuantizationSettings(bits=4, type="nf4"), torch.float32)),
            result.adapter_dir).eval()
        prompts = [tokenizer(qa_prompt(q)).input_ids for q, _ in QA_PAIRS]
        expected = []
        for ids in prompts:
            with torch.no_grad():
                out = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
        answers = greedy_answers(served.base.engine, [Question(ids, served.adapter, 24) for ids in prompts])
        assert answers == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    finally:
        registry.close()
