"""TensorBoard event files for a run (`tensorboard: true`), fed from the progress callback."""

from __future__ import annotations

from pathlib import Path

from gpt_service.errors import UserError
from gpt_service.training.progress import ProgressCallback, TrainingProgress

LOG_DIR = "runs"


def with_tensorboard(output_dir: Path, on_progress: ProgressCallback | None) -> ProgressCallback:
    """A callback that writes loss, eval loss, learning rate and tokens/s to <output_dir>/runs, then calls on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError("tensorboard is not installed: pip install 'gpt-service[tensorboard]'") from exc
    writer = SummaryWriter(log_dir=str(output_dir / LOG_DIR), flush_secs=5)

    def report(progress: TrainingProgress) -> None:
        if progress.loss is not None:
            writer.add_scalar("train/loss", progress.loss, progress.step)
        if progress.evaluated and progress.eval_loss is not None:
            writer.add_scalar("eval/loss", progress.eval_loss, progress.step)
        writer.add_scalar("train/learning_rate", progress.learning_rate, progress.step)
        writer.add_scalar("train/tokens_per_second", progress.tokens_per_second, progress.step)
        if progress.step == progress.total_steps:
            writer.close()
        if on_progress:
            on_progress(progress)

    return report
