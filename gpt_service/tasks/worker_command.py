"""`gpt-service worker`: a worker without HTTP, taking tasks from a task database shared by any number of them.

    gpt-service worker --database-url postgresql+psycopg://USER:PASSWORD@HOST/DB --name gpu-1

Runs until SIGTERM or SIGINT, then gives its running tasks back to the queue. The flags below are
shared with `gpt-service serve`, whose built-in worker takes the same ones.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import signal
import sys
import threading
from typing import Any

from gpt_service.errors import UserError
from gpt_service.settings import ServiceSettings, load_settings


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", help="folder holding data/, models/ and the task database (default: .)")
    parser.add_argument("--database-url", help="SQLAlchemy URL of the task store (default: SQLite in the "
                        "workspace); postgresql+psycopg://... for workers on several machines")
    parser.add_argument("--max-concurrent-tasks", type=int, help="trainings run at once by this worker (default 1)")
    parser.add_argument("--allow-downloads", action="store_true", default=None, help="fetch hub ids not cached")
    parser.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object a line")
    parser.add_argument("--name", help="this worker's name, unique per database (default: the host name, or "
                        "host-pid when another worker here has it)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="device kind offered (default: found)")
    parser.add_argument("--device-count", type=int, help="devices offered (default: found)")
    parser.add_argument("--memory-gb", type=float, help="memory per device offered (default: found)")
    parser.add_argument("--lease-seconds", type=float, help="lease of a claimed task (default 60)")
    parser.add_argument("--lease-renew-seconds", type=float, help="how often leases are renewed (default 10)")


def settings_from(args: argparse.Namespace, **more: Any) -> ServiceSettings:
    return load_settings(
        workspace=args.workspace, database_url=args.database_url, max_concurrent_tasks=args.max_concurrent_tasks,
        allow_downloads=args.allow_downloads, log_format=args.log_format, worker_name=args.name,
        worker_device=args.device, worker_device_count=args.device_count, worker_memory_gb=args.memory_gb,
        lease_seconds=args.lease_seconds, lease_renew_seconds=args.lease_renew_seconds, **more,
    )


def checked_settings(args: argparse.Namespace, **more: Any) -> ServiceSettings | None:
    """`settings_from`, or None after printing what is wrong with them (the command then exits with 2)."""
    from pydantic import ValidationError

    try:
        return settings_from(args, **more)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def worker_command(args: argparse.Namespace) -> int:
    from gpt_service.logs import logging_config
    from gpt_service.tasks.store import TaskStore
    from gpt_service.tasks.worker import Worker

    settings = checked_settings(args)
    if settings is None:
        return 2
    logging.config.dictConfig(logging_config(settings.log_format == "json"))
    logging.getLogger("gpt_service").setLevel(logging.INFO)
    store = TaskStore(str(settings.database_url), settings.log_tail_lines)
    worker = Worker(settings, store)
    try:
        worker.start()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1) and worker.alive:
        pass
    worker.stop()
    store.close()
    return 0
