"""`scripts/train_lora.py` and `gpt-service train`: fine-tune from the command line.

    python scripts/train_lora.py --base_model ./demo-model --dataset_path data/train.json \\
        --output_dir models/checkpoints/my_task --num_epochs 3 --batch_size 4 --learning_rate 2e-4

With `--nproc_per_node N` (or `--nnodes`, `--rdzv_endpoint`) the command re-runs itself under
torchrun as `python -m gpt_service.training.command ...`, once per process; see training/launch.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gpt_service.client.render import describe_estimate
from gpt_service.config import build_train_config
from gpt_service.errors import UserError
from gpt_service.training import launch
from gpt_service.training.arguments import add_training_arguments, overrides_from_args
from gpt_service.training.memory import estimate_memory
from gpt_service.training.progress import TrainingProgress
from gpt_service.training.recipe import run_lora_finetune


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with LoRA.")
    add_training_arguments(parser)
    launch.add_launch_arguments(parser)
    return parser


def _figures(p: TrainingProgress) -> str:
    parts = [f"loss {p.loss:.4f}" if p.loss is not None else "",
             f"eval {p.eval_loss:.4f}" if p.eval_loss is not None else "",
             f"{p.tokens_per_second:,.0f} tok/s", f"lr {p.learning_rate:.2e}"]
    return "  ".join(x for x in parts if x)


def _launch(options: launch.LaunchOptions, argv: list[str]) -> int:
    """Re-run this command under torchrun; the exit code, the failed ranks named on stderr."""
    import torch

    options.check(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    code, failure = launch.run_torchrun(options, "gpt_service.training.command", argv)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("gpt_service.training").setLevel(logging.INFO)  # the global batch, resumes, restarts
    console = Console(stderr=True)
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[figures]}"), TimeRemainingColumn())
    main_rank = launch.rank() == 0
    try:
        config = build_train_config(overrides_from_args(args), args.config)
        if args.estimate:
            print(describe_estimate(estimate_memory(config).as_dict()))
            return 0
        options = launch.launch_options(args, config.num_processes, config.max_restarts)
        if options.wanted and not launch.is_rank():
            return _launch(options, argv)
        if launch.is_rank():
            launch.die_with_parent()
        with Progress(*columns, console=console, transient=False, disable=not main_rank) as bar:
            task = bar.add_task("train", total=None, figures="", visible=False)

            def show(progress: TrainingProgress) -> None:
                bar.update(task, completed=progress.step, total=progress.total_steps,
                           figures=_figures(progress), visible=True)
                if progress.message:
                    bar.console.print(progress.message, markup=False, highlight=False)

            result = run_lora_finetune(config, on_progress=show)
    except UserError as exc:
        if main_rank:  # every rank meets the same refusal; one line of it is enough
            print(f"error: {exc}", file=sys.stderr)  # one plain line: no markup, no wrapping
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not main_rank:
        return 0
    summary = f"final loss {result.final_loss:.4f}" if result.final_loss is not None else "no step run"
    if result.final_eval_loss is not None:
        summary += f", eval loss {result.final_eval_loss:.4f}"
    if result.truncated_samples:
        summary += f", {result.truncated_samples} sample(s) truncated to max_length"
    print(f"{summary}\nadapter saved to {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
