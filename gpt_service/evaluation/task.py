"""Run one evaluation task in the task runner's child process (`tasks.runner` dispatches here on kind)."""

from __future__ import annotations

import os
import time
import traceback

from gpt_service.evaluation.evaluate import EvaluationStopped, evaluate_job
from gpt_service.evaluation.job import EvaluationJob
from gpt_service.tasks.runner import FLUSH_SECONDS, StoreReporter, describe_failure
from gpt_service.tasks.store import Task


def run_evaluation_task(reporter: StoreReporter, task: Task) -> str:
    """Evaluate the task's job, reporting progress through `reporter` (its lease); record and return the status."""
    job = EvaluationJob.model_validate(task.request)
    reporter.lines.append(f"evaluation started (attempt {task.attempts}, pid {os.getpid()})")

    def on_progress(done: int, total: int) -> None:
        reporter.figures = {"progress": 100.0 * done / total, "step": done, "total_steps": total}
        if time.monotonic() - reporter.last_flush >= FLUSH_SECONDS or done == total:
            reporter.flush()

    try:
        result = evaluate_job(job, on_progress, reporter.should_stop)
    except EvaluationStopped:
        reporter.lines.append("cancelled")
        reporter.finish("cancelled")
        return "cancelled"
    except BaseException as exc:
        reporter.lines.append("".join(traceback.format_exception(exc)).rstrip())
        reporter.finish("failed", error=describe_failure(exc))
        return "failed"
    figures = result["metrics"]
    reporter.lines.append(f"completed: loss {figures['loss']:.4f} over {result['tokens']} tokens "
                          f"of {result['samples']} samples")
    reporter.finish("completed", progress=100.0, result=result)
    return "completed"
