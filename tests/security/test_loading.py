"""What gets loaded: safetensors only, no remote code, no network unless allowed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from tests.conftest import Server

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

MARKER = Path("/tmp/gpt-service-remote-code-ran")


def pickle_only_copy(source: Path, target: Path, weights: str, pickle_name: str) -> Path:
    shutil.copytree(source, target)
    torch.save(load_file(target / weights), target / pickle_name)
    (target / weights).unlink()
    return target


def test_pickle_only_models_and_adapters_are_refused(server: Server, tiny_model: Path) -> None:
    models = server.workspace / "models"
    pickle_only_copy(tiny_model, models / "pickled", "model.safetensors", "pytorch_model.bin")
    body = {"base_model": "models/pickled", "dataset_path": "data/train.json"}
    refused = requests.post(f"{server.url}/train", json=body, timeout=30)
    assert refused.status_code == 400 and "pickle weights" in refused.json()["detail"]
    loaded = requests.post(f"{server.url}/models/load", json={"model_name": "p", "model_path": "models/pickled"},
                           timeout=60)
    assert loaded.status_code == 400 and "pickle weights" in loaded.json()["detail"]

    adapter = models / "pickled-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({}, adapter / "adapter_model.bin")
    response = requests.post(f"{server.url}/models/load", json={
        "model_name": "a", "model_path": "models/tiny", "lora_adapter": "models/pickled-adapter"}, timeout=60)
    assert response.status_code == 400 and "pickle weights are refused" in response.json()["detail"]


def test_remote_code_never_runs(server: Server, tiny_model: Path) -> None:
    MARKER.unlink(missing_ok=True)
    folder = server.workspace / "models" / "custom-code"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "evil", "architectures": ["EvilForCausalLM"],
               "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(MARKER)!r}, 'w').write('ran')\n")
    response = requests.post(f"{server.url}/models/load", json={"model_name": "e", "model_path": "models/custom-code"},
                             timeout=60)
    assert response.status_code == 400, response.text
    assert "trust_remote_code" in response.json()["detail"]
    assert not MARKER.exists()


def test_an_unknown_hub_id_offline_fails_at_once(server: Server) -> None:
    started = time.monotonic()
    response = requests.post(f"{server.url}/models/load", json={"model_name": "q", "model_path": "Org/Unknown-1B"},
                             timeout=60)
    assert response.status_code == 400 and "GPT_SERVICE_ALLOW_DOWNLOADS" in response.json()["detail"]
    trained = requests.post(f"{server.url}/train", json={"base_model": "Org/Unknown-1B",
                                                         "dataset_path": "data/train.json"}, timeout=60)
    assert trained.status_code == 400
    assert time.monotonic() - started < 10  # a hang guard: the peers retry for half a minute
