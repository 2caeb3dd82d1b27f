"""Three worker processes and two API servers on one PostgreSQL run 12 tiny trainings; one worker is killed
with SIGKILL mid-training. Its task is reclaimed once the lease expires and finishes on another worker from
its newest checkpoint, with the adapter of an uninterrupted run; all 12 complete, none ever ran twice at once.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from gpt_service.tasks.leases import as_utc
from gpt_service.tasks.store import TaskStore
from tests.conftest import make_workspace, server_environment
from tests.tasks.cluster import TRAINING, WorkerProcess, api_server, assert_never_two_at_once, start_workers, wait_until

TASKS = 12
LONG = 2  # the first two run long enough to be caught mid-training; the other ten are short


def adapter(workspace: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(workspace / "models" / name / "lora_adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_a_killed_workers_task_is_reclaimed_and_resumed_elsewhere(postgres_url: str, tmp_path: Path,
                                                                   tiny_model: Path, hub_cache: Path) -> None:
    workspace = make_workspace(tmp_path / "ws", tiny_model)
    env = server_environment(hub_cache, OMP_NUM_THREADS="1")
    store = TaskStore(postgres_url)
    workers = start_workers(store, [WorkerProcess(workspace, postgres_url, f"gpu-{i}", env) for i in range(3)])
    servers = [api_server(workspace, postgres_url, env, "--no-worker") for _ in range(2)]
    try:
        ids = []
        for i, server in zip(range(TASKS), itertools.cycle(servers), strict=False):
            body = TRAINING | {"output_dir": f"models/run-{i}", "num_epochs": 30 if i < LONG else 6}
            response = requests.post(f"{server.url}/train", json=body, timeout=30)
            assert response.status_code == 200, response.text
            ids.append(response.json()["task_id"])

        def mid_training() -> str | None:
            for task in store.with_status("running"):
                if task.task_id not in ids[:LONG]:
                    continue
                checkpoints = list(Path(task.output_dir).glob("checkpoint-*"))  # type: ignore[arg-type]
                if checkpoints and task.total_steps and task.step < task.total_steps - 40:
                    return task.task_id
            return None

        wait_until(mid_training, 120, "a training past its first checkpoint")
        victim_id = mid_training()
        victim = store.get(victim_id)  # type: ignore[arg-type]
        assert victim is not None
        killed = next(w for w in workers if w.name == victim.leased_by)
        killed.kill()
        killed_at = time.time()
        newest = max(int(p.name.split("-")[1]) for p in Path(victim.output_dir).glob("checkpoint-*"))  # type: ignore[arg-type]

        finals = [servers[i % 2].wait_for(task_id, ("completed", "failed", "cancelled"), timeout=300)
                  for i, task_id in enumerate(ids)]
        attempts = {task_id: store.attempts(task_id) for task_id in ids}
        victim_log = store.log_lines(victim.task_id, None)
        survivors_alive = all(w.process.poll() is None for w in workers if w is not killed)  # type: ignore[union-attr]
    finally:
        for process in (*servers, *workers):
            process.stop()
        store.close()

    assert survivors_alive
    assert [f["status"] for f in finals] == ["completed"] * TASKS, [f["error"] for f in finals]
    for task_attempts in attempts.values():
        assert_never_two_at_once(task_attempts)
    first, second = attempts[victim.task_id]
    assert (first.worker, first.outcome) == (killed.name, "lease expired")
    assert second.worker != killed.name and second.outcome == "completed"
    others = [a for task_id, found in attempts.items() if task_id != victim.task_id for a in found]
    assert len(others) == TASKS - 1 and all(a.outcome == "completed" for a in others)
    victim_final = finals[ids.index(victim.task_id)]
    assert victim_final["reclaims"] == 1 and victim_final["attempts"] == 2

    assert any("expired" in line and killed.name in line for line in victim_log)
    assert any("attempt 2" in line and "resuming from the newest checkpoint" in line for line in victim_log)
    victim_name = Path(victim.output_dir).name  # type: ignore[arg-type]
    reference_name = next(Path(f["output_dir"]).name for f in finals[:LONG] if f["task_id"] != victim.task_id)
    expected, actual = adapter(workspace, reference_name), adapter(workspace, victim_name)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5)
    reclaimed = as_utc(first.ended_at).timestamp() - killed_at  # type: ignore[union-attr]
    claimed = as_utc(second.claimed_at).timestamp() - killed_at  # type: ignore[union-attr]
    print(f"\nkill -9 of worker {killed.name}: task {victim.task_id} of {victim.total_steps} steps, newest checkpoint "
          f"at step {newest}, "
          f"back in the queue {reclaimed:.1f} s later (lease 3 s, renewal 0.5 s), claimed by {second.worker} after "
          f"{claimed:.1f} s; "
          f"{TASKS} tasks, {sum(len(a) for a in attempts.values())} claims, duplicates at once = 0")
