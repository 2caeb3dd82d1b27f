"""scripts/train_lora.py end to end on the tiny model, for each dataset format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, qa_prompt, write_json, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

SCRIPT = REPO / "scripts" / "train_lora.py"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def write_dataset(kind: str, folder: Path, text_records: list[dict], qa_records: list[dict]) -> Path:
    if kind == "json":
        return write_json(folder / "train.json", text_records)
    if kind == "jsonl":
        return write_jsonl(folder / "train.jsonl", qa_records)
    if kind == "txt":
        path = folder / "train.txt"
        path.write_text("\n".join(r["text"].replace("\n", " ") for r in text_records) + "\n", encoding="utf-8")
        return path
    messages = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"]}]} for r in qa_records]
    return write_json(folder / "chat.json", messages)


@pytest.mark.parametrize("kind", ["json", "jsonl", "txt", "messages"])
def test_script_trains_an_adapter_that_loads_and_changes_the_output(
    kind: str, tiny_model: Path, tmp_path: Path, text_records: list[dict], qa_records: list[dict]
) -> None:
    dataset = write_dataset(kind, tmp_path, text_records, qa_records)
    out = tmp_path / "run"
    result = run_script("--base_model", str(tiny_model), "--dataset_path", str(dataset),
                        "--output_dir", str(out), "--num_epochs", "8", "--batch_size", "4",
                        "--learning_rate", "5e-3", "--validation_split", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "adapter saved to" in result.stdout

    adapter = out / "lora_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    record = json.loads((out / "run.json").read_text())
    losses = [point["loss"] for point in record["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    assert record["status"] == "completed" and len(record["dataset_sha256"]) == 64

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tokenizer(qa_prompt("你好"), return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


def test_script_without_output_dir_writes_a_fresh_run_under_models_checkpoints(
    tiny_model: Path, tmp_path: Path, text_records: list[dict]
) -> None:
    dataset = write_json(tmp_path / "train.json", text_records)
    result = run_script("--base_model", str(tiny_model), "--dataset_path", str(dataset), "--num_epochs", "1",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "models" / "checkpoints").iterdir())
    assert len(runs) == 1 and (runs[0] / "lora_adapter" / "adapter_model.safetensors").is_file()


def test_script_refuses_to_overwrite_another_run(tiny_model: Path, tmp_path: Path, text_records: list[dict]) -> None:
    dataset = write_json(tmp_path / "train.json", text_records)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_script("--base_model", str(tiny_model), "--dataset_path", str(dataset),
                        "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode != 0
    assert "is not empty" in result.stderr and "Traceback" not in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
