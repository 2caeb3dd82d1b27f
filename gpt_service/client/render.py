"""What the client prints for people: task details, task and model tables, short figures."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

TASK_ID_WIDTH = 32  # uuid4().hex: never cut in a table
PIPE_WIDTH = 240  # tables written to a file or a pipe are not squeezed into 80 columns


def print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, ensure_ascii=False), flush=True)


def number(value: float | None, style: str = "{:.4f}") -> str:
    return "-" if value is None else style.format(value)


def duration(seconds: float | None) -> str:
    return "-" if seconds is None else str(timedelta(seconds=round(seconds)))


def steps(task: dict[str, Any]) -> str:
    total = task.get("total_steps")
    return f"{task.get('current_step') or 0}/{total}" if total else "-"


def figures(task: dict[str, Any]) -> str:
    """`loss 1.2345  eval 1.3000  1,234 tok/s  ETA 0:00:12` (what is known so far)."""
    parts = [f"loss {task['loss']:.4f}" if task.get("loss") is not None else "",
             f"eval {task['eval_loss']:.4f}" if task.get("eval_loss") is not None else "",
             f"{task['tokens_per_second']:,.0f} tok/s" if task.get("tokens_per_second") else "",
             f"ETA {duration(task['eta_seconds'])}" if task.get("eta_seconds") is not None
             and task.get("status") == "running" else ""]
    return "  ".join(p for p in parts if p)


TASK_FIELDS = [("task", "task_id"), ("kind", "kind"), ("status", "status"), ("base model", "base_model"),
               ("dataset", "dataset_path"), ("output dir", "output_dir"), ("adapter", "adapter_path"),
               ("error", "error"), ("attempts", "attempts"), ("created", "created_at"), ("started", "started_at"),
               ("finished", "finished_at")]


def task_table(task: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows = [(label, task.get(key)) for label, key in TASK_FIELDS[:3]]
    rows += [("progress", f"{task.get('progress') or 0:.2f}%"), ("step", steps(task)),
             ("epoch", number(task.get("epoch"), "{:.2f}")), ("loss", number(task.get("loss"))),
             ("eval loss", number(task.get("eval_loss"))),
             ("learning rate", number(task.get("learning_rate"), "{:.2e}")),
             ("tokens/s", number(task.get("tokens_per_second"), "{:,.0f}")),
             ("ETA", duration(task.get("eta_seconds")))]
    rows += [(label, task.get(key)) for label, key in TASK_FIELDS[3:]]
    for label, value in rows:
        if value is not None and value != "-":
            table.add_row(label, Text(str(value)))  # Text: a "[b]" in an error message is text, not markup
    return table


def history_table(tasks: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(tasks)} task(s), newest first")
    table.add_column("task", no_wrap=True, min_width=TASK_ID_WIDTH)
    for column in ("kind", "status", "progress", "step", "loss"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("progress", "step", "loss") else "left")
    table.add_column("base model", overflow="fold")
    table.add_column("created", overflow="fold")
    for task in tasks:
        table.add_row(task["task_id"], task.get("kind") or "train", task["status"], f"{task.get('progress') or 0:.1f}%",
                      steps(task), number(task.get("loss")), Text(str(task.get("base_model") or "-")),
                      (task.get("created_at") or "-")[:19])
    return table


def megabytes(value: int | None) -> str:
    return "-" if not value else f"{value / 2**20:,.1f} MB"


def models_table(models: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(models)} model(s) loaded")
    table.add_column("name", no_wrap=True)
    for column in ("base model", "adapter"):
        table.add_column(column, overflow="fold")
    for column in ("dtype", "memory", "running", "waiting", "context"):
        table.add_column(column, no_wrap=True, justify="left" if column == "dtype" else "right")
    for model in models:
        memory = (model.get("base_memory_bytes") or 0) + (model.get("adapter_memory_bytes") or 0)
        table.add_row(Text(model["model_name"]), Text(str(model.get("base_model") or "-")),
                      Text(str(model.get("lora_adapter") or "-")), model.get("dtype") or "-", megabytes(memory),
                      str(model.get("running", "-")), str(model.get("waiting", "-")),
                      str(model.get("context_length", "-")))
    return table


def stdout_console() -> Console:
    console = Console()
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=PIPE_WIDTH)


def print_table(table: Table) -> None:
    stdout_console().print(table)


def describe_estimate(answer: dict[str, Any]) -> str:
    """An estimate (`MemoryEstimate.as_dict()`, or POST /train/estimate's answer) as lines for a terminal."""
    rows, positions = answer["longest_batch"]
    lines = [
        f"longest micro-batch: {rows} x {positions} tokens; {answer['total_steps']} optimizer steps",
        f"  base weights ({answer['quantization'] or 'unquantized'}): {answer['weights_gb']:.2f} GB",
        f"  LoRA weights, gradients, AdamW state: {answer['lora_gb']:.2f} GB",
        f"  activations: {answer['activations_without_checkpointing_gb']:.2f} GB kept, "
        f"{answer['activations_with_checkpointing_gb']:.2f} GB with gradient checkpointing",
        f"  output head and loss: {answer['head_gb']:.2f} GB; runtime: {answer['runtime_gb']:.2f} GB"
        + (f"; {answer['loading_gb']:.2f} GB while the quantized base loads" if answer["loading_gb"] else ""),
        f"needs {answer['needed_gb']:.2f} GB with gradient_checkpointing "
        f"{'on' if answer['gradient_checkpointing'] else 'off'} ({answer['processes']} process(es)); "
        f"at least {answer['least_needed_gb']:.2f} GB with checkpointing and a 4-bit base",
        f"available on this {answer['device']}: {answer['available_gb']:.2f} GB: "
        + ("fits" if answer["fits"] else "does NOT fit"),
    ]
    if answer["eta_seconds"] is not None:
        lines.append(f"ETA about {answer['eta_seconds'] / 60:.1f} min (from a probe of one layer)")
    return "\n".join(lines)
