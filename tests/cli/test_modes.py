"""`gpt-service train` and `evaluate` run here unless a service is named; usage errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt_service.cli import main
from gpt_service.client.commands import training_body
from gpt_service.client.modes import train_parser
from tests.conftest import QA_PAIRS, qa_prompt, write_json


@pytest.fixture
def no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPT_SERVICE_URL", raising=False)
    monkeypatch.setenv("GPT_SERVICE_API_KEY", "a-server-key")  # a key alone does not make a client


def test_train_without_a_url_trains_here(no_service: None, tiny_model: Path, tmp_path: Path) -> None:
    data = write_json(tmp_path / "train.json", [{"text": qa_prompt(q) + a} for q, a in QA_PAIRS])
    code = main(["train", "--base_model", str(tiny_model), "--dataset_path", str(data),
                 "--output_dir", str(tmp_path / "run"), "--num_epochs", "1", "--validation_split", "0"])
    assert code == 0
    assert (tmp_path / "run" / "lora_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("argv", "words"), [
    (["train", "--base_model", "m", "--follow"], "--follow: only with a service; give --url or set GPT_SERVICE_URL"),
    (["train", "--api-key", "k", "--json"], "--api-key, --json: only with a service"),
    (["evaluate", "--model_name", "tuned", "--dataset_path", "d"], "--model_name: only with a service"),
    (["history", "--status", "finished"], "argument --status: invalid choice"),
    (["logs"], "the following arguments are required: task_id"),
    (["generate", "model", "hi", "--max_tokens", "many"], "argument --max_tokens"),
])
def test_usage_errors_exit_2_before_anything_is_sent(no_service: None, argv: list[str], words: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_a_url_that_is_not_one_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", "localhost:8000"]) == 2
    assert "--url 'localhost:8000' is not an http(s) URL; give it as http://HOST:PORT" in capsys.readouterr().err


def test_the_request_is_the_config_files_values_under_the_flags(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("num_epochs: 7\nbatch_size: 2\nlora_config:\n  r: 4\n  lora_alpha: 8\n", encoding="utf-8")
    args = train_parser("t").parse_args(["--config", str(config), "--base_model", "models/x", "--dataset_path",
                                         "data/y.json", "--batch_size", "16", "--lora_alpha", "32"])
    assert training_body(args) == {"num_epochs": 7, "batch_size": 16, "base_model": "models/x",
                                   "dataset_path": "data/y.json", "lora_config": {"r": 4, "lora_alpha": 32}}
    bare = train_parser("t").parse_args(["--base_model", "models/x", "--dataset_path", "data/y.json"])
    assert training_body(bare) == {"base_model": "models/x", "dataset_path": "data/y.json"}
