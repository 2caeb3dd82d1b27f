"""scripts/train_lora.py on bad input: a one-line error, a non-zero exit code, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt_service.training.command import main
from tests.conftest import REPO, write_json

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

SCRIPT = REPO / "scripts" / "train_lora.py"


def run_script(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it: offline, with an empty Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if k not in {"GPT_SERVICE_ALLOW_DOWNLOADS", "COLUMNS"}}
    env.update(HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", TERM="dumb")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line that says what is wrong, after checking the exit code and the absence of a traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_json(tmp_path / "train.json", [{"text": "Hello"}, {"text": "你好"}])


def train(tmp_path: Path, *args: str, base_model: str | Path | None = None, data: Path | None = None,
          output_dir: Path | None = None) -> subprocess.CompletedProcess:
    flags = ["--output_dir", str(output_dir or tmp_path / "run")]
    if base_model is not None:
        flags += ["--base_model", str(base_model)]
    if data is not None:
        flags += ["--dataset_path", str(data)]
    return run_script(*flags, *args, cwd=tmp_path, home=tmp_path)


def test_malformed_jsonl_names_the_file_and_line(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(1, 17)) + '{"text": oops}\n')
    line = error_line(train(tmp_path, base_model=tiny_model, data=data))
    assert str(data) in line and "malformed JSON at line 17: Expecting value" in line


def test_a_record_without_text_lists_its_keys_verbatim(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n{"[bold]question": "q", "[/answer]": "a"}\n')
    line = error_line(train(tmp_path, base_model=tiny_model, data=data))
    assert str(data) in line and "record 3" in line
    assert '"[bold]question", "[/answer]"' in line  # printed as it is, not as console markup


def test_a_missing_dataset_file_is_named(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "no" / "such" / "train.jsonl"
    line = error_line(train(tmp_path, base_model=tiny_model, data=data))
    assert str(data) in line and "no such file" in line


def test_an_unknown_config_key_is_named(tiny_model: Path, tmp_path: Path, dataset: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("lora_config:\n  r: 8\nnum_epoch: 3\n")
    line = error_line(train(tmp_path, "--config", str(config), base_model=tiny_model, data=dataset))
    assert str(config) in line and "num_epoch" in line


def test_a_lora_config_that_is_not_a_mapping_is_named(tiny_model: Path, tmp_path: Path, dataset: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text("lora_config: [r, 8]\n")
    line = error_line(train(tmp_path, "--config", str(config), base_model=tiny_model, data=dataset))
    assert str(config) in line and "lora_config:" in line


def test_a_hub_id_offline_fails_at_once(tmp_path: Path, dataset: Path) -> None:
    started = time.monotonic()
    result = train(tmp_path, base_model="Qwen/Qwen2-7B-Instruct", data=dataset)
    elapsed = time.monotonic() - started
    line = error_line(result)
    assert "Qwen/Qwen2-7B-Instruct" in line and "downloads are off" in line and "GPT_SERVICE_ALLOW_DOWNLOADS" in line
    assert elapsed < 30, f"took {elapsed:.0f}s"


def test_a_folder_without_config_json_is_not_a_model(tmp_path: Path, dataset: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("weights go here")
    line = error_line(train(tmp_path, base_model=folder, data=dataset))
    assert str(folder) in line and "config.json" in line


# The same through `main` in this process: quicker, and what the script prints is what `main` prints.


def run_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *argv: str) -> subprocess.CompletedProcess:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPT_SERVICE_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    try:
        code = main([*argv, "--output_dir", str(tmp_path / "run")], prog="train_lora.py")
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def test_an_empty_dataset_is_named(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.txt"
    data.write_text("\n\n")
    line = error_line(run_main(tmp_path, monkeypatch, capsys, "--base_model", str(tiny_model),
                               "--dataset_path", str(data)))
    assert str(data) in line and "the dataset is empty" in line


@pytest.mark.parametrize(("yaml_text", "key"), [("lora_config:\n  r: eight\n", "lora_config.r"),
                                                ("num_epochs: true\n", "num_epochs"),
                                                ("lora_config:\n  target_modules: q_proj\n",
                                                 "lora_config.target_modules")])
def test_a_wrong_type_in_the_config_file_is_named(
    tiny_model: Path, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], yaml_text: str, key: str,
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "models.yaml").write_text(yaml_text)  # read by default from the working folder
    line = error_line(run_main(tmp_path, monkeypatch, capsys, "--base_model", str(tiny_model),
                               "--dataset_path", str(dataset)))
    assert f"error: {key}" in line


def test_a_bad_setting_in_a_flag_is_named(tiny_model: Path, tmp_path: Path, dataset: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(run_main(tmp_path, monkeypatch, capsys, "--base_model", str(tiny_model),
                               "--dataset_path", str(dataset), "--num_epochs", "0", "--lora_r", "0"))
    assert "num_epochs:" in line and "lora_config.r:" in line


def test_a_model_name_that_is_neither_folder_nor_hub_id(tmp_path: Path, dataset: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(run_main(tmp_path, monkeypatch, capsys, "--base_model", "./nowhere/model",
                               "--dataset_path", str(dataset)))
    assert "'./nowhere/model' is neither a local folder nor a hub id" in line


def test_a_missing_base_model_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(run_main(tmp_path, monkeypatch, capsys, "--dataset_path", "d.json"))
    assert "base_model: Field required" in line


def test_an_unparsable_flag_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    result = run_main(tmp_path, monkeypatch, capsys, "--base_model", "m", "--num_epochs", "three")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "train_lora.py: error: argument --num_epochs/--num-epochs: " \
        "invalid int value: 'three'"
