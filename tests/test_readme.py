"""Every example in README.md runs, in order, against a real server (on a free port: the examples' 8000 is
rewritten); those of its vLLM section against a server of their own, with vLLM.

The set-up commands are what CI itself runs, so they are the one kind of block not repeated here.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from gpt_service.demo_model import build_demo_model
from tests.conftest import REPO, Server, free_port, on_port
from tests.vllm_venv import vllm_python

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


VLLM_SECTION = "\n## Serving with vLLM\n"


def readme_blocks(vllm: bool = False) -> list[tuple[str, str]]:
    """The README's examples but its set-up commands: those of its vLLM section, or all the others."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(VLLM_SECTION)
    end = text.find("\n## ", start + len(VLLM_SECTION))
    part = text[start:end] if vllm else text[:start] + text[end:]
    return [(kind, code) for kind, code in BLOCK.findall(part) if "scripts/setup" not in code]


def run_blocks(blocks: list[tuple[str, str]], workspace: Path, server: Server, env: dict[str, str]) -> None:
    """Run each block in the workspace against the server: python in this process (it must print), bash apart."""
    for kind, code in blocks:
        code = on_port(code, server.port)
        if kind == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.chdir(workspace):
                exec(code, {})
            assert printed.getvalue().strip(), code
        else:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workspace,
                                    env=env | {"PATH": os.environ["PATH"]}, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"


@pytest.fixture
def readme_workspace(tmp_path: Path) -> Path:
    workspace = tmp_path / "checkout"
    shutil.copytree(REPO / "data", workspace / "data")
    shutil.copytree(REPO / "config", workspace / "config")
    shutil.copytree(REPO / "scripts", workspace / "scripts")
    (workspace / ".venv").symlink_to(REPO / ".venv")
    build_demo_model(workspace / "models" / "demo")
    return workspace


def test_every_readme_example_runs(readme_workspace: Path, server_env: dict[str, str]) -> None:
    blocks = readme_blocks()
    assert sum(kind == "python" for kind, _ in blocks) >= 1 and sum(kind == "bash" for kind, _ in blocks) >= 4
    server = Server(readme_workspace, free_port(), server_env).start()
    try:
        run_blocks(blocks, readme_workspace, server, server_env)
    finally:
        server.stop()
    assert (readme_workspace / "models/checkpoints/script_task/lora_adapter/adapter_model.safetensors").is_file()


def test_the_vllm_sections_examples_run(readme_workspace: Path, server_env: dict[str, str]) -> None:
    blocks = readme_blocks(vllm=True)
    assert [kind for kind, _ in blocks] == ["bash", "python"]
    env = server_env | {"GPT_SERVICE_VLLM_PYTHON": str(vllm_python()), "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = Server(readme_workspace, free_port(), env).start()
    try:
        run_blocks(blocks, readme_workspace, server, env)
        assert requests.get(f"{server.url}/models", timeout=10).json()["models"] == []
        assert list((readme_workspace / "logs").glob("vllm-demo-vllm-*.log"))  # its server's log, kept
    finally:
        server.stop()
