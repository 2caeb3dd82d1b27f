"""config/models.yaml into typed settings: unknown keys and wrong types are errors naming the key;
a flag or request field overrides the file."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpt_service.config import ConfigError, LoraSettings, TrainConfig, build_train_config, read_yaml_config
from gpt_service.training.arguments import add_training_arguments, overrides_from_args
from tests.conftest import REPO

REQUIRED = {"base_model": "./demo-model", "dataset_path": "data/train.json"}


def write_yaml(folder: Path, text: str, name: str = "models.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(overrides: dict[str, Any], config_path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        build_train_config({**REQUIRED, **overrides}, config_path)
    return str(info.value)


def parse_flags(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    return overrides_from_args(parser.parse_args(list(argv)))


@pytest.fixture
def in_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# The shipped file


def test_the_shipped_models_yaml_has_the_spec_values() -> None:
    config = build_train_config(REQUIRED, REPO / "config" / "models.yaml")
    assert config.lora_config == LoraSettings(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                              "o_proj"], lora_dropout=0.05, bias="none")
    assert (config.gradient_accumulation_steps, config.warmup_steps, config.save_steps, config.eval_steps,
            config.max_grad_norm, config.fp16) == (1, 0, 500, 500, 1.0, False)
    assert config.validation_split == 0.1 and config.seed == 42


def test_config_models_yaml_in_the_working_folder_is_read_by_default(in_empty_folder: Path) -> None:
    assert build_train_config(REQUIRED).lora_config.r == 16
    (in_empty_folder / "config").mkdir()
    write_yaml(in_empty_folder / "config", "lora_config:\n  r: 4\nnum_epochs: 7\n")
    config = build_train_config(REQUIRED)
    assert (config.lora_config.r, config.num_epochs, config.lora_config.lora_alpha) == (4, 7, 32)


def test_without_any_file_the_defaults_apply(in_empty_folder: Path) -> None:
    config = build_train_config(REQUIRED)
    assert config == TrainConfig(**REQUIRED)
    assert (config.num_epochs, config.batch_size, config.learning_rate, config.dataset_format) == (3, 4, 2e-4, None)
    assert config.validation_split == 0.1 and config.train_on_prompt is False


def test_yaml_spellings_of_numbers_and_a_bom_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(b"\xef\xbb\xbflearning_rate: 2e-4\r\nlora_config:\r\n  lora_alpha: 16\r\n  target_modules: "
                     b"all-linear\r\n")
    config = build_train_config(REQUIRED, path)
    assert config.learning_rate == 2e-4 and config.lora_config.lora_alpha == 16.0
    assert config.lora_config.target_modules == "all-linear"


# Errors name the key


def test_an_unknown_key_in_the_file_is_named_with_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "num_epochs: 2\nlearning_rat: 0.001\n")
    message = config_error({}, path)
    assert str(path) in message and "learning_rat" in message and "unknown key" in message


def test_keys_that_are_not_strings_are_reported_not_crashed_on(tmp_path: Path) -> None:
    message = config_error({}, write_yaml(tmp_path, "1: one\nzeta: 2\n"))
    assert "unknown key(s) 1, zeta" in message


def test_an_unknown_lora_key_is_named(tmp_path: Path) -> None:
    message = config_error({}, write_yaml(tmp_path, "lora_config:\n  r: 8\n  alpha: 16\n"))
    assert message == "lora_config.alpha: unknown key"


def test_an_unknown_request_field_is_named(in_empty_folder: Path) -> None:
    assert config_error({"epochs": 3}, None) == "epochs: unknown key"


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("num_epochs: three\n", "num_epochs"),
    ("num_epochs: 2.5\n", "num_epochs"),
    ("num_epochs: true\n", "num_epochs"),
    ("learning_rate: fast\n", "learning_rate"),
    ("max_length: [1024]\n", "max_length"),
    ("fp16: maybe\n", "fp16"),
    ("save_total_limit: false\n", "save_total_limit"),
    ("dataset_format: csv\n", "dataset_format"),
    ("lr_scheduler_type: exponential\n", "lr_scheduler_type"),
    ("validation_split: 1.5\n", "validation_split"),
    ("lora_config:\n  r: sixteen\n", "lora_config.r"),
    ("lora_config:\n  r: 0\n", "lora_config.r"),
    ("lora_config:\n  lora_alpha: true\n", "lora_config.lora_alpha"),
    ("lora_config:\n  lora_dropout: 1.5\n", "lora_config.lora_dropout"),
    ("lora_config:\n  bias: some\n", "lora_config.bias"),
    ("lora_config:\n  target_modules: q_proj\n", "lora_config.target_modules"),
])
def test_a_wrong_type_or_value_in_the_file_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    message = config_error({}, write_yaml(tmp_path, yaml_text))
    assert message.startswith(f"{key}")
    assert "\n" not in message


@pytest.mark.parametrize("yaml_text", ["lora_config: [r, 16]\n", "lora_config: 16\n", "lora_config: fast\n"])
def test_a_lora_config_that_is_not_a_mapping_is_an_error(tmp_path: Path, yaml_text: str) -> None:
    path = write_yaml(tmp_path, yaml_text)
    message = config_error({}, path)
    assert str(path) in message and "lora_config" in message


def test_a_lora_config_request_field_that_is_not_a_mapping_is_an_error(in_empty_folder: Path) -> None:
    assert "lora_config" in config_error({"lora_config": ["r", 8]}, None)


def test_a_wrong_type_in_a_request_field_names_the_key(in_empty_folder: Path) -> None:
    message = config_error({"batch_size": "four", "lora_config": {"r": -1}}, None)
    assert "batch_size:" in message and "lora_config.r:" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("- a\n- b\n", "must be a mapping"),
    ("num_epochs: [\n", "not valid YAML"),
])
def test_a_file_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, expected: str) -> None:
    path = write_yaml(tmp_path, text)
    message = config_error({}, path)
    assert str(path) in message and expected in message


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = config_error({}, path)
    assert str(path) in message and "does not exist" in message


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    assert read_yaml_config(write_yaml(tmp_path, "# nothing yet\n")) == {}
    assert build_train_config(REQUIRED, tmp_path / "models.yaml") == TrainConfig(**REQUIRED)


def test_fp16_and_bf16_together_are_refused(tmp_path: Path) -> None:
    assert "fp16 and bf16" in config_error({"bf16": True}, write_yaml(tmp_path, "fp16: true\n"))


def test_base_model_and_dataset_path_are_required(in_empty_folder: Path) -> None:
    with pytest.raises(ConfigError, match="base_model: Field required"):
        build_train_config({"dataset_path": "x.json"})


# Overrides


def test_a_request_field_overrides_the_file_and_lora_keys_merge(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "num_epochs: 5\nwarmup_steps: 10\nlora_config:\n  r: 8\n  lora_dropout: 0.2\n")
    config = build_train_config({**REQUIRED, "num_epochs": 1, "warmup_steps": None, "lora_config": {"r": 4}}, path)
    assert config.num_epochs == 1  # overridden
    assert config.warmup_steps == 10  # None means "not given"
    assert (config.lora_config.r, config.lora_config.lora_dropout, config.lora_config.lora_alpha) == (4, 0.2, 32)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "num_epochs: 5\nlearning_rate: 0.001\nfp16: true\nsave_steps: 7\n"
                                "lora_config:\n  r: 8\n  lora_alpha: 16\n  target_modules: [q_proj]\n")
    overrides = parse_flags("--base_model", "m", "--dataset_path", "d.json", "--num-epochs", "2",
                            "--learning_rate", "5e-3", "--fp16", "false", "--lora_r", "32",
                            "--target_modules", "q_proj, v_proj", "--lora_bias", "all", "--train_on_prompt")
    config = build_train_config(overrides, path)
    assert (config.num_epochs, config.learning_rate, config.fp16, config.save_steps) == (2, 5e-3, False, 7)
    assert config.train_on_prompt is True
    assert config.lora_config == LoraSettings(r=32, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                              lora_dropout=0.05, bias="all")


def test_flags_left_out_leave_the_file_values(tmp_path: Path) -> None:
    path = shutil.copy(REPO / "config" / "models.yaml", tmp_path / "models.yaml")
    overrides = parse_flags("--base_model", "m", "--dataset_path", "d.json")
    assert overrides == {"base_model": "m", "dataset_path": "d.json"}
    assert build_train_config(overrides, path) == build_train_config(REQUIRED | overrides, path)


def test_every_setting_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{name}" for name in TrainConfig.model_fields if name != "lora_config"} <= flags
    assert {"--lora_r", "--lora_alpha", "--target_modules", "--lora_dropout", "--lora_bias", "--config"} <= flags


@pytest.mark.parametrize("argv", [["--num_epochs", "two"], ["--fp16", "perhaps"], ["--dataset_format", "csv"],
                                  ["--lora_bias", "some"], ["--lr_scheduler_type", "exponential"]])
def test_a_bad_flag_value_is_refused_by_the_parser(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_flags(*argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err
