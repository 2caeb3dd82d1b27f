"""The console's page and assets (open, even with a key) and the lists its forms read (behind the key)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gpt_service.api.app import create_app
from gpt_service.api.routes.console import CONSOLE_DIR
from gpt_service.settings import ServiceSettings

KEY = "console-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def root(tmp_path: Path, tiny_model: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "data" / "sub").mkdir(parents=True)
    (ws / "data" / "train.json").write_text("[]")
    (ws / "data" / "sub" / "more.jsonl").write_text("")
    (ws / "data" / "notes.txt").write_text("a\n")
    (ws / "data" / "image.png").write_bytes(b"")
    (ws / "data" / ".hidden.json").write_text("[]")
    outside = tmp_path / "outside"
    (outside / "model").mkdir(parents=True)
    (outside / "secret.json").write_text("[]")
    (outside / "model" / "config.json").write_text("{}")
    (ws / "data" / "link.json").symlink_to(outside / "secret.json")
    (ws / "data" / "linked-dir").symlink_to(outside)
    models = ws / "models"
    shutil.copytree(tiny_model, models / "tiny")
    adapter = models / "checkpoints" / "run" / "lora_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/tiny"}))
    (models / "checkpoints" / "run" / "checkpoint-10").mkdir()
    (models / "checkpoints" / "run" / "checkpoint-10" / "adapter_config.json").write_text("not json")
    (models / "elsewhere").symlink_to(outside / "model")
    return ws


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    app = create_app(ServiceSettings(workspace=root, api_key=KEY), run_worker=False)
    with TestClient(app) as test_client:
        yield test_client


def test_the_page_and_its_assets_need_no_key(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/console/app.js" in page.text and "/console/style.css" in page.text
    for name in ("app.js", "style.css", "favicon.svg"):
        asset = client.get(f"/console/{name}")
        assert asset.status_code == 200, name
        assert asset.content == (CONSOLE_DIR / name).read_bytes()
    assert client.get("/console/missing.js").status_code == 404


def test_data_stays_behind_the_key(client: TestClient) -> None:
    for path in ("/files/datasets", "/files/models", "/train/history", "/train/x/config", "/console/../train/history",
                 "/consolefoo"):
        response = client.get(path)
        assert response.status_code in (401, 404), path
        assert "tasks" not in response.text
    assert client.get("/files/datasets").status_code == 401


def test_datasets_lists_data_files_inside_the_root(client: TestClient) -> None:
    listing = client.get("/files/datasets", headers=AUTH).json()
    assert listing["root"] == "data"
    assert [(d["path"], d["format"]) for d in listing["datasets"]] == [
        ("data/notes.txt", "txt"), ("data/train.json", "json"), ("data/sub/more.jsonl", "jsonl")]
    assert listing["truncated"] is False


def test_models_lists_model_folders_and_adapters_inside_the_root(client: TestClient) -> None:
    listing = client.get("/files/models", headers=AUTH).json()
    assert listing["models"] == [{"path": "models/tiny"}]
    assert listing["adapters"] == [
        {"path": "models/checkpoints/run/checkpoint-10", "base_model": None, "checkpoint": True},
        {"path": "models/checkpoints/run/lora_adapter", "base_model": "models/tiny", "checkpoint": False},
    ]


def test_a_tasks_config_is_its_full_request(client: TestClient) -> None:
    body = {"base_model": "models/tiny", "dataset_path": "data/train.json", "num_epochs": 2}
    task_id = client.post("/train", json=body, headers=AUTH).json()["task_id"]
    answer = client.get(f"/train/{task_id}/config", headers=AUTH).json()
    assert answer["kind"] == "train"
    assert answer["config"]["num_epochs"] == 2 and answer["config"]["lora_config"]["r"] == 16
    assert client.get("/train/nope/config", headers=AUTH).status_code == 404
