"""Run one training task in this process, reporting to the task store under the lease its worker took.

    GPT_SERVICE_DATABASE_URL=sqlite:///gpt_service.db python -m gpt_service.tasks.runner TASK_ID \
        --lease-token N --lease-margin SECONDS

Started by the worker, one process per task, so that a crash, an out-of-memory or a kill ends
this process and never the server. The process dies with the worker that started it. Every write
is fenced by the lease token; a run that finds its lease gone, or ending within the margin (its
worker stalled), exits at once with LEASE_LOST_EXIT and writes nothing more.

A training with `num_processes` above 1 makes this process a torchrun launcher: it runs this
module again once per rank, with the same lease (each rank dying with the launcher, which dies
with the worker). Rank 0 reports to the store and reads the cancel flag for all; when a rank dies,
torchrun restarts the group (`max_restarts`) or the launcher fails the task naming the rank and
how it died.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
import traceback
from typing import Any

from gpt_service.config import TrainConfig
from gpt_service.errors import UserError
from gpt_service.tasks.leases import LEASE_LOST_EXIT, Lease
from gpt_service.tasks.store import TaskStore
from gpt_service.training import launch
from gpt_service.training.launch import die_with_parent
from gpt_service.training.progress import TrainingProgress
from gpt_service.training.recipe import run_lora_finetune

FLUSH_SECONDS = 0.5  # the longest a progress figure waits before it reaches the store
CANCEL_POLL_SECONDS = 0.5


class StoreReporter(logging.Handler):
    """Progress callback, stop check and log handler of one task, batched into few transactions."""

    def __init__(self, store: TaskStore, lease: Lease, lease_margin: float) -> None:
        super().__init__(level=logging.INFO)
        self.store, self.lease, self.lease_margin = store, lease, lease_margin
        self.figures: dict[str, Any] = {}
        self.points: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.last_flush = self.last_poll = 0.0
        self.stop = False

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")

    def on_progress(self, progress: TrainingProgress) -> None:
        self.figures = {**progress.as_dict()}
        self.points.append({"step": progress.step, "epoch": progress.epoch, "loss": progress.loss,
                            "eval_loss": progress.eval_loss if progress.evaluated else None,
                            "learning_rate": progress.learning_rate})
        if progress.message:
            self.lines.append(progress.message)
        if time.monotonic() - self.last_flush >= FLUSH_SECONDS or progress.step == progress.total_steps:
            self.flush()

    def flush(self) -> None:
        if (self.figures or self.points or self.lines) and not self.store.record_progress(
                self.lease, self.figures, self.points, self.lines):
            self.lease_lost()
        self.figures, self.points, self.lines = {}, [], []
        self.last_flush = time.monotonic()

    def should_stop(self) -> bool:
        if not self.stop and time.monotonic() - self.last_poll >= CANCEL_POLL_SECONDS:
            state = self.store.lease_state(self.lease, self.lease_margin)
            if state == "lost":
                self.lease_lost()
            self.stop = state == "cancel"
            self.last_poll = time.monotonic()
        return self.stop

    def finish(self, status: str, **fields: Any) -> None:
        """The run's verdict, after its last report; a verdict refused means the lease was lost."""
        self.flush()
        if not self.store.finish(self.lease, status, **fields):
            self.lease_lost()

    def lease_lost(self) -> None:
        print(f"task {self.lease.task_id}: lease {self.lease.token} lost (this run's worker stalled or the task "
              f"was taken again); process {os.getpid()} stops without writing more", file=sys.stderr, flush=True)
        os._exit(LEASE_LOST_EXIT)


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return f"out of memory: {exc}".rstrip(": ")
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left" in str(exc).lower():
        return f"no space left on device: {exc}"
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_task(store: TaskStore, lease: Lease, lease_margin: float, rank_args: list[str] | None = None) -> str:
    """Run the task (a training, or an evaluation by its kind); record and return its final status.

    `rank_args`: this module's arguments, for the ranks of a training on several processes."""
    task = store.get(lease.task_id)
    if task is None:
        raise SystemExit(f"no task {lease.task_id}")
    reporter = StoreReporter(store, lease, lease_margin)
    if task.kind == "evaluate":
        from gpt_service.evaluation.task import run_evaluation_task

        return run_evaluation_task(reporter, task)
    config = TrainConfig.model_validate(task.request)
    if task.resume:
        config = config.model_copy(update={"resume_from_checkpoint": "latest"})
    if config.num_processes > 1 and not launch.is_rank():
        return launch_ranks(reporter, config, rank_args or [])
    if launch.rank() != 0:  # rank 0 reports and heeds cancels for the group; this one trains its share
        run_lora_finetune(config)
        return "completed"
    logging.getLogger("gpt_service").addHandler(reporter)
    logging.getLogger("gpt_service").setLevel(logging.INFO)
    reporter.lines.append(f"training started (attempt {task.attempts}, pid {os.getpid()})"
                          + (", resuming from the newest checkpoint" if task.resume else ""))
    try:
        result = run_lora_finetune(config, reporter.on_progress, reporter.should_stop)
    except BaseException as exc:
        reporter.lines.append("".join(traceback.format_exception(exc)).rstrip())
        if launch.is_rank() and launch.restarts_left() > 0:
            reporter.lines.append(f"this attempt failed ({describe_failure(exc)}); torchrun restarts the processes")
            reporter.flush()
            raise
        if launch.is_rank() and not isinstance(exc, UserError):
            # Often only the echo of another rank's death (a closed connection): the launcher, which sees
            # every rank's end, gives the verdict.
            reporter.flush()
            raise
        reporter.finish("failed", error=describe_failure(exc))
        return "failed"
    reporter.lines.append("cancelled" if result.stopped else f"completed: adapter saved to {result.adapter_dir}")
    if result.stopped:
        reporter.finish("cancelled")
        return "cancelled"
    reporter.finish("completed", adapter_path=result.adapter_dir, progress=100.0,
                 result={"final_loss": result.final_loss, "final_eval_loss": result.final_eval_loss,
                         "train_samples": result.train_samples, "eval_samples": result.eval_samples,
                         "truncated_samples": result.truncated_samples, "global_step": result.global_step})
    return "completed"


def launch_ranks(reporter: StoreReporter, config: TrainConfig, rank_args: list[str]) -> str:
    """Run the task's ranks under torchrun from this process; fail the task if they end without a verdict."""
    options = launch.LaunchOptions(nproc_per_node=config.num_processes, max_restarts=config.max_restarts)
    try:
        import torch

        options.check(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except UserError as exc:
        reporter.finish("failed", error=str(exc))
        return "failed"
    reporter.lines.append(f"launching {config.num_processes} training processes under torchrun "
                          f"({config.distributed or 'ddp'}, at most {config.max_restarts} restart(s))")
    reporter.flush()
    code, failure = launch.run_torchrun(options, "gpt_service.tasks.runner", rank_args)
    store, lease = reporter.store, reporter.lease
    if code == 0:
        task = store.get(lease.task_id)
        return task.status if task else "failed"
    error = f"a training process failed: {failure}"
    if store.finish(lease, "failed", error=error):  # unless a rank gave the verdict first
        store.append_log(lease.task_id, error)
    return "failed"


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m gpt_service.tasks.runner")
    parser.add_argument("task_id")
    parser.add_argument("--lease-token", type=int, required=True, help="the fencing token of this run's claim")
    parser.add_argument("--lease-margin", type=float, required=True,
                        help="stop when the lease ends within this many seconds unrenewed")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    store = TaskStore(os.environ["GPT_SERVICE_DATABASE_URL"])
    run = run_task
    if launch.is_rank():  # a rank's exception reaches torchrun's launcher in an error file, by name
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(run_task)
    status = run(store, Lease(args.task_id, args.lease_token), args.lease_margin, raw)
    store.close()
    return 0 if status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
