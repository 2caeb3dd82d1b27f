"""Launching a training under PyTorch's own launcher, `torchrun`, and telling a rank from a launcher.

    python scripts/train_lora.py --nproc_per_node 2 ...        # one machine, two processes
    python scripts/train_lora.py --nnodes 2 --nproc_per_node 4 \\
        --rdzv_endpoint HOST:29400 ...                          # run the same line on each machine

A command that asks for more than one process re-runs itself under `torch.distributed.run`
(in this process, so that a failed rank comes back as a structured `ChildFailedError`); each
rank then finds torchrun's variables in its environment and trains. Under a user's own
`torchrun` the command is already a rank and trains at once. Importing this module does not
import torch: the service's worker builds nothing here, but its task runner does.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt_service.errors import UserError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding gpt_service/
_ENDPOINT = re.compile(r"^\[?[\w.:-]+\]?:\d{1,5}$")


class LaunchError(UserError):
    """Launch options that cannot work (more processes than GPUs, a bad endpoint, ...)."""


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it goes (e.g. kill -9 of its parent)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def is_rank() -> bool:
    """True in a process that torchrun (ours or the user's) started as one rank of a group."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restarts_left() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - restart_count()


@dataclass(frozen=True)
class LaunchOptions:
    """torchrun's options for one training: processes here, machines, rendezvous, restarts."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    max_restarts: int = 0

    @property
    def wanted(self) -> bool:
        """More than one process in all, or a rendezvous to join: torchrun is needed."""
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.rdzv_endpoint is not None

    def check(self, cuda_devices: int) -> None:
        """Refuse what cannot run, naming the option; `cuda_devices` is 0 on a machine without CUDA."""
        if self.nproc_per_node < 1:
            raise LaunchError(f"--nproc_per_node must be at least 1, not {self.nproc_per_node}")
        if cuda_devices and self.nproc_per_node > cuda_devices:
            raise LaunchError(f"--nproc_per_node {self.nproc_per_node} is more than the {cuda_devices} CUDA "
                              "device(s) of this machine (one process per GPU)")
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes must be at least 1, not {self.nnodes}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node_rank must be between 0 and {self.nnodes - 1}, not {self.node_rank}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise LaunchError("--nnodes above 1 needs --rdzv_endpoint HOST:PORT (the same on every machine)")
        if self.rdzv_endpoint is not None and not _ENDPOINT.match(self.rdzv_endpoint):
            raise LaunchError(f"--rdzv_endpoint must be HOST:PORT, not {self.rdzv_endpoint!r}")
        if self.max_restarts < 0:
            raise LaunchError(f"--max_restarts must be 0 or more, not {self.max_restarts}")

    def torchrun_args(self, module: str, module_args: list[str]) -> list[str]:
        """torchrun's command line (without the `torchrun` itself) running `python -m module module_args`."""
        args = [f"--nproc_per_node={self.nproc_per_node}", f"--max_restarts={self.max_restarts}"]
        if self.rdzv_endpoint is None:
            args.append("--standalone")  # a c10d rendezvous on a free local port
        else:
            args += [f"--nnodes={self.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}",
                     f"--rdzv_id={self.rdzv_id or 'gpt-service'}"]
            if self.node_rank is not None:
                args.append(f"--node_rank={self.node_rank}")
        return [*args, "--module", module, *module_args]


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """torchrun's flags that are not training settings (`--nproc_per_node` is `num_processes`)."""
    group = parser.add_argument_group("torchrun", "Several processes or machines: the command re-runs itself "
                                      "under torchrun (see README, 'More than one GPU or machine').")
    group.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    group.add_argument("--node_rank", "--node-rank", type=int, default=None,
                       help="this machine's rank among --nnodes (optional with the c10d rendezvous)")
    group.add_argument("--rdzv_endpoint", "--rdzv-endpoint", default=None, metavar="HOST:PORT",
                       help="c10d rendezvous, the same on every machine (one of them, reachable by all)")
    group.add_argument("--rdzv_id", "--rdzv-id", default=None, help="run id shared by the machines' agents")


def launch_options(args: argparse.Namespace, num_processes: int, max_restarts: int) -> LaunchOptions:
    return LaunchOptions(nproc_per_node=num_processes, nnodes=args.nnodes, node_rank=args.node_rank,
                         rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=max_restarts)


def describe_failures(failures: dict[int, object]) -> str:
    """The failed ranks from torchrun's `ChildFailedError.failures`, in words: signal, exit code or exception.

    Ranks that torchrun itself stopped (SIGTERM) after another failed are not the cause; they are
    summed up in a word.
    """
    stopped = -signal.SIGTERM  # how torchrun stops the ranks left once one has failed
    causes = {r: f for r, f in failures.items() if getattr(f, "exitcode", None) != stopped} or failures
    parts = []
    for global_rank, failure in sorted(causes.items()):
        code = getattr(failure, "exitcode", None)
        message = getattr(failure, "message", "") or ""
        if code is not None and code < 0:
            what = f"was killed by {signal.Signals(-code).name}"
        elif message and not message.startswith(("To enable traceback", "Signal ")):
            what = f"failed: {message.strip().splitlines()[-1]}"
        else:
            what = f"exited with code {code}"
        parts.append(f"rank {global_rank} {what}")
    if len(causes) < len(failures):
        parts.append("torchrun stopped the others")
    return "; ".join(parts) or "a training process failed"


def run_torchrun(options: LaunchOptions, module: str, module_args: list[str]) -> tuple[int, str | None]:
    """Run `module` under torchrun in this process; (exit code, the failed ranks in words or None).

    The ranks find this package on PYTHONPATH, so a checkout runs without being installed.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    paths = [str(PACKAGE_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    args = get_args_parser().parse_args(options.torchrun_args(module, module_args))
    try:
        run(args)
    except ChildFailedError as exc:
        return 1, describe_failures(exc.failures)
    return 0, None
