"""An evaluation result as rich tables: the figures (base and difference beside them), then samples."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

ROWS = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.4g}"),
        ("token accuracy", "token_accuracy", "{:.2%}"), ("exact match", "exact_match", "{:.2%}"),
        ("chrF", "chrf", "{:.2f}")]


def _cell(value: float | None, style: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = style.format(value)
    return f"+{text}" if signed and value > 0 else text


def figures_table(result: dict[str, Any]) -> Table:
    base, difference = result.get("base_metrics"), result.get("difference")
    title = Text(result["model_name"] + (" (adapter)" if result.get("lora_adapter") else ""))
    table = Table(title=f"{result['samples']} samples, {result['tokens']} answer tokens, "
                  f"{result['generated_samples']} answered, {result['time_seconds']:.1f} s")
    table.add_column("metric")
    table.add_column(title, justify="right")
    if base is not None and difference is not None:
        table.add_column("base", justify="right")
        table.add_column("difference", justify="right")
    for label, key, style in ROWS:
        cells = [_cell(result["metrics"][key], style)]
        if base is not None and difference is not None:
            cells += [_cell(base[key], style), _cell(difference[key], style, signed=True)]
        table.add_row(label, *cells)
    return table


def samples_table(result: dict[str, Any]) -> Table:
    compare = result.get("base_metrics") is not None
    table = Table(title="samples", show_lines=True)
    for column in ("prompt", "reference", "answer", *(["base answer"] if compare else [])):
        table.add_column(column, overflow="fold")
    for sample in result["examples"]:  # Text: a "[b]" in the data is text, not markup
        texts = [sample["prompt"], sample["reference"], sample["answer"], *([sample["base_answer"]] if compare else [])]
        table.add_row(*(Text(t) for t in texts))
    return table


def print_result(result: dict[str, Any], console: Console) -> None:
    console.print(figures_table(result))
    if result["examples"]:
        console.print(samples_table(result))
    if result["truncated_samples"]:
        console.print(f"{result['truncated_samples']} sample(s) were cut to max_length", markup=False)
