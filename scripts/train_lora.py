#!/usr/bin/env python3
"""Fine-tune a causal LM with LoRA (the training guide's script).

    python scripts/train_lora.py \\
      --base_model Qwen/Qwen2-7B-Instruct \\
      --dataset_path data/train.json \\
      --output_dir models/checkpoints/my_task \\
      --num_epochs 3 --batch_size 4 --learning_rate 2e-4

`--help` lists every flag; defaults come from config/models.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from gpt_service.training.allocator import run_with_allocator
from gpt_service.training.command import main

if __name__ == "__main__":
    run_with_allocator()
    sys.exit(main(prog="train_lora.py"))
