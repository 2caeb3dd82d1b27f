"""The pieces of a distributed launch that need no process group: options, the data split, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gpt_service.config import ConfigError, build_train_config
from gpt_service.data.batching import rank_share
from gpt_service.errors import UserError
from gpt_service.training import run_lora_finetune
from gpt_service.training.launch import LaunchError, LaunchOptions, describe_failures
from tests.conftest import REPO, write_json


def test_each_rank_takes_every_other_sample_and_all_ranks_run_as_many_pieces() -> None:
    batch = [10, 11, 12, 13, 14]
    assert rank_share(batch, 0, 2, 2) == [[10, 12], [14]]
    assert rank_share(batch, 1, 2, 2) == [[11, 13], []]  # an empty piece: run with no weight
    assert rank_share(batch, 0, 1, 2) == [[10, 11], [12, 13], [14]]
    assert rank_share([7], 1, 2, 4) == [[]]
    shares = [rank_share(batch, rank, 3, 1) for rank in range(3)]
    assert sorted(i for share in shares for piece in share for i in piece) == batch
    assert {len(share) for share in shares} == {2}


def test_torchrun_arguments_for_one_machine_and_for_several() -> None:
    alone = LaunchOptions(nproc_per_node=2, max_restarts=1).torchrun_args("pkg.mod", ["--x", "1"])
    assert alone == ["--nproc_per_node=2", "--max_restarts=1", "--standalone", "--module", "pkg.mod", "--x", "1"]
    several = LaunchOptions(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    assert several.torchrun_args("pkg.mod", []) == [
        "--nproc_per_node=4", "--max_restarts=0", "--nnodes=2", "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=gpt-service", "--node_rank=1", "--module", "pkg.mod"]
    assert not LaunchOptions().wanted and LaunchOptions(rdzv_endpoint="h:1").wanted


@pytest.mark.parametrize(("options", "cuda", "words"), [
    (LaunchOptions(nproc_per_node=3), 2, "more than the 2 CUDA device(s)"),
    (LaunchOptions(nproc_per_node=0), 0, "--nproc_per_node must be at least 1"),
    (LaunchOptions(nnodes=2), 0, "--nnodes above 1 needs --rdzv_endpoint"),
    (LaunchOptions(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), 0, "--node_rank must be between 0 and 1"),
    (LaunchOptions(rdzv_endpoint="no-port"), 0, "--rdzv_endpoint must be HOST:PORT"),
])
def test_launch_options_that_cannot_work_are_refused_by_name(options: LaunchOptions, cuda: int, words: str) -> None:
    with pytest.raises(LaunchError, match=words.replace("(", r"\(").replace(")", r"\)")):
        options.check(cuda)


def test_more_processes_than_cpus_is_fine_without_cuda() -> None:
    LaunchOptions(nproc_per_node=8).check(0)


def test_failed_ranks_are_named_with_their_signal_or_message() -> None:
    killed = SimpleNamespace(exitcode=-9, message="Signal 9 (SIGKILL) received by PID 12")
    raised = SimpleNamespace(exitcode=1, message="Traceback ...\nValueError: bad")
    assert describe_failures({1: killed, 0: raised}) == "rank 0 failed: ValueError: bad; rank 1 was killed by SIGKILL"
    stopped = SimpleNamespace(exitcode=-15, message="Signal 15 (SIGTERM) received by PID 11")
    assert describe_failures({0: stopped, 1: killed}) == "rank 1 was killed by SIGKILL; torchrun stopped the others"
    assert describe_failures({0: stopped}) == "rank 0 was killed by SIGTERM"


@pytest.mark.parametrize(("field", "value", "words"), [
    ("num_processes", 0, "num_processes: Input should be greater than or equal to 1"),
    ("distributed", "zero", "distributed: Input should be 'ddp' or 'fsdp'"),
    ("max_restarts", -1, "max_restarts: Input should be greater than or equal to 0"),
])
def test_bad_distributed_settings_name_the_field(field: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        build_train_config({"base_model": "m", "dataset_path": "d", field: value}, "")


def test_several_processes_without_torchrun_are_refused(tiny_model: Path, tmp_path: Path, text_records) -> None:
    config = build_train_config({"base_model": str(tiny_model), "dataset_path": str(write_json(
        tmp_path / "t.json", text_records)), "output_dir": str(tmp_path / "run"), "num_processes": 2}, "")
    with pytest.raises(UserError, match="num_processes above 1 needs torchrun"):
        run_lora_finetune(config)


def test_the_command_refuses_bad_launch_flags_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "train_lora.py"), "--base_model", "m",
                             "--dataset_path", "d", "--nnodes", "2"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --nnodes above 1 needs --rdzv_endpoint HOST:PORT " \
        "(the same on every machine)"
    sent = subprocess.run([sys.executable, "-m", "gpt_service.cli", "train", "--base_model", "m", "--dataset_path",
                           "d", "--url", "http://127.0.0.1:9", "--rdzv_endpoint", "h:1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 2 and "--rdzv_endpoint: only for a training run here" in sent.stderr
