"""Worker processes and API servers on one database, on SQLite (one host) and PostgreSQL (several hosts):
a stalled worker's run is fenced off, a restarted server touches no other worker's task, a cancel
crosses processes, and a task goes only to a worker that fits it.

The cluster, per database: worker `wide` (offers two devices), worker `narrow` (one), a server
`api-1` with a built-in worker (one device), and a server with no worker.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from gpt_service.tasks.store import TaskStore
from tests.conftest import Server, make_workspace, server_environment
from tests.postgres import PostgresServer
from tests.tasks.cluster import (
    TRAINING,
    WorkerProcess,
    api_server,
    assert_never_two_at_once,
    start_workers,
    wait_until,
)

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    url: str
    workspace: Path
    store: TaskStore
    wide: WorkerProcess
    narrow: WorkerProcess
    api: Server  # with its built-in worker, `api-1`
    bare: Server  # --no-worker

    def submit(self, server: Server, name: str, **fields: object) -> str:
        body = TRAINING | {"output_dir": f"models/{name}", "num_epochs": 40} | fields
        response = requests.post(f"{server.url}/train", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert "warning" not in response.json()  # a live worker fits it
        return response.json()["task_id"]

    def status(self, task_id: str) -> dict:
        return requests.get(f"{self.bare.url}/train/status/{task_id}", timeout=10).json()

    def running_with_checkpoint(self, task_id: str, name: str) -> bool:
        status = self.status(task_id)
        assert status["status"] in ("pending", "running"), status
        return status["status"] == "running" and any((self.workspace / "models" / name).glob("checkpoint-*"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
            hub_cache: Path) -> Iterator[Cluster]:
    workspace = make_workspace(tmp_path_factory.mktemp("cluster") / "ws", tiny_model)
    env = server_environment(hub_cache, OMP_NUM_THREADS="1")  # several trainers on few cores: no spinning
    with _database(request, workspace) as url:
        store = TaskStore(url)
        wide, narrow = start_workers(store, [WorkerProcess(workspace, url, "wide", env, "--device-count", "2"),
                                             WorkerProcess(workspace, url, "narrow", env,
                                                           "--device-count", "1")])
        api = api_server(workspace, url, env, "--name", "api-1", "--device-count", "1")
        bare = api_server(workspace, url, env, "--no-worker")
        try:
            yield Cluster(url, workspace, store, wide, narrow, api, bare)
        finally:
            for process in (api, bare, wide, narrow):
                process.stop()
            store.close()


def _database(request: pytest.FixtureRequest, workspace: Path) -> AbstractContextManager[str]:
    if request.param == "sqlite":
        return nullcontext(f"sqlite:///{workspace / 'gpt_service.db'}")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.database()


def test_workers_list_every_process_and_what_it_offers(cluster: Cluster) -> None:
    workers = requests.get(f"{cluster.bare.url}/workers", timeout=10).json()["workers"]
    by_name = {w["name"]: w for w in workers}
    assert set(by_name) == {"wide", "narrow", "api-1"}
    assert by_name["wide"]["device_count"] == 2 and by_name["narrow"]["device_count"] == 1
    assert all(w["alive"] and w["device"] == "cpu" and w["heartbeat_age_seconds"] < 3 for w in workers)
    assert by_name["wide"]["pid"] == cluster.wide.process.pid  # type: ignore[union-attr]
    health = requests.get(f"{cluster.bare.url}/health", timeout=10).json()
    assert health["worker"] is None and health["worker_alive"] is None
    assert requests.get(f"{cluster.api.url}/health", timeout=10).json()["worker"] == "api-1"


def test_a_placement_out_of_range_is_refused_with_the_field_named(cluster: Cluster) -> None:
    for fields, words in (({"num_processes": 0}, "num_processes"), ({"device": "tpu"}, "device"),
                          ({"min_memory_gb": -1}, "min_memory_gb")):
        response = requests.post(f"{cluster.bare.url}/train", json=TRAINING | fields, timeout=10)
        assert response.status_code == 422 and words in response.text, response.text
    assert requests.get(f"{cluster.bare.url}/train/history", params={"status": "pending"}, timeout=10).json() == {
        "tasks": []}


def test_a_task_no_live_worker_fits_is_queued_with_a_warning(cluster: Cluster) -> None:
    response = requests.post(f"{cluster.bare.url}/train", json=TRAINING | {"device": "cuda", "num_processes": 2,
                                                                          "output_dir": "models/on-gpus"}, timeout=10)
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "pending" and "no live worker offers 2 cuda devices" in answer["warning"]
    status = cluster.status(answer["task_id"])
    assert status["status"] == "pending" and status["needs"] == {"device": "cuda", "num_processes": 2,
                                                                 "min_memory_gb": None}
    cancelled = requests.post(f"{cluster.bare.url}/train/{answer['task_id']}/cancel", timeout=10).json()
    assert cancelled["status"] == "cancelled" and cluster.store.attempts(answer["task_id"]) == []


def test_restarting_an_api_server_leaves_other_workers_running_tasks_untouched(cluster: Cluster) -> None:
    task_id = cluster.submit(cluster.api, "restart", num_processes=2)  # only `wide` offers two devices
    wait_until(lambda: cluster.running_with_checkpoint(task_id, "restart"), what="the training to run")
    before = cluster.store.get(task_id)
    assert before is not None and before.leased_by == "wide"

    cluster.api.kill()
    cluster.api = cluster.api.start()  # the same name (`api-1`): it recovers only what `api-1` held
    api_worker_back = [w for w in cluster.store.workers()[0] if w.name == "api-1"]
    assert api_worker_back and api_worker_back[0].pid == cluster.api.process.pid  # type: ignore[union-attr]

    final = cluster.api.wait_for(task_id, ("completed", "failed", "cancelled"), timeout=180)
    assert final["status"] == "completed", final["error"]
    assert final["attempts"] == 1 and final["worker"] == "wide" and final["reclaims"] == 0
    assert [a.worker for a in cluster.store.attempts(task_id)] == ["wide"]


def test_a_cancel_sent_to_one_server_stops_a_task_on_a_worker_elsewhere(cluster: Cluster) -> None:
    task_id = cluster.submit(cluster.bare, "cancelled", num_processes=2, num_epochs=400)
    wait_until(lambda: cluster.running_with_checkpoint(task_id, "cancelled"), what="the training to run")
    assert cluster.store.get(task_id).leased_by == "wide"  # type: ignore[union-attr]
    answer = requests.post(f"{cluster.api.url}/train/{task_id}/cancel", timeout=10).json()
    assert answer["cancel_requested"] is True
    final = cluster.bare.wait_for(task_id, ("completed", "failed", "cancelled"), timeout=60)
    assert final["status"] == "cancelled" and final["current_step"] < final["total_steps"]
    assert [(a.worker, a.outcome) for a in cluster.store.attempts(task_id)] == [("wide", "cancelled")]


def test_a_stalled_worker_is_fenced_off_and_its_task_finishes_elsewhere(cluster: Cluster) -> None:
    task_id = cluster.submit(cluster.bare, "stalled", num_epochs=60)
    wait_until(lambda: cluster.running_with_checkpoint(task_id, "stalled"), what="the training to run")
    held = cluster.store.get(task_id)
    assert held is not None and held.pid
    holder = {"wide": cluster.wide, "narrow": cluster.narrow}.get(held.leased_by)  # type: ignore[arg-type]
    # `api-1` may have taken it: then the server's process is stalled, built-in worker and all.
    holder_pid = (holder or cluster.api).process.pid  # type: ignore[union-attr]
    os.kill(holder_pid, signal.SIGSTOP)
    try:
        wait_until(lambda: len(cluster.store.attempts(task_id)) == 2, 60, "the task to be claimed again")
        taken = cluster.store.get(task_id)
        assert taken is not None and taken.leased_by != held.leased_by and taken.lease_token == 2
    finally:
        os.kill(holder_pid, signal.SIGCONT)
    final = cluster.bare.wait_for(task_id, ("completed", "failed", "cancelled"), timeout=180)
    assert final["status"] == "completed", final["error"]
    wait_until(lambda: not _alive(held.pid), 30, "the stale run to end")  # type: ignore[arg-type]
    attempts = cluster.store.attempts(task_id)
    assert [(a.worker, a.outcome) for a in attempts] == [(held.leased_by, "lease expired"),
                                                          (final["worker"], "completed")]
    assert_never_two_at_once(attempts)
    logs = requests.get(f"{cluster.bare.url}/train/{task_id}/logs", params={"all": True}, timeout=10).json()["lines"]
    stale_lines = [i for i, line in enumerate(logs) if f"pid {held.pid}" in line]
    resumed = [i for i, line in enumerate(logs) if "attempt 2" in line]
    assert stale_lines and resumed and max(stale_lines) < resumed[0]
    stale_log = (cluster.workspace / "logs" / f"{task_id}.log").read_text()
    assert "lease 1 lost" in stale_log  # the run saw its lease end and stopped, writing nothing more
    holder_log = holder.log() if holder else (cluster.workspace / f"server-{cluster.api.port}.log").read_text()
    assert f"task {task_id}: lease 1 lost" in holder_log  # and its worker, on waking, let it go


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()
