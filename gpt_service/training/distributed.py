"""One training over several processes: the process group, the model's wrapping, and the few
collectives the loop needs.

A rank (a process started by torchrun, see `training/launch.py`) joins the group torchrun set up:
`nccl` on CUDA, `gloo` on a CPU. The PEFT model is then wrapped with DDP (each process holds the
whole base; LoRA gradients are all-reduced) or FSDP2 (`fully_shard` per decoder layer, then the
root: the frozen base is sharded, each layer all-gathered while it runs). A process alone (no
torchrun) is a group of one and runs the model as it is.

The loss is computed inside the wrapped module's forward (`TokenLoss`), because the fused head
loss reads the output layer's weight directly: under FSDP2 that weight is whole only while the
root's forward runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gpt_service.config import TrainConfig
from gpt_service.errors import UserError
from gpt_service.training import launch
from gpt_service.training.loss import summed_token_loss

log = logging.getLogger(__name__)
T = TypeVar("T")

# The trainable (LoRA) tensors whole, on the CPU of rank 0 only: what a checkpoint or the adapter holds.
_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass(frozen=True)
class Group:
    """This process's place in the training: rank, world size, and how the model is wrapped."""

    rank: int = 0
    world_size: int = 1
    mode: str = "single"  # "single" (no process group), "ddp" or "fsdp"
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports progress and writes checkpoints, the adapter and run.json."""
        return self.rank == 0

    @property
    def joined(self) -> bool:
        return self.mode != "single"


def join(config: TrainConfig) -> Group:
    """Join torchrun's process group when this process is a rank; otherwise a group of one."""
    if not launch.is_rank():
        if config.num_processes > 1:
            raise UserError("num_processes above 1 needs torchrun; start the training with scripts/train_lora.py, "
                            "`gpt-service train` or the service, which launch it")
        if config.distributed == "fsdp":
            log.info("distributed=fsdp with one process: nothing to shard, the model runs unwrapped")
        return Group()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        # torchrun's agent keeps one store across the restarts of a group: without a prefix of its own,
        # a restarted rank can read the address a dead rank published and wait on it until the timeout.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"gpt-service/attempt-{launch.restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    return Group(dist.get_rank(), dist.get_world_size(), config.distributed or "ddp", backend)


def leave(group: Group) -> None:
    if group.joined and dist.is_initialized():
        dist.destroy_process_group()


class TokenLoss(nn.Module):
    """`summed_token_loss(model, batch, fast)` as a module, so DDP's and FSDP2's hooks run around all of it."""

    def __init__(self, model: nn.Module, fast: bool = True) -> None:
        super().__init__()
        self.model, self.fast = model, fast

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return summed_token_loss(self.model, batch, self.fast)


def _decoder_layers(model: Any) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the model's own no-split modules (Qwen2DecoderLayer, ...)."""
    base = model.get_base_model()
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def wrap(model: nn.Module, group: Group, fast: bool = True) -> nn.Module:
    """The module whose forward(batch) returns (summed loss, labelled tokens), wrapped for `group`;
    `fast`: the fused head loss where it applies."""
    loss = TokenLoss(model, fast)
    if group.mode == "ddp":
        # Every process loaded the same base from disk: DDP's start-up broadcast of every weight (the
        # whole base) would copy nothing new, so only the trained tensors are sent from rank 0. The
        # buffers (rotary tables) are constants: no broadcast before each forward either.
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return nn.parallel.DistributedDataParallel(loss, device_ids=device_ids, broadcast_buffers=False,
                                                   init_sync=False)
    if group.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (group.world_size,))
        layers = _decoder_layers(model)
        if not layers:
            log.info("FSDP2: no decoder layers found by name; the whole model is one shard group")
        sharded = [fully_shard(layer, mesh=mesh) for layer in layers] + [fully_shard(loss, mesh=mesh)]
        if group.backend == "gloo":
            # gloo has taken FSDP2's ReduceOp.AVG for a sum (pytorch/pytorch#162338): gradients came out
            # world_size times too large. Summing, then dividing, is exact on every version and backend.
            if not hasattr(sharded[-1], "set_force_sum_reduction_for_comms"):
                raise UserError(f"distributed=fsdp on CPUs (gloo) needs a newer torch than {torch.__version__} "
                                "(one with FSDPModule.set_force_sum_reduction_for_comms); use distributed=ddp")
            for module in sharded:
                module.set_force_sum_reduction_for_comms(True)
        return loss
    return loss


def inner_model(wrapped: nn.Module) -> Any:
    """The PEFT model inside what `wrap` returned."""
    return (wrapped.module if isinstance(wrapped, nn.parallel.DistributedDataParallel) else wrapped).model


@contextmanager
def gradient_sync(wrapped: nn.Module, group: Group, sync: bool) -> Iterator[None]:
    """Let this backward reduce gradients across processes only when `sync` (the window's last one)."""
    if group.mode == "ddp" and not sync:
        with wrapped.no_sync():
            yield
        return
    if group.mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    yield


def any_rank(group: Group, flag: bool) -> bool:
    """True on every rank when it is True on any (so that all ranks stop at the same step)."""
    if not group.joined:
        return flag
    value = torch.tensor([int(flag)], device=_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across(group: Group, values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64)."""
    if not group.joined:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device(group))
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(group: Group) -> None:
    if group.joined:
        dist.barrier()


def share(group: Group, value: T) -> T:
    """Rank 0's `value` on every rank (pickled; for small things: a path, a message)."""
    if not group.joined:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(group: Group, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and give its result to every rank, or raise its UserError on every rank.

    For the steps only rank 0 may take (choosing and claiming the output folder) whose refusal every
    rank must see, instead of waiting for rank 0 in a collective until the timeout.
    """
    outcome: tuple[Any, tuple[type, str] | None] = (None, None)
    if group.is_main:
        try:
            outcome = (work(), None)
        except UserError as exc:
            if not group.joined:
                raise
            outcome = (None, (type(exc), str(exc)))
    value, error = share(group, outcome)
    if error:
        kind, text = error
        raise kind(text)
    return value


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole, on rank 0's CPU (gathered from FSDP2 shards); a collective."""
    return get_model_state_dict(model, options=_GATHERED)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole, on rank 0 (any world size reloads it); a collective."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHERED)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from `optimizer_state` (each rank keeps its shard), or an older index-keyed one."""
    groups = state.get("param_groups") or [{}]
    if all(isinstance(p, int) for p in groups[0].get("params", [])):  # written before names were used
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2's DTensor results (a gradient norm) gathered, others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _device(group: Group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")
