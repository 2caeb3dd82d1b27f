"""A worker that cannot see a task's files fails it at once, naming the path and itself, and never starts it."""

from __future__ import annotations

import time
from pathlib import Path

from gpt_service.settings import ServiceSettings
from gpt_service.tasks.store import TaskStore
from gpt_service.tasks.worker import Worker


def test_a_task_whose_dataset_this_worker_cannot_see_fails_with_the_path_and_the_worker(tmp_path: Path) -> None:
    settings = ServiceSettings(workspace=tmp_path, worker_name="gpu-7", lease_seconds=3, lease_renew_seconds=0.5)
    store = TaskStore(str(settings.database_url))
    missing = "/mnt/shared/data/not-mounted-here.json"
    store.create("t1", {"base_model": str(tmp_path), "dataset_path": missing, "output_dir": str(tmp_path / "out")},
                 str(tmp_path / "out"))
    worker = Worker(settings, store)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while (task := store.get("t1")) is not None and task.status in ("pending", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        worker.stop()
    assert task is not None and task.status == "failed"
    assert f"dataset_path {missing}" in task.error and "gpu-7" in task.error  # type: ignore[operator]
    assert "shared" in task.error  # type: ignore[operator]
    assert [(a.worker, a.outcome) for a in store.attempts("t1")] == [("gpu-7", "failed")]
    assert not (tmp_path / "logs" / "t1.log").exists()  # no training process was started
    store.close()
