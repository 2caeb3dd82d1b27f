"""Claims, leases, fencing, reclaim and placement on a real SQLite file and a real PostgreSQL database."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from gpt_service.tasks.leases import Lease, WorkerNameInUse
from gpt_service.tasks.placement import TaskNeeds, WorkerOffer
from gpt_service.tasks.store import TaskStore

REQUEST = {"base_model": "models/tiny", "dataset_path": "data/train.json"}


def offer(name: str = "w1", device: str = "cpu", device_count: int = 1, memory_mb: int = 16_000,
          pid: int = 1) -> WorkerOffer:
    return WorkerOffer(name=name, host="host-a", pid=pid, device=device, device_count=device_count,
                       memory_mb=memory_mb, max_tasks=1)


@pytest.fixture
def store(database_url: str) -> Iterator[TaskStore]:
    store = TaskStore(database_url)
    yield store
    store.close()


def claim(store: TaskStore, worker: WorkerOffer | None = None, lease_seconds: float = 60) -> Lease:
    task = store.claim(worker or offer(), lease_seconds)
    assert task is not None
    return Lease(task.task_id, task.lease_token)


def reclaim_when_expired(store: TaskStore, max_reclaims: int = 3) -> list[tuple[str, str]]:
    deadline = time.monotonic() + 15
    while not (done := store.reclaim_expired(max_reclaims)):
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.1)
    return done


def test_claims_take_the_oldest_task_once_each_with_a_lease_and_an_attempt(store: TaskStore) -> None:
    for task_id in ("t1", "t2"):
        store.create(task_id, REQUEST, None)
    first, second = claim(store, offer("a")), claim(store, offer("b"))
    assert (first, second) == (Lease("t1", 1), Lease("t2", 1))
    assert store.claim(offer("c"), 60) is None
    task = store.get("t1")
    assert task is not None and task.status == "running" and task.leased_by == "a" and task.attempts == 1
    assert task.lease_expires_at is not None
    assert [(a.task_id, a.lease_token, a.worker, a.outcome) for a in store.attempts()] == [
        ("t1", 1, "a", None), ("t2", 1, "b", None)]


def test_a_stale_run_writes_nothing_once_its_task_is_reclaimed(store: TaskStore) -> None:
    store.create("t1", REQUEST, None)
    stale = claim(store, lease_seconds=0.3)
    assert store.record_progress(stale, {"step": 1, "progress": 10.0}, [{"step": 1, "loss": 2.0}], ["step 1"])
    assert reclaim_when_expired(store) == [("t1", "pending")]
    fresh = claim(store, offer("w2"))
    assert fresh == Lease("t1", 2)

    assert store.renew(stale, 60) is None
    assert not store.record_progress(stale, {"step": 9, "progress": 90.0}, [{"step": 9, "loss": 0.1}], ["stale"])
    assert not store.set_pid(stale, 4242)
    assert not store.finish(stale, "completed", progress=100.0)
    assert store.lease_state(stale, 0) == "lost"
    task = store.get("t1")
    assert task is not None and (task.status, task.step, task.progress, task.pid) == ("running", 1, 10.0, None)
    assert task.leased_by == "w2" and task.resume and task.reclaims == 1
    assert "stale" not in store.log_lines("t1", None) and [p["step"] for p in store.metrics("t1")] == [1]
    assert any("expired" in line for line in store.log_lines("t1", None))

    assert store.renew(fresh, 60) is False
    assert store.record_progress(fresh, {"step": 2}, [], [])
    assert store.finish(fresh, "completed", progress=100.0)
    assert not store.finish(fresh, "failed", error="a second verdict")
    assert [(a.lease_token, a.worker, a.outcome) for a in store.attempts("t1")] == [
        (1, "w1", "lease expired"), (2, "w2", "completed")]


def test_renewal_keeps_a_lease_and_carries_a_cancel(store: TaskStore) -> None:
    store.create("t1", REQUEST, None)
    lease = claim(store, lease_seconds=60)
    assert store.renew(lease, 60) is False
    assert store.lease_state(lease, margin_seconds=1) == "ok"
    assert store.lease_state(lease, margin_seconds=120) == "lost"  # ends within the margin: the run stops
    store.request_cancel("t1")
    assert store.renew(lease, 60) is True
    assert store.lease_state(lease, margin_seconds=1) == "cancel"


def test_an_expired_lease_is_lost_even_before_anyone_reclaims_it(store: TaskStore) -> None:
    store.create("t1", REQUEST, None)
    lease = claim(store, lease_seconds=0.2)
    deadline = time.monotonic() + 10
    while store.lease_state(lease, 0) != "lost":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert store.renew(lease, 60) is None


def test_after_max_reclaims_the_task_fails_with_the_reason(store: TaskStore) -> None:
    store.create("t1", REQUEST, None)
    for _ in range(2):
        claim(store, lease_seconds=0.2)
        assert reclaim_when_expired(store, max_reclaims=2) == [("t1", "pending")]
    claim(store, offer("last-one"), lease_seconds=0.2)
    assert reclaim_when_expired(store, max_reclaims=2) == [("t1", "failed")]
    task = store.get("t1")
    assert task is not None and task.status == "failed" and "last-one" in (task.error or "")
    assert "reclaimed 2 times" in (task.error or "")
    assert store.claim(offer(), 60) is None


def test_only_a_worker_that_fits_claims_a_task(store: TaskStore) -> None:
    store.create("gpu", REQUEST, None, needs=TaskNeeds(device="cuda").columns())
    store.create("two", REQUEST, None, needs=TaskNeeds(num_processes=2).columns())
    store.create("big", REQUEST, None, needs=TaskNeeds(min_memory_gb=64).columns())
    small_cpu = offer("cpu-1")
    assert store.claim(small_cpu, 60) is None
    assert claim(store, offer("gpu-1", device="cuda", device_count=1)).task_id == "gpu"
    assert claim(store, offer("cpu-2", device_count=2)).task_id == "two"
    assert claim(store, offer("cpu-3", memory_mb=80_000)).task_id == "big"


def test_a_worker_name_is_refused_while_another_live_worker_has_it(store: TaskStore) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "gpt_service-test-worker"])
    try:
        store.register_worker(offer("gpu-1", pid=other.pid), lease_seconds=60)
        with pytest.raises(WorkerNameInUse, match="gpu-1"):
            store.register_worker(offer("gpu-1", pid=other.pid + 1), lease_seconds=60)
        store.register_worker(offer("gpu-2", pid=other.pid + 1), lease_seconds=60)
    finally:
        other.kill()
        other.wait()
    store.register_worker(offer("gpu-1", pid=other.pid + 1), lease_seconds=60)  # its old run is gone: taken over
    records, _, _ = store.workers()
    assert [(r.name, r.pid) for r in records] == [("gpu-1", other.pid + 1), ("gpu-2", other.pid + 1)]


def test_a_resumed_run_s_points_replace_the_lost_attempt_s_past_its_checkpoint(store: TaskStore) -> None:
    store.create("t1", REQUEST, None)
    lost = claim(store, lease_seconds=0.3)
    assert store.record_progress(lost, {"step": 5}, [{"step": s, "loss": 2.0} for s in range(1, 6)] + [
        {"step": 5, "eval_loss": 1.5}], [])
    assert reclaim_when_expired(store) == [("t1", "pending")]
    resumed = claim(store, offer("w2"))  # from the step-3 checkpoint
    assert store.record_progress(resumed, {"step": 6}, [{"step": s, "loss": 1.0} for s in (4, 5, 6)] + [
        {"step": 6, "eval_loss": 0.9}], [])
    points = store.metrics("t1")
    assert [(p["step"], p["loss"], p["eval_loss"]) for p in points] == [
        (1, 2.0, None), (2, 2.0, None), (3, 2.0, None), (4, 1.0, None), (5, 1.0, None), (6, 1.0, None), (6, None, 0.9)]
