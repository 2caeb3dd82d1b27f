"""Where to compute and in which precision, from what the hardware can do."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    device: torch.device
    weights_dtype: torch.dtype  # the frozen base weights
    autocast_dtype: torch.dtype | None  # None: plain fp32 compute
    grad_scaler: bool  # fp16 needs loss scaling
    warning: str | None = None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work runs several times faster than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def choose_precision(fp16: bool = False, bf16: bool | None = None) -> Precision:
    """fp16 with a grad scaler on CUDA; bf16 where fast (or asked); fp32 otherwise."""
    device = default_device()
    warning = None
    if fp16 and device.type == "cuda":
        return Precision(device, torch.float16, torch.float16, grad_scaler=True)
    if fp16:
        fallback = "bf16" if bf16_available(device) else "fp32"
        warning = f"fp16 mixed precision needs a CUDA GPU; this machine has none, so training uses {fallback}"
        bf16 = bf16 is not False and fallback == "bf16"
    if bf16 is None:
        bf16 = bf16_available(device)
    if bf16:
        return Precision(device, torch.bfloat16, torch.bfloat16, grad_scaler=False, warning=warning)
    return Precision(device, torch.float32, None, grad_scaler=False, warning=warning)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still take (limit minus usage), v2 or v1; None without a limit."""
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        most, used = _read_int(limit), _read_int(usage)
        if most is not None and used is not None and most < 1 << 60:  # v1 writes "no limit" as a huge number
            return max(most - used, 0)
    return None


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation on `device` can take now: a GPU's free memory; on the CPU, MemAvailable
    capped by what the container's cgroup limit leaves (a container sees the host's /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    room = _cgroup_room()
    available = _mem_available()
    return available if room is None else min(available, room)
