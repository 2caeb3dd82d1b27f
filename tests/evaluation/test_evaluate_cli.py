"""`gpt-service evaluate`: the same figures from the command line, as a table and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt_service.cli import main


def test_the_adapter_beats_its_base_through_the_cli(eval_workspace: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    workspace = eval_workspace["workspace"]
    output = tmp_path / "eval.json"
    code = main(["evaluate", "--model_path", str(workspace / "models/tiny"),
                 "--lora_adapter", str(workspace / eval_workspace["adapter"]),
                 "--dataset_path", str(workspace / "data/qa.jsonl"), "--compare_to_base", "--max_tokens", "48",
                 "--dtype", "float32", "--output_json", str(output)])
    assert code == 0
    table = capsys.readouterr().out
    for words in ("loss", "perplexity", "token accuracy", "exact match", "chrF", "difference", "base answer"):
        assert words in table
    result = json.loads(output.read_text(encoding="utf-8"))
    assert result["metrics"]["loss"] < result["base_metrics"]["loss"]
    assert result["metrics"]["exact_match"] == 1.0 > result["base_metrics"]["exact_match"]
    assert f"{result['metrics']['loss']:.4f}" in table and f"{result['base_metrics']['loss']:.4f}" in table


@pytest.mark.parametrize(("args", "words"), [
    (["--dataset_path", "data/qa.jsonl"], "--model_path: Field required"),
    (["--model_path", "models/tiny", "--dataset_path", "data/missing.jsonl"], "no such file"),
    (["--model_path", "models/tiny", "--dataset_path", "data/plain.txt", "--generation"], "no record has a reference"),
    (["--model_path", "models/tiny", "--dataset_path", "data/qa.jsonl", "--compare_to_base"], "no lora_adapter"),
])
def test_cli_errors_are_one_line(eval_workspace: dict, args: list[str], words: str, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(eval_workspace["workspace"])
    assert main(["evaluate", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and words in error and "\n" not in error
