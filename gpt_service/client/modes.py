"""`gpt-service train` and `gpt-service evaluate`: here, or on a service when one is named.

With `--url` (or `GPT_SERVICE_URL` set) the same flags become the request body, sent to the
service; without, the local command runs as before, parsing the same command line itself.
"""

from __future__ import annotations

import argparse

from gpt_service.client.environment import URL_ENV, env_url
from gpt_service.client.errors import EXIT_CODES_HELP
from gpt_service.client.parsers import add_connection_flags, add_output_flags, run

SERVICE_ONLY = {"api_key": "--api-key", "timeout": "--timeout", "follow": "--follow", "json": "--json",
                "model_name": "--model_name"}


def add_service_flags(parser: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group(
        "service", f"With --url, or {URL_ENV} set, the {what} is sent to that service and its paths are "
        "the service's (data/..., models/...); without, it runs here.")
    add_connection_flags(group, "run here")
    add_output_flags(group, follow=True)
    parser.epilog = f"with a service, {EXIT_CODES_HELP}"
    return group


def service_url(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The service to send to, or None to run here (refusing flags that only a service understands)."""
    args.url = args.url or env_url()
    if args.url is None:
        flags = [flag for dest, flag in SERVICE_ONLY.items() if getattr(args, dest, None)]
        if flags:
            parser.error(f"{', '.join(flags)}: only with a service; give --url or set {URL_ENV}")
    return args.url


def train_parser(prog: str) -> argparse.ArgumentParser:
    """scripts/train_lora.py's flags, and the service's."""
    from gpt_service.training.arguments import add_training_arguments
    from gpt_service.training.launch import add_launch_arguments

    parser = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with LoRA, here or on a service.")
    add_training_arguments(parser)
    add_launch_arguments(parser)
    add_service_flags(parser, "training")
    return parser


def train_entry(argv: list[str], prog: str, own_process: bool = False) -> int:
    """`gpt-service train`: here, or sent to a service. `own_process`: this process is the command's own,
    which a training here may run again with its memory allocator (training/allocator.py)."""
    parser = train_parser(prog)
    args = parser.parse_args(argv)
    if service_url(parser, args) is None:
        from gpt_service.training.allocator import run_with_allocator
        from gpt_service.training.command import main

        if own_process and not args.estimate:
            run_with_allocator()

        return main(argv, prog=prog)
    machines = [flag for flag, given in (("--nnodes", args.nnodes != 1), ("--node_rank", args.node_rank is not None),
                                         ("--rdzv_endpoint", args.rdzv_endpoint), ("--rdzv_id", args.rdzv_id)) if given]
    if machines:
        parser.error(f"{', '.join(machines)}: only for a training run here; a service runs its tasks on its own "
                     "machine (--nproc_per_node works with a service)")
    args.client_command = "train"
    return run(args)


def evaluate_entry(argv: list[str], prog: str) -> int:
    from gpt_service.evaluation.command import build_parser

    parser = build_parser(prog)
    add_service_flags(parser, "evaluation").add_argument(
        "--model_name", "--model-name", help="a model loaded on the service, instead of --model_path")
    args = parser.parse_args(argv)
    if service_url(parser, args) is None:
        from gpt_service.evaluation.command import main

        return main(argv, prog=prog)
    args.client_command = "evaluate"
    return run(args)
