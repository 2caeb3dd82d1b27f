"""Where to compute and in which precision, from what the hardware can do."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gpt_service.memory import free_memory

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



def available_memory(device: torch.device) -> int:
    """Bytes a new allocation on `device` can take now: a GPU's free memory; on the CPU, what the
    machine has available, bounded by the container's cgroup limit (`memory.free_memory`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_memory()
