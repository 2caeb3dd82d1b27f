"""`gpt-service`: the command line.

    gpt-service demo-model DIR      build the tiny offline demo model
    gpt-service train --help        fine-tune with LoRA (same flags as scripts/train_lora.py; --url: on a service)
    gpt-service evaluate --help     loss, perplexity, accuracy and answer scores of a model or adapter
    gpt-service status | history | logs | cancel | resume | load | unload | models | generate
                                    a client of a running service (--url, --api-key; exit codes: see
                                    gpt_service/client/__init__.py)
    gpt-service quickstart          demo model + fine-tune + base vs adapter, offline
    gpt-service serve               start the HTTP service (127.0.0.1:8000, docs at /docs) with its worker
    gpt-service serve --no-worker   the HTTP service only (workers elsewhere take its tasks)
    gpt-service worker              take tasks from the database, no HTTP (any number, on any machines)
    gpt-service export --adapter DIR --merge OUT   merge an adapter into its base model
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # run as the `gpt-service` command, not called from Python
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gpt-service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="build the tiny offline demo model")
    demo.add_argument("dir")
    demo.add_argument("--num-heads", type=int, default=4, help="attention heads (2: heads of 32 dimensions, "
                      "which vLLM's CPU attention needs)")
    commands.add_parser("train", help="fine-tune with LoRA (see `gpt-service train --help`)", add_help=False)
    commands.add_parser("evaluate", help="evaluate a model or adapter on a dataset (see `gpt-service evaluate "
                        "--help`)", add_help=False)
    from gpt_service.client.parsers import add_client_commands

    add_client_commands(commands)
    quick = commands.add_parser("quickstart", help="offline demo: fine-tune the demo model, compare outputs")
    quick.add_argument("--dataset", default="data/train.json")
    export = commands.add_parser("export", help="merge an adapter into its base model (safetensors + tokenizer)")
    export.add_argument("--adapter", required=True, help="the adapter folder (…/lora_adapter)")
    export.add_argument("--merge", required=True, metavar="OUT", help="folder to write the merged model to")
    export.add_argument("--base-model", help="the base model (default: the one the adapter names)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    serve = commands.add_parser("serve", help="start the HTTP service (with a worker unless --no-worker)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="serve the API only; `gpt-service worker` "
                       "processes on this or other machines run the tasks")
    worker = commands.add_parser("worker", help="take tasks from the task database and run them (no HTTP)")
    from gpt_service.tasks.worker_command import add_worker_flags

    add_worker_flags(serve)
    add_worker_flags(worker)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health "
                       "(or set GPT_SERVICE_API_KEY)")
    serve.add_argument("--allow-insecure-bind", action="store_true", default=None,
                       help="listen on a non-loopback address without an API key")
    if argv[:1] == ["train"]:  # the training flags are parsed by the training command itself (or sent)
        from gpt_service.client.modes import train_entry

        return train_entry(argv[1:], prog="gpt-service train", own_process=own_process)
    if argv[:1] == ["evaluate"]:
        from gpt_service.client.modes import evaluate_entry

        return evaluate_entry(argv[1:], prog="gpt-service evaluate")
    args = parser.parse_args(argv)
    if getattr(args, "client_command", None):
        from gpt_service.client.parsers import run as run_client

        return run_client(args)
    if args.command == "demo-model":
        from pathlib import Path

        if (Path(args.dir) / "config.json").exists():
            print(f"{args.dir} already holds a model; left as it is")
            return 0
        from gpt_service.demo_model import build_demo_model

        print(f"demo model written to {build_demo_model(args.dir, num_heads=args.num_heads)}")
        return 0
    if args.command == "serve":
        return serve_command(args)
    if args.command == "worker":
        from gpt_service.tasks.worker_command import worker_command

        return worker_command(args)
    if args.command == "export":
        return export_command(args)
    from gpt_service.quickstart import run

    return run(args.dataset)


def export_command(args: argparse.Namespace) -> int:
    from gpt_service.errors import UserError
    from gpt_service.export import merge_adapter

    try:
        out = merge_adapter(args.adapter, args.merge, args.base_model, args.overwrite)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from gpt_service.api import create_app
    from gpt_service.api.security import is_loopback
    from gpt_service.tasks.worker_command import checked_settings

    settings = checked_settings(args, host=args.host, port=args.port, api_key=args.api_key,
                                allow_insecure_bind=args.allow_insecure_bind)
    if settings is None:
        return 2
    if not is_loopback(settings.host) and not settings.api_key and not settings.allow_insecure_bind:
        print(f"error: refusing to listen on {settings.host} without an API key; set --api-key (or "
              "GPT_SERVICE_API_KEY), or pass --allow-insecure-bind if this network is trusted", file=sys.stderr)
        return 2
    import logging

    from gpt_service.api.observability import logging_config

    logging.captureWarnings(True)  # library warnings become log records, JSON ones when asked
    uvicorn.run(create_app(settings, run_worker=not args.no_worker), host=settings.host, port=settings.port,
                log_config=logging_config(settings.log_format == "json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
