"""Checkpoints that are either whole or absent.

A checkpoint is written into a hidden temporary folder, flushed to disk, then renamed to
`checkpoint-<step>` in one atomic step: a crash mid-save leaves the previous checkpoint as the
newest, never a half-written one. The same holds for the published `lora_adapter`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt_service.errors import UserError

DISK_FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from."""


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh hidden folder beside `target`, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        try:
            write(tmp)
            _fsync_tree(tmp)
        except Exception as exc:
            if shutil.disk_usage(target.parent).free < DISK_FULL_BYTES:
                # torch's zip writer reports a full disk as "unexpected pos ..."; say what happened.
                raise OSError(errno.ENOSPC, f"No space left on device while writing {target}") from exc
            raise
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove_unfinished_writes(output_dir: Path) -> None:
    """Delete the hidden temporary folders a killed run left behind; they were never published."""
    if output_dir.is_dir():
        for debris in output_dir.glob(".*.tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """`latest` (None when there is none yet) or a given checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{spec} is not a checkpoint folder (it has no {STATE_FILE})")
    return path


def save_checkpoint(
    output_dir: Path, step: int, write_adapter: Callable[[Path], None], optimizer_state: dict[str, Any],
    scheduler: Any, state: dict[str, Any], keep: int | None,
) -> Path:
    """Write adapter, optimizer, scheduler, RNG and data position; keep the newest `keep`.

    `write_adapter(folder)` writes the PEFT files; `optimizer_state` is whole (gathered from every
    process), so that a checkpoint resumes with any number of processes.
    """

    def write(folder: Path) -> None:
        write_adapter(folder)
        torch.save(optimizer_state, folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng_state.pt")
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))

    path = publish_atomically(output_dir / f"checkpoint-{step}", write)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The checkpoint's step, data position and history (trainer_state.json)."""
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc


def load_checkpoint(path: Path, scheduler: Any) -> dict[str, Any]:
    """Restore the scheduler and RNG from `path`; return the optimizer state for the caller to load.

    The adapter weights and the optimizer state are loaded by the caller (it owns the PEFT model
    and knows how it is sharded). Every file is read with `weights_only=True`: a checkpoint cannot
    run code.
    """
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng_state.pt", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from exc
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return optimizer_state
