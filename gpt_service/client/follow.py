"""Follow a task on the service with a live progress bar (steps, loss, tokens/s, ETA) on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from gpt_service.client.errors import EXIT_BY_STATUS
from gpt_service.client.http import ApiClient
from gpt_service.client.render import figures

POLL_SECONDS = 0.5
FINISHED = tuple(EXIT_BY_STATUS)


def follow(api: ApiClient, task_id: str, interval: float = POLL_SECONDS) -> dict[str, Any]:
    """Poll the task until it is completed, failed or cancelled; return its last status.

    Each change of status is printed as its own line, so a log of a run without a terminal shows
    them too; the bar itself is drawn live on a terminal and once, at the end, elsewhere.
    """
    console = Console(stderr=True)
    columns = (TextColumn("[bold]{task.fields[state]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[figures]}"))
    with Progress(*columns, console=console) as bar:
        row = bar.add_task(task_id, total=None, state="", figures="")
        last = None
        while True:
            task = api.call("GET", f"/train/status/{task_id}")
            if task["status"] != last:
                last = task["status"]
                bar.console.print(f"task {task_id} {last}", markup=False, highlight=False)
            bar.update(row, completed=task.get("current_step") or 0, total=task.get("total_steps"),
                       state=task.get("kind") or "train", figures=figures(task))
            if task["status"] in FINISHED:
                return task
            time.sleep(interval)


def report_end(task: dict[str, Any]) -> int:
    """Say on stderr how a followed task that did not complete ended; its exit code."""
    if task["status"] == "failed":
        print(f"error: task {task['task_id']} failed: {task.get('error') or 'no reason recorded'}", file=sys.stderr)
    elif task["status"] == "cancelled":
        print(f"task {task['task_id']} was cancelled; `gpt-service resume {task['task_id']}` continues it from its "
              "newest checkpoint", file=sys.stderr)
    return EXIT_BY_STATUS[task["status"]]
