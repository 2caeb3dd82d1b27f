"""Every example in README.md runs, in order, against a real server (on a free port: the examples' 8000 is
rewritten).

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

from gpt_service.demo_model import build_demo_model
from tests.conftest import REPO, Server, free_port, on_port

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


def readme_blocks() -> list[tuple[str, str]]:
    blocks = BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))
    return [(kind, code) for kind, code in blocks if "scripts/setup.sh" not in code]


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
        for kind, code in blocks:
            code = on_port(code, server.port)
            if kind == "python":
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed), contextlib.chdir(readme_workspace):
                    exec(code, {})
                assert printed.getvalue().strip(), code
            else:
                result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=readme_workspace,
                                        env=server_env | {"PATH": os.environ["PATH"]}, capture_output=True,
                                        text=True, timeout=600)
                assert result.returncode == 0, f"{code}\n{result.stdout}\n{result.stderr}"
    finally:
        server.stop()
    assert (readme_workspace / "models/checkpoints/script_task/lora_adapter/adapter_model.safetensors").is_file()
