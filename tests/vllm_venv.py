"""The vLLM virtualenv the vLLM backend's tests run: GPT_SERVICE_VLLM_PYTHON, else the repository's .venv-vllm.

Without it those tests are skipped with the command that makes it, unless GPT_SERVICE_REQUIRE_VLLM=1
(set by `.ci/run`), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRE_ENV = "GPT_SERVICE_REQUIRE_VLLM"


def vllm_python() -> Path:
    """The vLLM interpreter to test with; the test is skipped (or, in CI, failed) when it is missing."""
    python = Path(os.environ.get("GPT_SERVICE_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
    if not python.is_file():
        message = f"no vLLM virtualenv at {python}: make it with `bash scripts/setup-vllm.sh`"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}; {REQUIRE_ENV}=1 says the vLLM tests must run")
        pytest.skip(message)
    return python
