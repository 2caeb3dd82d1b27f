"""A frozen base loaded in 4 or 8 bits through bitsandbytes (QLoRA), for training and serving alike.

bitsandbytes runs on CUDA GPUs and, since 0.46, on x86 CPUs; this module says why it cannot
before anything is loaded, and builds transformers' `BitsAndBytesConfig` from our settings.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from gpt_service.config import QuantizationSettings
from gpt_service.errors import UserError

# The first bitsandbytes release with a CPU backend for 4- and 8-bit layers.
CPU_SINCE = (0, 46)


class QuantizationError(UserError):
    """Quantization asked of a machine or an installation that cannot do it."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def unavailable_reason(device_type: str | None = None) -> str | None:
    """Why quantization cannot run here (on `device_type` when known), or None when it can."""
    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return ("quantization needs the bitsandbytes package, which is not installed: "
                "pip install 'bitsandbytes>=0.46' (or drop the quantization block)")
    if device_type == "cpu" and _version(version) < CPU_SINCE:
        return (f"bitsandbytes {version} has no CPU backend (it came with 0.46): "
                "pip install -U 'bitsandbytes>=0.46', or train on a CUDA GPU")
    if device_type not in (None, "cpu", "cuda"):
        return f"bitsandbytes does not run on a {device_type} device here; use a CUDA GPU or the CPU"
    return None


def check_available(device_type: str | None = None) -> None:
    reason = unavailable_reason(device_type)
    if reason:
        raise QuantizationError(reason)


def bitsandbytes_config(settings: QuantizationSettings, compute_dtype: Any) -> Any:
    """transformers' `BitsAndBytesConfig` for `settings`, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.type,
                              bnb_4bit_use_double_quant=settings.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def keep_trainable_layout(model: Any) -> Any:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during a training run.

    On a CPU with AVX-512 BF16, a `Linear4bit` that runs a forward pass in eval mode without
    gradients (an evaluation, or the fused head's one-time check) rewrites its weight in place into
    a layout for inference only; the training steps after it then fail ("a view of a leaf Variable
    that requires grad is being used in an in-place operation"). Training keeps the layout it loaded.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
