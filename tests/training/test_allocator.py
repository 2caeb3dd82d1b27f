"""Training processes run with tcmalloc where it is installed (CI installs it: a lower peak, see
training/allocator.py); `GPT_SERVICE_MALLOC=system` keeps glibc's malloc; a bad value is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_service.training import allocator
from tests.conftest import REPO, write_json

TCMALLOC = allocator.wanted_library({})


def train(tiny_model: Path, dataset: Path, out: Path, malloc: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | {"GPT_SERVICE_MALLOC": malloc}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train_lora.py"), "--base_model", str(tiny_model),
                           "--dataset_path", str(dataset), "--output_dir", str(out), "--num_epochs", "1",
                           "--validation_split", "0"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_script_trains_under_the_allocator_asked_for(tiny_model: Path, tmp_path: Path,
                                                           text_records: list[dict]) -> None:
    dataset = write_json(tmp_path / "train.json", text_records)
    for malloc, expected in (("tcmalloc", "tcmalloc" if TCMALLOC else "glibc"), ("system", "glibc")):
        result = train(tiny_model, dataset, tmp_path / malloc, malloc)
        assert result.returncode == 0, result.stderr
        assert f"memory allocator {expected}" in result.stderr
        assert (tmp_path / malloc / "lora_adapter" / "adapter_model.safetensors").is_file()
        assert "tcmalloc: large alloc" not in result.stderr


def test_a_bad_setting_is_refused_by_name(tiny_model: Path, tmp_path: Path, text_records: list[dict]) -> None:
    result = train(tiny_model, tmp_path / "absent.json", tmp_path / "out", "jemalloc")
    assert result.returncode != 0
    assert "GPT_SERVICE_MALLOC must be 'tcmalloc' or 'system', not 'jemalloc'" in result.stderr
    estimate = subprocess.run(  # `gpt-service train --estimate`, which weighs the run under the allocator
        [sys.executable, "-c", "import sys; from gpt_service.cli import main; sys.exit(main())", "train",
         "--base_model", str(tiny_model), "--dataset_path", str(write_json(tmp_path / "t.json", text_records)),
         "--estimate"], env=os.environ | {"GPT_SERVICE_MALLOC": "jemalloc"}, capture_output=True, text=True,
        timeout=300)
    assert estimate.returncode != 0 and "Traceback" not in estimate.stderr
    assert "GPT_SERVICE_MALLOC must be 'tcmalloc' or 'system', not 'jemalloc'" in estimate.stderr


@pytest.mark.skipif(TCMALLOC is None, reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_the_preload_keeps_what_was_preloaded_and_is_added_once() -> None:
    env = allocator.preloaded_environment({"LD_PRELOAD": "libother.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{TCMALLOC} libother.so" and env["PATH"] == "/bin"
    assert allocator.preloaded_environment(env) == env
    assert allocator.preloaded_environment({"GPT_SERVICE_MALLOC": "system"}) == {"GPT_SERVICE_MALLOC": "system"}
