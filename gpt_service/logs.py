"""Log formats: plain lines, or one JSON object a line (`--log-format json`), for the server and the worker alike."""

from __future__ import annotations

import json
import logging
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(json_lines: bool) -> dict[str, Any]:
    """A `logging.config` dict for uvicorn, our loggers and Python warnings, plain or JSON lines."""
    formatter = {"()": JsonFormatter} if json_lines else {"format": "%(levelname)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"main": formatter}, "handlers": {"main": handler},
        "loggers": {name: {"handlers": ["main"], "level": "INFO", "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gpt_service", "py.warnings")},
        # other libraries' warnings (e.g. `kernels`, which bitsandbytes loads) in the same format, not
        # as logging's bare last-resort lines
        "root": {"handlers": ["main"], "level": "WARNING"},
    }
