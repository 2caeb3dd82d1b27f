"""`gpt-service evaluate`: measure a model, or an adapter against its base, on a dataset; print a table.

    gpt-service evaluate --model_path models/demo --lora_adapter models/checkpoints/run/lora_adapter \\
        --dataset_path data/qa.jsonl --compare_to_base --output_json eval.json

Runs in this process, on folders named directly (no workspace roots, as `gpt-service train`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gpt_service.errors import UserError
from gpt_service.evaluation.job import EvaluationJob
from gpt_service.evaluation.report import print_result
from gpt_service.training.arguments import _add, _flag_kwargs

MODEL_FLAGS = ("model_path", "lora_adapter", "dtype")  # listed first in --help


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate a model or a LoRA adapter on a dataset.")
    fields = EvaluationJob.model_fields
    for name in [*MODEL_FLAGS, *(n for n in fields if n not in MODEL_FLAGS and n != "model_name")]:
        _add(parser, name, fields[name].description, **_flag_kwargs(fields[name].annotation))
    parser.add_argument("--output_json", "--output-json", help="also write the whole result to this JSON file")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    values = {k: v for k, v in vars(args).items() if k in EvaluationJob.model_fields and v is not None}
    console = Console()
    try:
        job = EvaluationJob.model_validate(values)
        from gpt_service.evaluation.evaluate import evaluate_job

        with Progress(TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("evaluate", total=None)
            result = evaluate_job(job, lambda done, total: bar.update(task, completed=done, total=total))
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)  # one plain line: no markup, no wrapping
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_result(result, console)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
