"""Exit codes and the errors that lead to them; the table is in `gpt_service.client`'s docstring."""

from __future__ import annotations

OK = 0
SERVICE_ERROR = 1  # the service answered with an error, or a followed task failed
USAGE = 2  # argparse's own code for a bad command line
UNREACHABLE = 3
CANCELLED = 4
UNAUTHORIZED = 5
INTERRUPTED = 130

EXIT_BY_STATUS = {"completed": OK, "failed": SERVICE_ERROR, "cancelled": CANCELLED}
KEY_HINT = "give --api-key or set GPT_SERVICE_API_KEY"
EXIT_CODES_HELP = ("exit codes: 0 success; 1 the service refused (4xx/5xx) or the followed task failed; 2 usage "
                   "error; 3 service unreachable; 4 the followed task was cancelled; 5 wrong or missing API key")


class ClientError(Exception):
    """Something to tell the user in one line, and the exit code that goes with it."""

    exit_code = SERVICE_ERROR


class ServiceError(ClientError):
    """The service answered with an HTTP error; `message` is its `detail` (or OpenAI `error.message`)."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message
        hint = f"; {KEY_HINT}" if status == 401 else ""
        super().__init__(f"{message} (HTTP {status}){hint}")
        self.exit_code = UNAUTHORIZED if status == 401 else SERVICE_ERROR


class Unreachable(ClientError):
    """No answer: connection refused, timed out or cut."""

    exit_code = UNREACHABLE


class UsageError(ClientError):
    """A command line that cannot be sent (found after argparse, e.g. in a --config file)."""

    exit_code = USAGE
