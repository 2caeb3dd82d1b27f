"""One function per client subcommand: `(api, args) -> exit code`. Flags are in `parsers` and `modes`.

Tables and results go to stdout, progress and errors to stderr; `--json` prints the service's answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt_service.client.errors import OK, SERVICE_ERROR, UsageError
from gpt_service.client.follow import follow, report_end
from gpt_service.client.http import ApiClient
from gpt_service.client.render import (
    describe_estimate,
    history_table,
    models_table,
    number,
    print_json,
    print_table,
    stdout_console,
    task_table,
)

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")


def given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def print_outcome(task: dict[str, Any], as_json: bool, show_completed: Callable[[dict[str, Any]], None]) -> int:
    """A followed task's end: its status as JSON, or `show_completed` of it; the exit code."""
    if as_json:
        print_json(task)
    elif task["status"] == "completed":
        show_completed(task)
    return report_end(task)


def queued(api: ApiClient, args: argparse.Namespace, answer: dict[str, Any],
           show_completed: Callable[[dict[str, Any]], None]) -> int:
    """A task the service accepted: its id (or the answer as JSON), then, with --follow, its end."""
    if not args.follow:
        print_json(answer) if args.json else print(answer["task_id"], flush=True)
        return OK
    if not args.json:
        print(answer["task_id"], flush=True)
    return print_outcome(follow(api, answer["task_id"]), args.json, show_completed)


def show_training(task: dict[str, Any]) -> None:
    if task.get("kind") == "evaluate":
        return show_evaluation(task["result"])
    summary = f"completed {task.get('current_step')} steps: final loss {number(task.get('loss'))}"
    if task.get("eval_loss") is not None:
        summary += f", eval loss {number(task['eval_loss'])}"
    print(f"{summary}\nadapter saved to {task.get('adapter_path')}")


def show_evaluation(result: dict[str, Any]) -> None:
    from gpt_service.evaluation.report import print_result

    print_result(result, stdout_console())


def training_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request: `--config FILE`'s values (read here), then the flags given; the service's
    own config/models.yaml supplies the rest."""
    from gpt_service.config import ConfigError, read_yaml_config
    from gpt_service.training.arguments import overrides_from_args

    try:
        file_values = read_yaml_config(args.config) if args.config else {}
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    flags = overrides_from_args(args)
    body = {**file_values, **flags}
    lora = {**(file_values.get("lora_config") or {}), **flags.get("lora_config", {})}
    if lora:
        body["lora_config"] = lora
    return body


def train(api: ApiClient, args: argparse.Namespace) -> int:
    if args.estimate:
        answer = api.call("POST", "/train/estimate", body=training_body(args))
        print_json(answer) if args.json else print(describe_estimate(answer))
        return OK
    return queued(api, args, api.call("POST", "/train", body=training_body(args)), show_training)


def evaluate(api: ApiClient, args: argparse.Namespace) -> int:
    """The figures, at once or, for an evaluation the service queues as a task, when it ends (--follow)."""
    from gpt_service.evaluation.job import EvaluationJob

    answer = api.call("POST", "/evaluate", body=given(args, tuple(EvaluationJob.model_fields)))
    if "task_id" in answer:  # 202: long enough to be queued as a task
        print(f"{answer.get('samples')} samples: queued as task {answer['task_id']}", file=sys.stderr)
        if not args.follow:
            return queued(api, args, answer, show_training)
        task = follow(api, answer["task_id"])
        if task["status"] != "completed":
            return report_end(task)
        answer = task["result"]
    print_json(answer) if args.json else show_evaluation(answer)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(answer, indent=2, ensure_ascii=False), encoding="utf-8")
    return OK


def status(api: ApiClient, args: argparse.Namespace) -> int:
    if args.follow:
        return print_outcome(follow(api, args.task_id), args.json, show_status)
    task = api.call("GET", f"/train/status/{args.task_id}")
    print_json(task) if args.json else show_status(task)
    return OK


def show_status(task: dict[str, Any]) -> None:
    print_table(task_table(task))
    if task.get("kind") == "evaluate" and task.get("result"):
        show_evaluation(task["result"])


def history(api: ApiClient, args: argparse.Namespace) -> int:
    tasks = api.call("GET", "/train/history", params=given(args, ("status", "limit", "offset")))["tasks"]
    print_json(tasks) if args.json else print_table(history_table(tasks))
    return OK


def logs(api: ApiClient, args: argparse.Namespace) -> int:
    params = {"all": "true"} if args.all else {"tail": args.tail}
    answer = api.call("GET", f"/train/{args.task_id}/logs", params=params)
    if args.json:
        print_json(answer)
    else:
        print("\n".join(answer["lines"]), flush=True)
    return OK


def cancel(api: ApiClient, args: argparse.Namespace) -> int:
    task = api.call("POST", f"/train/{args.task_id}/cancel")
    if args.json:
        print_json(task)
    elif task["status"] == "running":
        print(f"task {task['task_id']} cancelling: it stops within seconds, its checkpoints kept")
    else:
        print(f"task {task['task_id']} {task['status']}")
    return OK


def resume(api: ApiClient, args: argparse.Namespace) -> int:
    return queued(api, args, api.call("POST", f"/train/{args.task_id}/resume"), show_training)


def load(api: ApiClient, args: argparse.Namespace) -> int:
    body = {"model_name": args.model_name, "model_path": args.model_path,
            **given(args, ("lora_adapter", "dtype", "backend")), "replace": args.replace}
    model = api.call("POST", "/models/load", body=body)
    if args.json:
        print_json(model)
    else:
        adapter = f" with adapter {model['lora_adapter']}" if model.get("lora_adapter") else ""
        print(f"loaded {model['model_name']}: {model['base_model']}{adapter} ({model.get('dtype')}, "
              f"{model.get('backend')})")
    return OK


def unload(api: ApiClient, args: argparse.Namespace) -> int:
    answer = api.call("DELETE", f"/models/{args.model_name}")
    print_json(answer) if args.json else print(f"unloaded {answer['model_name']}")
    return OK


def models(api: ApiClient, args: argparse.Namespace) -> int:
    loaded = api.call("GET", "/models")["models"]
    print_json(loaded) if args.json else print_table(models_table(loaded))
    return OK


def generate(api: ApiClient, args: argparse.Namespace) -> int:
    """Stream the answer to stdout as it is generated (or, with --json, print the whole answer)."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    body = {"model_name": args.model_name, "prompt": prompt, **given(args, SAMPLING_FLAGS)}
    if args.json:
        print_json(api.call("POST", "/generate", body=body))
        return OK
    for event in api.events("/generate", {**body, "stream": True}):
        sys.stdout.write(event.get("text", ""))
        sys.stdout.flush()
        if event.get("error"):
            print(f"\nerror: generation stopped: {event['error']}", file=sys.stderr)
            return SERVICE_ERROR
    print(flush=True)
    return OK
