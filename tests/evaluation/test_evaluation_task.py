"""Evaluation tasks in the task runner, in this process: progress, result, cancel, failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt_service.evaluation.evaluate import evaluate_job
from gpt_service.evaluation.job import EvaluationJob
from gpt_service.tasks.leases import Lease
from gpt_service.tasks.placement import make_offer
from gpt_service.tasks.runner import run_task
from gpt_service.tasks.store import TaskStore
from tests.conftest import QA_PAIRS


@pytest.fixture
def job(eval_workspace: dict) -> EvaluationJob:
    workspace = eval_workspace["workspace"]
    return EvaluationJob(model_path=str(workspace / "models/tiny"),
                         lora_adapter=str(workspace / eval_workspace["adapter"]),
                         dataset_path=str(workspace / "data/qa.jsonl"), dtype="float32", batch_size=4, max_tokens=48)


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")


def claimed(store: TaskStore) -> Lease:
    """The next task, claimed as a worker would before starting its runner."""
    task = store.claim(make_offer("test-worker", 1), lease_seconds=60)
    assert task is not None
    return Lease(task.task_id, task.lease_token)


def test_progress_counts_every_loss_batch_and_every_answer(job: EvaluationJob) -> None:
    reports: list[tuple[int, int]] = []
    evaluate_job(job, lambda done, total: reports.append((done, total)))
    total = 2 + len(QA_PAIRS)  # two batches of four, then eight answers
    assert reports == [(step, total) for step in range(1, total + 1)]


def test_the_runner_runs_an_evaluate_task_to_its_result(job: EvaluationJob, store: TaskStore) -> None:
    store.create("t1", job.task_request(), None, kind="evaluate")
    assert run_task(store, claimed(store), 1.0) == "completed"
    task = store.get("t1")
    assert task is not None and task.status == "completed" and task.progress == 100.0
    assert task.step == task.total_steps == 2 + len(QA_PAIRS)
    assert task.result is not None and task.result["metrics"]["exact_match"] == 1.0
    assert task.request["base_model"] == job.model_path
    assert any(line.startswith("completed: loss") for line in store.log_lines("t1", None))


def test_a_cancelled_evaluate_task_stops(job: EvaluationJob, store: TaskStore) -> None:
    store.create("t2", job.task_request(), None, kind="evaluate")
    lease = claimed(store)
    store.request_cancel("t2")
    assert run_task(store, lease, 1.0) == "cancelled"
    task = store.get("t2")
    assert task is not None and task.status == "cancelled" and task.step == 1 and task.result is None


def test_a_failing_evaluate_task_says_why(job: EvaluationJob, store: TaskStore, tmp_path: Path) -> None:
    missing = job.model_copy(update={"dataset_path": str(tmp_path / "gone.jsonl")})
    store.create("t3", missing.task_request(), None, kind="evaluate")
    assert run_task(store, claimed(store), 1.0) == "failed"
    task = store.get("t3")
    assert task is not None and task.error is not None and "no such file" in task.error
