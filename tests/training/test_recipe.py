"""run_lora_finetune: it learns, it stops when asked, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import build_train_config
from gpt_service.training import TrainingProgress, run_lora_finetune
from tests.conftest import QA_PAIRS, qa_prompt, write_json, write_jsonl


def greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_adapter_reproduces_eight_answers_word_for_word(tiny_model: Path, tmp_path: Path, qa_records) -> None:
    dataset = write_jsonl(tmp_path / "qa.jsonl", qa_records)
    config = build_train_config({
        "base_model": str(tiny_model), "dataset_path": str(dataset), "output_dir": str(tmp_path / "run"),
        "num_epochs": 100, "batch_size": 8, "learning_rate": 1e-2, "validation_split": 0,
        "lr_scheduler_type": "constant", "lora_config": {"target_modules": "all-linear", "lora_dropout": 0},
    })
    seen: list[TrainingProgress] = []
    result = run_lora_finetune(config, on_progress=seen.append)
    assert result.global_step == result.total_steps == 100
    assert [p.step for p in seen] == list(range(1, 101))
    assert seen[-1].percent == 100.0 and seen[-1].tokens_per_second > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_answers = [greedy(base, tokenizer, qa_prompt(q)) for q, _ in QA_PAIRS]
    tuned = PeftModel.from_pretrained(base, result.adapter_dir)
    tuned_answers = [greedy(tuned, tokenizer, qa_prompt(q)) for q, _ in QA_PAIRS]
    assert tuned_answers == [a for _, a in QA_PAIRS]
    assert all(b != a for b, (_, a) in zip(base_answers, QA_PAIRS, strict=True))


def _resume_config(tiny_model: Path, dataset: Path, out: Path, **extra) -> object:
    return build_train_config({
        "base_model": str(tiny_model), "dataset_path": str(dataset), "output_dir": str(out), "num_epochs": 3,
        "batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "save_steps": 2,
        "warmup_steps": 2, "lr_scheduler_type": "cosine", "validation_split": 0.25, "eval_steps": 3,
        "lora_config": {"lora_dropout": 0.1}, **extra,
    })


@pytest.mark.slow
def test_resume_ends_at_the_uninterrupted_weights(tiny_model: Path, tmp_path: Path, text_records) -> None:
    dataset = write_json(tmp_path / "train.json", text_records * 2)
    straight = run_lora_finetune(_resume_config(tiny_model, dataset, tmp_path / "straight"))

    interrupted = tmp_path / "interrupted"
    steps: list[int] = []
    stopped = run_lora_finetune(
        _resume_config(tiny_model, dataset, interrupted),
        on_progress=lambda p: steps.append(p.step), should_stop=lambda: len(steps) >= 5,
    )
    assert stopped.stopped and stopped.adapter_dir is None
    assert not (interrupted / "lora_adapter").exists()
    assert (interrupted / "checkpoint-4").is_dir()

    resumed = run_lora_finetune(_resume_config(tiny_model, dataset, interrupted, resume_from_checkpoint="latest"))
    assert resumed.global_step == straight.global_step
    expected = load_file(Path(straight.adapter_dir) / "adapter_model.safetensors")
    actual = load_file(Path(resumed.adapter_dir) / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)
    assert resumed.final_eval_loss == pytest.approx(straight.final_eval_loss, rel=1e-4)


def test_checkpoints_hold_everything_and_only_the_newest_are_kept(tiny_model: Path, tmp_path: Path,
                                                                   text_records) -> None:
    dataset = write_json(tmp_path / "train.json", text_records * 2)
    out = tmp_path / "run"
    result = run_lora_finetune(_resume_config(tiny_model, dataset, out, save_steps=1, save_total_limit=2))
    last = result.total_steps - 1  # the final step publishes the adapter instead of a checkpoint
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{last - 1}", f"checkpoint-{last}"]
    files = {p.name for p in (out / f"checkpoint-{last}").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "rng_state.pt", "trainer_state.json"} <= files
    assert not list(out.glob(".*"))  # no temporary folder left behind


def test_tensorboard_event_files_hold_the_loss_curve(tiny_model: Path, tmp_path: Path, text_records) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset = write_json(tmp_path / "train.json", text_records)
    result = run_lora_finetune(build_train_config({
        "base_model": str(tiny_model), "dataset_path": str(dataset), "output_dir": str(tmp_path / "run"),
        "num_epochs": 2, "batch_size": 4, "validation_split": 0.25, "eval_steps": 1, "tensorboard": True,
    }))
    events = EventAccumulator(str(tmp_path / "run" / "runs")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, result.total_steps + 1))
    assert len(events.Scalars("eval/loss")) == result.total_steps
    assert events.Scalars("train/loss")[-1].value == pytest.approx(result.final_loss, rel=1e-5)
