"""Eight `gpt-service worker` processes race for 200 no-op tasks: each is claimed and completed exactly once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from gpt_service.tasks.store import TaskStore
from tests.tasks.cluster import WorkerProcess, attempts_by_task, start_workers, wait_until

WORKERS = 8
TASKS = 200


@pytest.mark.slow
def test_eight_workers_claim_each_of_200_tasks_exactly_once(database_url: str, tmp_path: Path,
                                                             server_env: dict[str, str]) -> None:
    store = TaskStore(database_url)
    workers = [WorkerProcess(tmp_path, database_url, f"racer-{i}", server_env) for i in range(WORKERS)]
    try:
        start_workers(store, workers)
        started = time.monotonic()
        for i in range(TASKS):  # submitted while all eight are polling
            store.create(f"probe-{i:03d}", {"probe": i}, None, kind="probe")
        wait_until(lambda: store.count_by_status().get("completed", 0) == TASKS, 120, "all probes to complete")
        elapsed = time.monotonic() - started
        attempts = attempts_by_task(store)
    finally:
        for worker in workers:
            worker.stop()
    claims = [a for found in attempts.values() for a in found]
    assert sorted(attempts) == [f"probe-{i:03d}" for i in range(TASKS)]
    duplicates = sum(len(found) - 1 for found in attempts.values())
    assert duplicates == 0 and len(claims) == TASKS
    assert all(a.outcome == "completed" and a.lease_token == 1 for a in claims)
    for task in store.list(limit=TASKS):
        assert (task.status, task.attempts, task.result) == ("completed", 1, {"worker": task.leased_by})
    by_worker = Counter(a.worker for a in claims)
    assert len(by_worker) >= 2, f"one worker took every task: {by_worker}"
    print(f"\nclaim race on {store.engine.dialect.name}: {TASKS} tasks, {len(claims)} claims, {duplicates} duplicates, "
          f"{WORKERS} workers ({dict(sorted(by_worker.items()))}), {elapsed:.1f} s")
    store.close()
