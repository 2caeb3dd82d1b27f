"""The LoRA fine-tuning recipe, shared by `scripts/train_lora.py`, `gpt-service train` and the service.

A plain loop rather than `transformers.Trainer`: batches of similar length, frozen base weights
in bf16 under autocast, and the output head fused with the loss on labelled positions only make
it several times faster on the same data (bench/train_throughput.py); the fast paths of
`training/speedups.py` add to that. It stays a standard PEFT LoRA whose adapter any PEFT user can
load.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
import warnings
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import get_scheduler

from gpt_service.config import TrainConfig
from gpt_service.data.batching import collate, epoch_batches, rank_share, sequential_batches
from gpt_service.data.prepare import PreparedData, prepare_data
from gpt_service.data.tokenized import TokenizedSet
from gpt_service.errors import UserError
from gpt_service.hardware import Precision, choose_precision
from gpt_service.model_loading import load_causal_lm, load_tokenizer, position_limit
from gpt_service.quantization import bitsandbytes_config, check_available, keep_trainable_layout
from gpt_service.training import allocator, distributed, launch
from gpt_service.training.checkpoints import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    publish_atomically,
    read_trainer_state,
    remove_unfinished_writes,
    resolve_checkpoint,
    save_checkpoint,
)
from gpt_service.training.memory import GB, estimate_memory
from gpt_service.training.progress import ProgressCallback, StopCheck, TrainingProgress, TrainingResult
from gpt_service.training.speedups import clear_caches, speed_up
from gpt_service.training.tensorboard import with_tensorboard

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
ADAPTER_DIR = "lora_adapter"


class OutputDirError(UserError):
    """An output folder that holds another run's files."""


def default_output_dir(models_root: str | Path = "models") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(models_root) / "checkpoints" / f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def claim_output_dir(output_dir: Path, config: TrainConfig) -> None:
    """Refuse to write over another run's files unless resuming or told to overwrite."""
    remove_unfinished_writes(output_dir)
    if config.resume_from_checkpoint or not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    if not config.overwrite_output_dir:
        raise OutputDirError(
            f"output_dir {output_dir} is not empty (it holds another run's files); choose a new "
            "output_dir, resume with resume_from_checkpoint=latest, or set overwrite_output_dir"
        )
    for stale in list_checkpoints(output_dir):
        shutil.rmtree(stale)


def _lora_config(config: TrainConfig) -> LoraConfig:
    lora = config.lora_config
    return LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.lora_alpha,
        target_modules=lora.target_modules, lora_dropout=lora.lora_dropout, bias=lora.bias,
    )


def _batch_index(batches: list[list[int]], next_sample: int, checkpoint: Path) -> int:
    """The batch that starts at global sample `next_sample` of an epoch."""
    seen = 0
    for index, batch in enumerate(batches):
        if seen == next_sample:
            return index
        seen += len(batch)
    if seen == next_sample:
        return len(batches)
    raise CheckpointError(f"checkpoint {checkpoint}: no batch starts at sample {next_sample} of its epoch "
                          "(was the dataset changed?)")


def _prepare_data(config: TrainConfig, tokenizer: Any, group: distributed.Group) -> PreparedData:
    """The data, tokenized by rank 0 while the other ranks wait, then read from the cache by them.

    Rank 0's bad-data error is raised on every rank. Without the cache (off, or not shared between
    machines) each rank tokenizes for itself, to the same result.
    """
    prepared: list[PreparedData] = []
    distributed.main_first(group, lambda: prepared.append(prepare_data(config, tokenizer)))
    return prepared[0] if prepared else prepare_data(config, tokenizer)


class _Run:
    """The state of one training run on this process; `train()` is the loop.

    The data order is a pure function of the seed, the epoch and the global micro-batch (samples of
    one micro-step over all processes: batch_size x processes, or what the checkpoint resumed from
    says): every process builds the same batches and takes its share of each (`rank_share`).
    """

    def __init__(self, config: TrainConfig, output_dir: Path, on_progress: ProgressCallback | None,
                 should_stop: StopCheck | None, group: distributed.Group, checkpoint: Path | None) -> None:
        self.config = config
        self.output_dir = output_dir
        self.group = group
        self.on_progress = on_progress or (lambda progress: None)
        self.should_stop = should_stop or (lambda: False)
        self.precision: Precision = choose_precision(config.fp16, config.bf16)
        if self.precision.warning and group.is_main:
            log.warning(self.precision.warning)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.base_model)
        self.data = _prepare_data(config, self.tokenizer, group)
        self.train_lengths = self.data.train.lengths
        self.checkpointing = self._choose_checkpointing()
        base = self._load_base()
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.model = get_peft_model(base, _lora_config(config))
        if config.fast_paths:
            speed_up(self.model, self.precision, self.checkpointing)
        if self.checkpointing:  # non-reentrant: no inputs that must require a gradient, any autograd inside
            base.activation_checkpointing_enable({"use_reentrant": False})
        for param in self.model.parameters():  # LoRA weights train in fp32 whatever the base dtype
            if param.requires_grad:
                param.data = param.data.float()
        self.state: dict[str, Any] = read_trainer_state(checkpoint) if checkpoint else {}
        if checkpoint:  # every process loads the whole adapter, before FSDP2 shards it
            set_peft_model_state_dict(self.model, load_file(str(checkpoint / "adapter_model.safetensors")))
        self.wrapped = distributed.wrap(self.model, group, config.fast_paths)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2's shards, once wrapped
        self.optimizer = torch.optim.AdamW(  # fused: one kernel for all LoRA tensors, not a loop over them
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
            fused=self.precision.device.type in ("cpu", "cuda"),
        )
        self.micro_batch = int(self.state.get("global_micro_batch") or config.batch_size * group.world_size)
        self.batches_per_epoch = len(epoch_batches(self.train_lengths, self.micro_batch, config.seed, 0))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.scheduler = get_scheduler(
            config.lr_scheduler_type, self.optimizer,
            num_warmup_steps=config.warmup_steps, num_training_steps=self.total_steps,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.grad_scaler else None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None

    def _choose_checkpointing(self) -> bool:
        """As configured; when not, on only where keeping every layer's activations would not fit."""
        if self.config.gradient_checkpointing is not None:
            return self.config.gradient_checkpointing
        estimate = estimate_memory(self.config, self.train_lengths, self.precision.device)
        estimate.refuse_beyond(estimate.available_bytes, f"this {estimate.device}")
        if estimate.gradient_checkpointing and self.group.is_main:
            log.info("gradient checkpointing on: keeping every layer's activations would need %.1f GB, "
                     "%.1f GB are available", estimate.needed(estimate.peak(False)) / GB,
                     estimate.available_bytes / GB)
        return distributed.any_rank(self.group, estimate.gradient_checkpointing)  # all ranks alike

    def _load_base(self) -> Any:
        with allocator.freed_memory_returned():
            return self._load_base_model()

    def _load_base_model(self) -> Any:
        quantization = self.config.quantization
        if quantization is None:
            return load_causal_lm(self.config.base_model, self.precision.weights_dtype, self.precision.device)
        check_available(self.precision.device.type)
        compute = self.precision.autocast_dtype or torch.float32
        if self.group.is_main:
            log.info("loading the base in %s (bitsandbytes), computing in %s", quantization.describe(),
                     str(compute).removeprefix("torch."))
        return keep_trainable_layout(load_causal_lm(
            self.config.base_model, self.precision.weights_dtype, self.precision.device,
            quantization=bitsandbytes_config(quantization, compute)))

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.config.gradient_accumulation_steps

    def describe_batch(self) -> str:
        """The global batch in words, for the log and run.json."""
        config, world = self.config, self.group.world_size
        if self.micro_batch == config.batch_size * world:
            return (f"global batch {self.global_batch} = batch_size {config.batch_size} x "
                    f"gradient_accumulation_steps {config.gradient_accumulation_steps} x {world} process(es)")
        return (f"global batch {self.global_batch} kept from the checkpoint ({self.micro_batch} samples a "
                f"micro-step x gradient_accumulation_steps {config.gradient_accumulation_steps}): each of "
                f"{world} process(es) takes its share of a micro-step in pieces of at most batch_size "
                f"{config.batch_size}")

    # -- pieces of the loop ------------------------------------------------------------------

    def _autocast(self) -> Any:
        dtype = self.precision.autocast_dtype
        return torch.autocast(self.precision.device.type, dtype=dtype) if dtype else nullcontext()

    def _to_device(self, examples: TokenizedSet, batch: list[int]) -> dict[str, torch.Tensor]:
        tensors = collate([examples[i] for i in batch], self.tokenizer.pad_token_id,
                          position_limit(self.model))
        return {k: v.to(self.precision.device) for k, v in tensors.items()}

    def _pieces(self, batches: list[list[int]]) -> list[tuple[list[int], bool]]:
        """(samples, counts) for each forward pass of this process over `batches` (global batches).

        A process with nothing left in a batch still runs one sample of it, weighted 0: the other
        processes wait for its forward and backward.
        """
        group = self.group
        return [(piece or batch[:1], bool(piece)) for batch in batches
                for piece in rank_share(batch, group.rank, group.world_size, self.config.batch_size)]

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.eval:
            return None
        self.wrapped.eval()
        total, count = 0.0, 0
        for piece, counts in self._pieces(sequential_batches(self.data.eval.lengths, self.micro_batch)):
            with self._autocast():
                loss, n = self.wrapped(self._to_device(self.data.eval, piece))
            if counts:
                total, count = total + float(loss), count + n
        total, count = distributed.sum_across(self.group, [total, count])
        self.wrapped.train()
        return total / max(count, 1)

    def _state(self, epoch: int, next_batch: int, next_sample: int) -> dict[str, Any]:
        return {"global_step": self.step, "epoch": epoch, "next_batch": next_batch, "next_sample": next_sample,
                "global_micro_batch": self.micro_batch, "world_size": self.group.world_size,
                "total_steps": self.total_steps, "history": self.history}

    def resume(self, checkpoint: Path) -> tuple[int, int]:
        """Load the optimizer, scheduler and RNG; return (epoch, next global batch in that epoch).

        The position is read in global samples, so that another number of processes resumes exactly.
        """
        optimizer_state = load_checkpoint(checkpoint, self.scheduler)
        try:
            distributed.load_optimizer_state(self.model, self.optimizer, optimizer_state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: its optimizer state does not fit this run: {exc}") from exc
        state = self.state
        self.step, self.history = state["global_step"], state["history"]
        losses = [h for h in self.history if "loss" in h]
        self.last_loss = losses[-1]["loss"] if losses else None
        evals = [h for h in self.history if "eval_loss" in h]
        self.last_eval_loss = evals[-1]["eval_loss"] if evals else None
        epoch, next_batch = state["epoch"], state["next_batch"]
        if "next_sample" in state and epoch < self.config.num_epochs:
            batches = epoch_batches(self.train_lengths, self.micro_batch, self.config.seed, epoch)
            next_batch = _batch_index(batches, state["next_sample"], checkpoint)
        if self.group.is_main:
            log.info("resumed from %s at step %d (written by %s process(es))", checkpoint, self.step,
                     state.get("world_size", 1))
        return epoch, next_batch

    def _optimizer_step(self) -> float:
        """Clip, step, and return the gradient norm before clipping (over all processes' gradients)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(  # an infinite bound measures without clipping
            [p for p in self.model.parameters() if p.requires_grad],
            self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf,
        )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(distributed.whole(norm))

    def _accumulate(self, window: list[list[int]]) -> float:
        """Forward and backward over this process's share of `window`; the window's summed loss, all processes.

        Each process's summed loss is scaled by world_size / (labelled tokens of the whole window, all
        processes): DDP and FSDP2 average the processes' gradients, so the result is the exact mean
        over the global batch's tokens, whatever the number of processes.
        """
        n_labels = max(sum(self.data.train.label_count(b) for b in window), 1)
        pieces = self._pieces(window)
        loss_sum = 0.0
        for k, (piece, counts) in enumerate(pieces):
            tensors = self._to_device(self.data.train, piece)
            with distributed.gradient_sync(self.wrapped, self.group, sync=k == len(pieces) - 1):
                with self._autocast():
                    loss, _ = self.wrapped(tensors)
                scaled = loss * self.group.world_size / n_labels if counts else loss * 0.0
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if counts:
                loss_sum += float(loss.detach())
        return distributed.sum_across(self.group, [loss_sum])[0] / n_labels

    def _report(self, epoch_float: float, started: float, tokens: int, message: str | None,
                evaluated: bool) -> None:
        elapsed = time.perf_counter() - started
        done_here = max(self.step - self._first_step, 0)
        eta = (self.total_steps - self.step) * elapsed / done_here if done_here else None
        self.on_progress(TrainingProgress(
            step=self.step, total_steps=self.total_steps, epoch=round(epoch_float, 4),
            loss=self.last_loss, eval_loss=self.last_eval_loss,
            learning_rate=self.scheduler.get_last_lr()[0],
            tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0, eta_seconds=eta, message=message,
            evaluated=evaluated,
        ))

    def _save(self, epoch: int, position: int, batches: list[list[int]]) -> Path | None:
        """Write a checkpoint (rank 0; every process helps gather the state); its path on rank 0."""
        adapter = distributed.adapter_state(self.model)
        optimizer_state = distributed.optimizer_state(self.model, self.optimizer)
        path = None
        if self.group.is_main:
            next_epoch, next_batch = (epoch + 1, 0) if position >= len(batches) else (epoch, position)
            next_sample = sum(len(b) for b in batches[:next_batch]) if next_epoch == epoch else 0
            path = save_checkpoint(self.output_dir, self.step,
                                   lambda folder: self.model.save_pretrained(folder, state_dict=adapter),
                                   optimizer_state, self.scheduler, self._state(next_epoch, next_batch, next_sample),
                                   self.config.save_total_limit)
        distributed.barrier(self.group)
        return path

    def _reseed(self) -> None:
        """With several processes, the LoRA dropout's draws are a function of (seed, step, rank):
        different on each process, and the same again after a resume without saving every RNG."""
        if self.group.world_size > 1:
            torch.manual_seed(self.config.seed + 1_000_003 * (self.step * self.group.world_size + self.group.rank + 1))

    # -- the loop ---------------------------------------------------------------------------

    def train(self, start_epoch: int, start_batch: int) -> bool:
        """Run to the end; False when `should_stop` asked to stop first."""
        config, accumulate = self.config, self.config.gradient_accumulation_steps
        self._first_step, tokens, started = self.step, 0, time.perf_counter()
        self.wrapped.train()
        for epoch in range(start_epoch, config.num_epochs):
            batches = epoch_batches(self.train_lengths, self.micro_batch, config.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            for window_start in range(first, len(batches), accumulate):
                if distributed.any_rank(self.group, self.should_stop()):
                    return False
                window = batches[window_start : window_start + accumulate]
                self._reseed()
                self.last_loss = self._accumulate(window)
                tokens += sum(len(self.data.train[i]) for batch in window for i in batch)
                grad_norm = self._optimizer_step()
                self.step += 1
                position = window_start + len(window)
                epoch_float = epoch + position / len(batches)
                point: dict[str, Any] = {"step": self.step, "epoch": round(epoch_float, 4),
                                         "loss": self.last_loss, "learning_rate": self.scheduler.get_last_lr()[0],
                                         "grad_norm": grad_norm}
                message = None
                due = self.step % config.eval_steps == 0 or self.step == self.total_steps
                if due and (eval_loss := self.evaluate()) is not None:
                    self.last_eval_loss = point["eval_loss"] = eval_loss
                    message = f"step {self.step}: eval loss {eval_loss:.4f}"
                self.history.append(point)
                if self.step % config.save_steps == 0 and self.step < self.total_steps:
                    path = self._save(epoch, position, batches)
                    message = "; ".join(filter(None, [message, f"checkpoint saved to {path}"]))
                self._report(epoch_float, started, tokens, message, evaluated="eval_loss" in point)
        return True

    def finish(self) -> Path:
        """Publish the adapter (and the tokenizer to serve it) atomically, from rank 0."""
        adapter = distributed.adapter_state(self.model)

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder, state_dict=adapter)
            self.tokenizer.save_pretrained(folder)

        target = self.output_dir / ADAPTER_DIR
        if self.group.is_main:
            publish_atomically(target, write)
        distributed.barrier(self.group)
        return target


def _write_record(output_dir: Path, config: TrainConfig, run: _Run, **fields: Any) -> None:
    record = {
        "base_model": config.base_model, "dataset_path": config.dataset_path,
        "dataset_sha256": run.data.dataset_sha256, "config": config.model_dump(),
        "precision": run.precision.name, "device": str(run.precision.device),
        "processes": run.group.world_size, "distributed": run.group.mode,
        "global_batch_size": run.global_batch, "global_batch": run.describe_batch(),
        "train_samples": len(run.data.train), "eval_samples": len(run.data.eval),
        "truncated_samples": run.data.truncated, "total_steps": run.total_steps,
        "global_step": run.step, "history": run.history, **fields,
    }
    tmp = output_dir / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(output_dir / RUN_RECORD)


def _claim(config: TrainConfig) -> Path:
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    claim_output_dir(output_dir, config.model_copy(update={"output_dir": str(output_dir)}))
    return output_dir


def run_lora_finetune(
    config: TrainConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainingResult:
    """Fine-tune `config.base_model` with LoRA on `config.dataset_path`.

    `on_progress` is called after every optimizer step; `should_stop` is polled before every
    optimizer step, and a True answer ends the run with `stopped=True` (its checkpoints kept).
    Raises DatasetError, ConfigError, ModelSourceError, OutputDirError or CheckpointError on
    bad input, before any training starts.

    In a process started by torchrun this is one rank of the training: only rank 0 reports
    progress, heeds `should_stop` (for all) and writes files; a group restarted by torchrun after a
    failure resumes from the newest checkpoint.
    """
    group = distributed.join(config)
    if launch.restart_count() and not config.resume_from_checkpoint:
        config = config.model_copy(update={"resume_from_checkpoint": "latest"})
        if group.is_main:
            log.warning("restarted by torchrun (restart %d): resuming from the newest checkpoint",
                        launch.restart_count())
    output_dir = distributed.main_first(group, lambda: _claim(config))
    config = config.model_copy(update={"output_dir": str(output_dir)})
    checkpoint = (resolve_checkpoint(output_dir, config.resume_from_checkpoint)
                  if config.resume_from_checkpoint else None)
    if not group.is_main:
        on_progress, should_stop = None, None
    elif config.tensorboard:
        on_progress = with_tensorboard(output_dir, on_progress)
    run = _Run(config, output_dir, on_progress, should_stop, group, checkpoint)
    if group.is_main:
        log.info("%s; %s; memory allocator %s", run.describe_batch(), f"{group.mode} over {group.world_size} "
                 "processes" if group.joined else "one process", allocator.in_use())
        if run.data.truncated:
            log.warning("%d sample(s) were longer than max_length=%d and were truncated",
                        run.data.truncated, config.max_length)
    start = run.resume(checkpoint) if checkpoint else (0, 0)
    started_at = datetime.now(timezone.utc).isoformat()
    if group.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_record(output_dir, config, run, status="running", started_at=started_at)
    try:
        finished = run.train(*start)
        adapter = run.finish() if finished else None
    finally:
        clear_caches()
    if group.is_main:
        _write_record(output_dir, config, run, status="completed" if finished else "stopped",
                      started_at=started_at, finished_at=datetime.now(timezone.utc).isoformat(),
                      final_loss=run.last_loss, final_eval_loss=run.last_eval_loss,
                      adapter_dir=str(adapter) if adapter else None)
    distributed.leave(group)
    return TrainingResult(
        output_dir=str(output_dir), adapter_dir=str(adapter) if adapter else None, stopped=not finished,
        global_step=run.step, total_steps=run.total_steps, final_loss=run.last_loss,
        final_eval_loss=run.last_eval_loss, train_samples=len(run.data.train),
        eval_samples=len(run.data.eval), truncated_samples=run.data.truncated, history=run.history,
    )
