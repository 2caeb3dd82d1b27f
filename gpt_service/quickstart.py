"""The offline quickstart: demo model, a LoRA fine-tune on data/train.json, base vs adapter.

    gpt-service quickstart
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt_service.demo_model import build_demo_model
from gpt_service.training.command import main as train_main

DEMO_DIR = Path("models/demo")
OUTPUT_DIR = Path("models/checkpoints/quickstart")
# The demo model is tiny and random: it needs more epochs and a higher rate than a real model.
DEMO_FLAGS = ["--num_epochs", "30", "--batch_size", "4", "--learning_rate", "5e-3",
              "--target_modules", "all-linear", "--overwrite_output_dir"]


def greedy(model: object, tokenizer: object, prompt: str, max_new_tokens: int = 64) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(dataset: str = "data/train.json") -> int:
    if not (DEMO_DIR / "config.json").exists():
        build_demo_model(DEMO_DIR)
        print(f"built the demo model in {DEMO_DIR}/")
    code = train_main(["--base_model", str(DEMO_DIR), "--dataset_path", dataset,
                       "--output_dir", str(OUTPUT_DIR), *DEMO_FLAGS])
    if code:
        return code
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    base = AutoModelForCausalLM.from_pretrained(DEMO_DIR)
    record = json.loads(Path(dataset).read_text(encoding="utf-8"))[1]["text"]
    prompt = record[: record.index("助手：") + len("助手：")] if "助手：" in record else record[:20]
    base_text = greedy(base, tokenizer, prompt)
    tuned = PeftModel.from_pretrained(base, OUTPUT_DIR / "lora_adapter")
    print(f"\nprompt:  {prompt!r}\nbase:    {base_text!r}\nadapter: {greedy(tuned, tokenizer, prompt)!r}")
    return 0
