"""Every path a request names is resolved, symlinks included, and must lie under its root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from tests.conftest import Server

pytestmark = pytest.mark.slow  # end-to-end: real servers, scripts and trainings

OUTSIDE = [
    ("/etc/passwd", 403),
    ("../outside.json", 403),
    ("data/../../outside.json", 403),
    ("%2e%2e/%2e%2e/etc/passwd", 403),
    ("data\\..\\..\\etc\\passwd", 400),
    ("data/train\x00.json", 400),
    ("data/" + "a" * 300 + ".json", 400),
]


def post(server: Server, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, timeout=30)


def train(server: Server, **fields) -> requests.Response:
    return post(server, "/train", {"base_model": "models/tiny", "dataset_path": "data/train.json", **fields})


@pytest.mark.parametrize(("raw", "code"), OUTSIDE)
@pytest.mark.parametrize("field", ["dataset_path", "eval_dataset_path", "output_dir", "base_model",
                                   "resume_from_checkpoint"])
def test_training_paths_outside_their_root_are_refused(shared_server: Server, field: str, raw: str, code: int) -> None:
    response = train(shared_server, **{field: raw})
    # A model name that is no path under models/ may still be read as a (refused) hub id: 400.
    allowed = {code, 400} if field == "base_model" else {code}
    assert response.status_code in allowed, response.text
    assert response.json()["detail"]
    assert requests.get(f"{shared_server.url}/train/history", timeout=10).json() == {"tasks": []}
    assert not (shared_server.workspace.parent / "outside.json").exists()


@pytest.mark.parametrize(("raw", "code"), OUTSIDE)
@pytest.mark.parametrize("field", ["model_path", "lora_adapter"])
def test_serving_paths_outside_their_root_are_refused(shared_server: Server, field: str, raw: str, code: int) -> None:
    body = {"model_name": "m", "model_path": "models/tiny", field: raw}
    response = post(shared_server, "/models/load", body)
    allowed = {code, 400} if field == "model_path" else {code}
    assert response.status_code in allowed, response.text
    assert requests.get(f"{shared_server.url}/models", timeout=10).json() == {"models": []}


def test_a_symlink_inside_the_root_that_points_out_is_refused(server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('[{"text": "secret"}]')
    (server.workspace / "data" / "link.json").symlink_to(secret)
    (server.workspace / "models" / "link-out").symlink_to(tmp_path)
    assert train(server, dataset_path="data/link.json").status_code == 403
    assert train(server, output_dir="models/link-out/run").status_code == 403
    assert not (tmp_path / "run").exists()
    loaded = post(server, "/models/load", {"model_name": "m", "model_path": "models/tiny",
                                           "lora_adapter": "models/link-out"})
    assert loaded.status_code == 403


def test_a_fifo_or_a_folder_as_dataset_is_refused_without_opening_it(server: Server) -> None:
    os.mkfifo(server.workspace / "data" / "pipe.json")  # opening it to read would block forever
    (server.workspace / "data" / "folder.json").mkdir()
    for name in ("pipe.json", "folder.json"):
        response = train(server, dataset_path=f"data/{name}")
        assert response.status_code == 400 and "not a regular file" in response.json()["detail"]


def test_refused_output_dirs_are_not_created(server: Server) -> None:
    for raw in ("../escape", "/tmp/gpt-service-escape", "models/../../escape2"):
        assert train(server, output_dir=raw).status_code == 403
    assert not (server.workspace.parent / "escape").exists()
    assert not Path("/tmp/gpt-service-escape").exists()


def test_url_path_tricks_find_no_task_and_no_file(server: Server) -> None:
    for path in ("/train/status/..%2f..%2fetc%2fpasswd", "/train/status/%2e%2e", "/train/..%2F..%2Fetc/logs"):
        response = requests.get(f"{server.url}{path}", timeout=10)
        assert response.status_code == 404
        assert "root:" not in response.text
