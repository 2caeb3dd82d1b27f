"""The client subcommands' flags, and `run`: one command against the service, errors to exit codes.

Handlers are named, not imported, so `gpt-service serve` and the other local commands never load
httpx or the client for nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt_service.client.environment import DEFAULT_URL, KEY_ENV, URL_ENV, env_key, env_url
from gpt_service.client.errors import EXIT_CODES_HELP, INTERRUPTED, OK, ClientError

DEFAULT_TIMEOUT = 600.0
STATUSES = ("pending", "running", "completed", "failed", "cancelled")


def add_connection_flags(parser: argparse._ActionsContainer, url_default: str) -> None:
    """--url, --api-key, --timeout on a parser or an argument group; left out, they are None."""
    parser.add_argument("--url", help=f"the service (default: ${URL_ENV}, else {url_default})")
    parser.add_argument("--api-key", "--api_key", dest="api_key", help=f"Bearer key (default: ${KEY_ENV})")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"longest wait for an answer (default {DEFAULT_TIMEOUT:g})")


def add_output_flags(parser: argparse._ActionsContainer, follow: bool = False) -> None:
    if follow:
        parser.add_argument("--follow", action="store_true",
                            help="show a live progress bar until the task ends; the exit code says how it ended")
    parser.add_argument("--json", action="store_true", help="print the service's answer as JSON")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The request fields of POST /generate; the service checks their ranges."""
    parser.add_argument("--max_tokens", "--max-tokens", type=int, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    parser.add_argument("--top_p", "--top-p", type=float)
    parser.add_argument("--top_k", "--top-k", type=int)
    parser.add_argument("--repetition_penalty", "--repetition-penalty", type=float)
    parser.add_argument("--stop", action="append", help="a string that ends the answer (repeatable)")
    parser.add_argument("--seed", type=int, help="same seed, same text")


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register status, history, logs, cancel, resume, load, unload, models and generate."""

    def add(name: str, help_text: str, follow: bool = False) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text + f" (on the service at --url, "
                                     f"${URL_ENV} or {DEFAULT_URL})", epilog=EXIT_CODES_HELP)
        parser.set_defaults(client_command=name)
        add_connection_flags(parser, DEFAULT_URL)
        add_output_flags(parser, follow)
        return parser

    add("status", "show a task's status, progress and figures", follow=True).add_argument("task_id")
    history = add("history", "list the tasks, newest first")
    history.add_argument("--status", choices=STATUSES, help="only tasks in this state")
    history.add_argument("--limit", type=int, help="at most this many (default 100)")
    history.add_argument("--offset", type=int, help="skip this many first")
    logs = add("logs", "print the end of a task's log")
    logs.add_argument("task_id")
    logs.add_argument("--tail", type=int, default=100, metavar="N", help="the last N lines (default 100)")
    logs.add_argument("--all", action="store_true", help="every line kept")
    add("cancel", "cancel a task (checkpoints are kept)").add_argument("task_id")
    add("resume", "resume a failed or cancelled task from its newest checkpoint", follow=True).add_argument("task_id")
    load = add("load", "load a model, with an optional LoRA adapter, under a name")
    load.add_argument("model_name")
    load.add_argument("model_path", help="hub id or folder under the service's models/")
    load.add_argument("--lora_adapter", "--lora-adapter", "--adapter", help="adapter folder under models/")
    load.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    load.add_argument("--replace", action="store_true", help="replace a model loaded under this name")
    load.add_argument("--backend", choices=("builtin", "vllm"), help="what serves it (default: the server's)")
    add("unload", "unload a model").add_argument("model_name")
    add("models", "list the loaded models")
    generate = add("generate", "stream a model's continuation of a prompt to stdout")
    generate.add_argument("model_name", help="a loaded model (see `gpt-service models`)")
    generate.add_argument("prompt", help='the text to continue; "-" reads it from stdin')
    _sampling_flags(generate)


def run(args: argparse.Namespace) -> int:
    """Call `commands.<args.client_command>` on the service; a `ClientError` becomes its exit code."""
    from gpt_service.client import commands
    from gpt_service.client.http import ApiClient

    handler = getattr(commands, args.client_command)
    url = args.url or env_url() or DEFAULT_URL
    try:
        with ApiClient(url, args.api_key or env_key(), args.timeout or DEFAULT_TIMEOUT) as api:
            return handler(api, args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader left (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except KeyboardInterrupt:
        print("interrupted; a task on the service goes on (`gpt-service status TASK_ID --follow` follows it)",
              file=sys.stderr)
        return INTERRUPTED
