"""`gpt-service`: the command line.

    gpt-service demo-model DIR      build the tiny offline demo model
    gpt-service train --help        fine-tune with LoRA (same flags as scripts/train_lora.py)
    gpt-service quickstart          demo model + fine-tune + base vs adapter, offline
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gpt-service", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-model", help="build the tiny offline demo model")
    demo.add_argument("dir")
    commands.add_parser("train", help="fine-tune with LoRA (see `gpt-service train --help`)", add_help=False)
    quick = commands.add_parser("quickstart", help="offline demo: fine-tune the demo model, compare outputs")
    quick.add_argument("--dataset", default="data/train.json")
    if argv[:1] == ["train"]:  # the training flags are parsed by the training command itself
        from gpt_service.training.command import main as train_main

        return train_main(argv[1:], prog="gpt-service train")
    args = parser.parse_args(argv)
    if args.command == "demo-model":
        from gpt_service.demo_model import build_demo_model

        print(f"demo model written to {build_demo_model(args.dir)}")
        return 0
    from gpt_service.quickstart import run

    return run(args.dataset)


if __name__ == "__main__":
    sys.exit(main())
