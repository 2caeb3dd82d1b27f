"""`gpt-service export --adapter DIR --merge OUT`: a plain model that answers as base + adapter did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_service.config import build_train_config
from gpt_service.training import run_lora_finetune
from tests.conftest import write_json

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt_service.cli", "export", *args], capture_output=True,
                          text=True, timeout=300)


def test_export_merges_the_adapter_into_a_plain_model(tiny_model: Path, tmp_path: Path, text_records: list) -> None:
    dataset = write_json(tmp_path / "train.json", text_records)
    config = build_train_config({"base_model": str(tiny_model), "dataset_path": str(dataset),
                                 "output_dir": str(tmp_path / "run"), "num_epochs": 5, "learning_rate": 5e-3,
                                 "validation_split": 0}, config_path="")
    adapter = run_lora_finetune(config).adapter_dir
    out = tmp_path / "merged"
    result = export("--adapter", adapter, "--merge", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()

    ids = AutoTokenizer.from_pretrained(out)("用户：你好\n助手：", return_tensors="pt").input_ids
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter)(ids).logits
    torch.testing.assert_close(merged, peft, rtol=1e-4, atol=1e-4)

    again = export("--adapter", adapter, "--merge", str(out))
    assert again.returncode == 2 and "is not empty" in again.stderr
