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
from gpt_service.data.batching import collate, epoch_batches, sequential_batches
from gpt_service.data.examples import IGNORE_INDEX, Example
from gpt_service.data.prepare import PreparedData, prepare_data
from gpt_service.errors import UserError
from gpt_service.hardware import Precision, choose_precision
from gpt_service.model_loading import load_causal_lm, load_tokenizer, position_limit
from gpt_service.training.checkpoints import (
    list_checkpoints,
    load_checkpoint,
    publish_atomically,
    remove_unfinished_writes,
    resolve_checkpoint,
    save_checkpoint,
)
from gpt_service.training.loss import summed_token_loss
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


def _label_count(examples: list[Example], batch: list[int]) -> int:
    return sum(sum(1 for label in examples[i].labels[1:] if label != IGNORE_INDEX) for i in batch)


class _Run:
    """The state of one training run; `train()` is the loop."""

    def __init__(self, config: TrainConfig, output_dir: Path, on_progress: ProgressCallback | None,
                 should_stop: StopCheck | None) -> None:
        self.config = config
        self.output_dir = output_dir
        self.on_progress = on_progress or (lambda progress: None)
        self.should_stop = should_stop or (lambda: False)
        self.precision: Precision = choose_precision(config.fp16, config.bf16)
        if self.precision.warning:
            log.warning(self.precision.warning)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.base_model)
        self.data: PreparedData = prepare_data(config, self.tokenizer)
        self.train_lengths = [len(e) for e in self.data.train]
        base = load_causal_lm(config.base_model, self.precision.weights_dtype, self.precision.device)
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.model = get_peft_model(base, _lora_config(config))
        if config.fast_paths:
            speed_up(self.model, self.precision)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for param in trainable:  # LoRA weights train in fp32 whatever the base dtype
            param.data = param.data.float()
        self.optimizer = torch.optim.AdamW(  # fused: one kernel for all LoRA tensors, not a loop over them
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
            fused=self.precision.device.type in ("cpu", "cuda"),
        )
        self.batches_per_epoch = len(epoch_batches(self.train_lengths, config.batch_size, config.seed, 0))
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

    # -- pieces of the loop ------------------------------------------------------------------

    def _autocast(self) -> Any:
        dtype = self.precision.autocast_dtype
        return torch.autocast(self.precision.device.type, dtype=dtype) if dtype else nullcontext()

    def _to_device(self, examples: list[Example], batch: list[int]) -> dict[str, torch.Tensor]:
        tensors = collate([examples[i] for i in batch], self.tokenizer.pad_token_id,
                          position_limit(self.model))
        return {k: v.to(self.precision.device) for k, v in tensors.items()}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.eval:
            return None
        self.model.eval()
        total, count = 0.0, 0
        lengths = [len(e) for e in self.data.eval]
        for batch in sequential_batches(lengths, self.config.batch_size):
            with self._autocast():
                loss, n = summed_token_loss(self.model, self._to_device(self.data.eval, batch),
                                            self.config.fast_paths)
            total, count = total + float(loss), count + n
        self.model.train()
        return total / max(count, 1)

    def _state(self, epoch: int, next_batch: int) -> dict[str, Any]:
        return {"global_step": self.step, "epoch": epoch, "next_batch": next_batch,
                "total_steps": self.total_steps, "history": self.history}

    def resume(self, checkpoint: Path) -> tuple[int, int]:
        """Load a checkpoint; return (epoch, next batch in that epoch) to continue from."""
        set_peft_model_state_dict(self.model, load_file(str(checkpoint / "adapter_model.safetensors")))
        state = load_checkpoint(checkpoint, self.optimizer, self.scheduler)
        self.step, self.history = state["global_step"], state["history"]
        losses = [h for h in self.history if "loss" in h]
        self.last_loss = losses[-1]["loss"] if losses else None
        evals = [h for h in self.history if "eval_loss" in h]
        self.last_eval_loss = evals[-1]["eval_loss"] if evals else None
        log.info("resumed from %s at step %d", checkpoint, self.step)
        return state["epoch"], state["next_batch"]

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.max_grad_norm
            )
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

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

    # -- the loop ---------------------------------------------------------------------------

    def train(self, start_epoch: int, start_batch: int) -> bool:
        """Run to the end; False when `should_stop` asked to stop first."""
        config, accumulate = self.config, self.config.gradient_accumulation_steps
        self._first_step, tokens, started = self.step, 0, time.perf_counter()
        self.model.train()
        for epoch in range(start_epoch, config.num_epochs):
            batches = epoch_batches(self.train_lengths, config.batch_size, config.seed, epoch)
            first = start_batch if epoch == start_epoch else 0
            for window_start in range(first, len(batches), accumulate):
                window = batches[window_start : window_start + accumulate]
                n_labels = max(sum(_label_count(self.data.train, b) for b in window), 1)
                loss_sum = 0.0
                for batch in window:
                    if self.should_stop():
                        return False
                    tensors = self._to_device(self.data.train, batch)
                    with self._autocast():
                        loss, _ = summed_token_loss(self.model, tensors, config.fast_paths)
                    scaled = loss / n_labels
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    loss_sum += float(loss.detach())
                    tokens += int(tensors["attention_mask"].sum())
                self._optimizer_step()
                self.step += 1
                self.last_loss = loss_sum / n_labels
                position = window_start + len(window)
                epoch_float = epoch + position / len(batches)
                point: dict[str, Any] = {"step": self.step, "epoch": round(epoch_float, 4),
                                         "loss": self.last_loss, "learning_rate": self.scheduler.get_last_lr()[0]}
                message = None
                due = self.step % config.eval_steps == 0 or self.step == self.total_steps
                if due and (eval_loss := self.evaluate()) is not None:
                    self.last_eval_loss = point["eval_loss"] = eval_loss
                    message = f"step {self.step}: eval loss {eval_loss:.4f}"
                self.history.append(point)
                if self.step % config.save_steps == 0 and self.step < self.total_steps:
                    next_epoch, next_batch = (epoch + 1, 0) if position >= len(batches) else (epoch, position)
                    path = save_checkpoint(self.output_dir, self.step, self.model, self.optimizer,
                                           self.scheduler, self._state(next_epoch, next_batch),
                                           config.save_total_limit)
                    message = "; ".join(filter(None, [message, f"checkpoint saved to {path}"]))
                self._report(epoch_float, started, tokens, message, evaluated="eval_loss" in point)
        return True

    def finish(self) -> Path:
        """Publish the adapter (and the tokenizer to serve it) atomically."""

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)

        return publish_atomically(self.output_dir / ADAPTER_DIR, write)


def _write_record(output_dir: Path, config: TrainConfig, run: _Run, **fields: Any) -> None:
    record = {
        "base_model": config.base_model, "dataset_path": config.dataset_path,
        "dataset_sha256": run.data.dataset_sha256, "config": config.model_dump(),
        "precision": run.precision.name, "device": str(run.precision.device),
        "train_samples": len(run.data.train), "eval_samples": len(run.data.eval),
        "truncated_samples": run.data.truncated, "total_steps": run.total_steps,
        "global_step": run.step, "history": run.history, **fields,
    }
    tmp = output_dir / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(output_dir / RUN_RECORD)


def run_lora_finetune(
    config: TrainConfig,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> TrainingResult:
    """Fine-tune `config.base_model` with LoRA on `config.dataset_path`.

    `on_progress` is called after every optimizer step; `should_stop` is polled before every
    micro-batch, and a True answer ends the run with `stopped=True` (its checkpoints kept).
    Raises DatasetError, ConfigError, ModelSourceError, OutputDirError or CheckpointError on
    bad input, before any training starts.
    """
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    config = config.model_copy(update={"output_dir": str(output_dir)})
    claim_output_dir(output_dir, config)
    checkpoint = (resolve_checkpoint(output_dir, config.resume_from_checkpoint)
                  if config.resume_from_checkpoint else None)
    if config.tensorboard:
        on_progress = with_tensorboard(output_dir, on_progress)
    run = _Run(config, output_dir, on_progress, should_stop)
    if run.data.truncated:
        log.warning("%d sample(s) were longer than max_length=%d and were truncated",
                    run.data.truncated, config.max_length)
    start = run.resume(checkpoint) if checkpoint else (0, 0)
    output_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(timezone.utc).isoformat()
    _write_record(output_dir, config, run, status="running", started_at=started_at)
    try:
        finished = run.train(*start)
        adapter = run.finish() if finished else None
    finally:
        clear_caches()
    _write_record(output_dir, config, run, status="completed" if finished else "stopped",
                  started_at=started_at, finished_at=datetime.now(timezone.utc).isoformat(),
                  final_loss=run.last_loss, final_eval_loss=run.last_eval_loss,
                  adapter_dir=str(adapter) if adapter else None)
    return TrainingResult(
        output_dir=str(output_dir), adapter_dir=str(adapter) if adapter else None, stopped=not finished,
        global_step=run.step, total_steps=run.total_steps, final_loss=run.last_loss,
        final_eval_loss=run.last_eval_loss, train_samples=len(run.data.train),
        eval_samples=len(run.data.eval), truncated_samples=run.data.truncated, history=run.history,
    )
