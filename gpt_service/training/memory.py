"""Will it fit? The memory a training run needs, and the memory it has, before it starts.

The parts, for one training process:
- the frozen base: every parameter counted on a model built on PyTorch's meta device (no memory,
  no weights read), at the weights' dtype, or at bitsandbytes' 4 or 8 bits (plus their scales) for
  the linear layers of a quantized base;
- the LoRA weights, their gradients and AdamW's two moments: 16 bytes a LoRA parameter;
- the activations kept for the backward pass at the run's longest micro-batch: measured, not
  guessed, by a probe that runs one and two decoder layers of the real width (a tiny vocabulary,
  the run's LoRA, precision and fast paths) and records what autograd saves; the difference is one
  layer's bytes per token (plus the attention's scores, which grow with the length, where our CPU
  attention keeps them). With activation checkpointing, each layer keeps only its input, and one
  layer's activations exist at a time, during its recompute;
- the output head and loss: a few blocks of logits for the fused head loss, the whole
  (tokens x vocabulary) logits, upcast, and their gradient otherwise;
- what a training process holds before any model (Python, PyTorch, transformers, the data).
The probe times its layers too, which gives the ETA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from gpt_service.config import ConfigError, QuantizationSettings, TrainConfig
from gpt_service.data.batching import PAD_TO_MULTIPLE_OF, epoch_batches, round_up
from gpt_service.errors import UserError
from gpt_service.hardware import Precision, available_memory, choose_precision
from gpt_service.model_sources import ModelSourceError, resolve_model_source
from gpt_service.training.allocator import wanted_library
from gpt_service.training.loss import BLOCK_ELEMENTS
from gpt_service.training.speedups import MATMUL_ATTENTION_MAX_SCORES, speed_up

GB = 1 << 30
# What a training process holds before its model, measured on a CPU (RSS after importing torch,
# transformers, peft and our recipe: 0.47 GB) plus room for the tokenizer and the glibc arenas.
RUNTIME_BYTES = int(0.75 * GB)
# Bytes per parameter of a quantized linear layer: 4 bits plus a 64-block's fp32 scale (quantized
# again to 8 bits with double quantization), or 8 bits plus a row's scale.
QUANTIZED_BYTES = {(4, True): 0.5 + 1 / 64 + 4 / (64 * 256), (4, False): 0.5 + 4 / 64, (8, True): 1.0, (8, False): 1.0}
# Backward-pass room beyond what autograd saved: the gradients flowing through the layer being
# differentiated, about one layer's activations again.
BACKWARD_ROOM = 1.0
# What the allocator holds beyond the saved activations' bytes (freed blocks it cannot give back,
# tensors freed late), measured against peak RSS at a Qwen2-0.5B shape (bench/train_memory.py):
# 15% under glibc's malloc; none under tcmalloc, which our training processes preload where it is
# installed (training/allocator.py). Devices' caching allocators are taken as glibc's.
ACTIVATION_SLACK = {"glibc": 1.15, "tcmalloc": 1.0}
PROBE_LENGTHS = (64, 128)


class DoesNotFit(UserError):
    """A run that needs more memory than the machine has, even with every saving on."""


@dataclass(frozen=True)
class LayerProbe:
    """One decoder layer, measured: activation bytes per token (at length 0, and per token of length)."""

    bytes_per_token: float  # kept for the backward, independent of the length
    attention_bytes_per_token_per_position: float  # the attention's scores (our CPU attention keeps them)
    checkpointed_bytes_per_token: float  # with activation checkpointing: the layer's input
    other_bytes_per_token: float  # outside the layers: embeddings, the head's input
    seconds_per_token: float  # forward and backward


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each part needs, per training process, and the memory there is."""

    device: str
    processes: int
    quantization: str | None
    gradient_checkpointing: bool
    longest_batch: tuple[int, int]  # (rows, positions) of the largest micro-batch
    weights_bytes: int
    lora_bytes: int
    activations_without_checkpointing_bytes: int
    activations_with_checkpointing_bytes: int
    head_bytes: int
    runtime_bytes: int
    loading_bytes: int  # while a quantized base loads on a CPU: its mapped checkpoint file, the runtime
    smallest_bytes: int  # the peak with checkpointing and a 4-bit base: the least this run can take
    available_bytes: int
    total_steps: int
    eta_seconds: float | None

    def activations(self, checkpointing: bool | None = None) -> int:
        """The activations' bytes, with checkpointing as chosen or as asked."""
        chosen = self.gradient_checkpointing if checkpointing is None else checkpointing
        return self.activations_with_checkpointing_bytes if chosen else self.activations_without_checkpointing_bytes

    def peak(self, checkpointing: bool | None = None) -> int:
        """The peak of one process, with checkpointing as chosen or as asked."""
        training = (self.weights_bytes + self.lora_bytes + self.activations(checkpointing) + self.head_bytes
                    + self.runtime_bytes)
        return max(training, self.loading_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.peak()

    def needed(self, peak: int | None = None) -> int:
        """All processes of a CPU run share the machine's memory; each GPU process has its own device."""
        return (self.peak_bytes if peak is None else peak) * (self.processes if self.device == "cpu" else 1)

    def refuse_beyond(self, memory: int, where: str) -> None:
        """Raise `DoesNotFit` when even checkpointing and a 4-bit base need more than `memory` bytes."""
        rows, positions = self.longest_batch
        refuse_beyond(self.needed(self.smallest_bytes), memory, where, f"its longest batch: {rows} x {positions} "
                      "tokens; a lower batch_size or max_length needs less")

    @property
    def fits(self) -> bool:
        return self.needed() <= self.available_bytes

    def as_dict(self) -> dict[str, Any]:
        fields = {**asdict(self), "activations_bytes": self.activations()}
        fields["longest_batch"] = list(self.longest_batch)
        gb = {k.removesuffix("_bytes") + "_gb": round(v / GB, 6) for k, v in fields.items() if k.endswith("_bytes")}
        others = {k: v for k, v in fields.items() if not k.endswith("_bytes")}
        return {**others, **gb, "peak_gb": round(self.peak_bytes / GB, 6), "needed_gb": round(self.needed() / GB, 6),
                "least_needed_gb": round(self.needed(self.smallest_bytes) / GB, 6), "fits": self.fits}


def _meta_model(model_config: Any) -> Any:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(model_config)


def _linear_names(model: Any) -> set[str]:
    """The quantizable linear layers: bitsandbytes skips the output head."""
    head = model.get_output_embeddings()
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def weights_bytes(model: Any, dtype: torch.dtype, config: TrainConfig) -> int:
    """The frozen base's bytes: each parameter once (tied ones too), quantized where it will be."""
    quantization = config.quantization
    size = torch.tensor([], dtype=dtype).element_size()
    parameters = dict(model.named_parameters())  # a tied parameter once
    full = sum(p.numel() for p in parameters.values()) * size
    if quantization is None:
        return full
    layers = _linear_names(model)
    linear = sum(p.numel() for n, p in parameters.items() if n.endswith(".weight") and n.rpartition(".")[0] in layers)
    return int(full - linear * size + linear * QUANTIZED_BYTES[quantization.bits, quantization.double_quant])


def _largest_shard(source: str) -> int:
    """Bytes of the biggest safetensors file of a local model: a quantized load reads one whole."""
    return max((f.stat().st_size for f in Path(source).glob("*.safetensors")), default=0)


def lora_parameters(model: Any, config: TrainConfig) -> int:
    """The LoRA parameters PEFT would add to `model` (a meta model: nothing is allocated)."""
    lora = config.lora_config
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
                r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules, bias=lora.bias))
    except ValueError as exc:  # target modules the model does not have
        raise ConfigError(f"lora_config.target_modules: {exc}") from exc
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def _probe_config(model_config: Any, layers: int) -> Any:
    probe = copy.deepcopy(model_config)
    probe.num_hidden_layers = layers
    for key in ("layer_types", "sliding_window_pattern"):  # per-layer lists follow the layer count
        value = getattr(probe, key, None)
        if isinstance(value, list) and value:
            setattr(probe, key, [value[i % len(value)] for i in range(layers)])  # a 1-layer model: 2
    probe.vocab_size = 256
    probe.use_cache = False
    return probe


@contextlib.contextmanager
def _saved_bytes(parameters: set[int]) -> Iterator[list[int]]:
    """Count the bytes autograd saves for the backward inside the block, each storage once, parameters aside."""
    seen: dict[int, int] = {}
    total = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
    total[0] = sum(seen.values())


def _run_probe(model_config: Any, config: TrainConfig, precision: Precision, layers: int,
               checkpointing: bool) -> list[tuple[int, float]]:
    """(saved bytes, seconds) of one forward and backward at each probe length, `layers` layers."""
    from gpt_service.training.loss import summed_token_loss

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_config(_probe_config(model_config, layers), dtype=precision.weights_dtype)
        lora = config.lora_config
        model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, bias=lora.bias,
                                                target_modules=lora.target_modules, lora_dropout=lora.lora_dropout))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if config.fast_paths:
        speed_up(model, precision, checkpointing)
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    model.to(precision.device).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = (torch.autocast(precision.device.type, dtype=precision.autocast_dtype) if precision.autocast_dtype
                else contextlib.nullcontext())
    results = []
    for length in PROBE_LENGTHS:
        ids = torch.randint(0, 256, (1, length), device=precision.device)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        started = time.perf_counter()
        with _saved_bytes(parameters) as saved, autocast:
            summed, _ = summed_token_loss(model, batch)
        summed.backward()
        results.append((saved[0], time.perf_counter() - started))
    return results


def probe_layer(model_config: Any, config: TrainConfig, precision: Precision) -> LayerProbe:
    """Measure one decoder layer of the real width: what it keeps per token, and how long it takes.

    In a forked random state: the run that asks must draw its LoRA weights and dropout masks as if
    no probe had run.
    """
    devices = [precision.device] if precision.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        one, two = (_run_probe(model_config, config, precision, n, checkpointing=False) for n in (1, 2))
        one_ckpt, two_ckpt = (_run_probe(model_config, config, precision, n, checkpointing=True) for n in (1, 2))
    (short, long_) = PROBE_LENGTHS
    layer = [(b2 - b1) / length for (b1, _), (b2, _), length in zip(one, two, PROBE_LENGTHS, strict=True)]
    per_position = max((layer[1] - layer[0]) / (long_ - short), 0.0)
    constant = layer[1] - per_position * long_
    seconds = two[1][1] / (2 * long_)  # the head's share rides along
    return LayerProbe(
        bytes_per_token=max(constant, 0.0), attention_bytes_per_token_per_position=per_position,
        checkpointed_bytes_per_token=(two_ckpt[1][0] - one_ckpt[1][0]) / long_,
        other_bytes_per_token=max(one[1][0] / long_ - layer[1], 0.0), seconds_per_token=seconds,
    )


def _attention_keeps_scores(rows: int, positions: int, model_config: Any, precision: Precision,
                            config: TrainConfig) -> bool:
    """Whether our CPU attention (which keeps the scores) runs at this shape; SDPA keeps none."""
    heads = getattr(model_config, "num_attention_heads", 1)
    return (config.fast_paths and precision.device.type == "cpu"
            and rows * heads * positions * positions <= MATMUL_ATTENTION_MAX_SCORES)


def head_fuses(model_config: Any) -> bool:
    """Whether the fused head loss will run (loss.py checks it on the model; here, from the config alone):
    not for families whose logits are soft-capped or scaled (Gemma 2, Granite, Cohere)."""
    return (not getattr(model_config, "final_logit_softcapping", None)
            and all(getattr(model_config, name, None) in (None, 1.0) for name in ("logits_scaling", "logit_scale")))


def head_bytes(model_config: Any, rows: int, positions: int, precision: Precision, fused: bool) -> int:
    """The output head's working memory: the fused head loss's block of logits (in the compute dtype,
    upcast, and its gradient) and the hidden states it reads, or else the whole logits likewise."""
    tokens, vocab = rows * positions, model_config.vocab_size
    compute = 2 if precision.autocast_dtype else 4
    logits = min(tokens * vocab, BLOCK_ELEMENTS) if fused else tokens * vocab
    return int(logits * (compute + 4 + 4) + 2 * tokens * model_config.hidden_size * compute)


def longest_batch(lengths: list[int], config: TrainConfig) -> tuple[int, int]:
    """(rows, padded positions) of the run's largest micro-batch, as the data order will make them."""
    batches = epoch_batches(lengths, config.batch_size, config.seed, 0)
    widest = max(batches, key=lambda batch: len(batch) * max(lengths[i] for i in batch))
    return len(widest), round_up(max(lengths[i] for i in widest), PAD_TO_MULTIPLE_OF)


def _model_config(config: TrainConfig) -> tuple[str, Any]:
    """(where the model is, its configuration), read without its weights."""
    source, local_only = resolve_model_source(config.base_model)
    try:
        return source, AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read the configuration of {config.base_model}: {exc}") from exc


def refuse_beyond(least: int, memory: int, where: str, what: str) -> None:
    """Raise `DoesNotFit` when `least` bytes (what no setting goes under) exceed `memory`."""
    if least > memory:
        raise DoesNotFit(
            f"this run needs at least {least / GB:.1f} GB even with gradient_checkpointing and a 4-bit base "
            f"({what}), but {where} has {memory / GB:.1f} GB; use a machine with more memory, a smaller "
            "model, or several processes with distributed: fsdp")


def _at_least_four_bit(config: TrainConfig) -> TrainConfig:
    """The run with a 4-bit base, unless it is quantized already."""
    return config if config.quantization else config.model_copy(update={"quantization": QuantizationSettings()})


def least_bytes(config: TrainConfig) -> int:
    """A floor no setting goes under, found without the data or a probe (so at once): the base in
    4 bits (or as quantized), the LoRA state and the runtime, for all processes of a CPU run."""
    precision = choose_precision(config.fp16, config.bf16)
    _, model_config = _model_config(config)
    meta = _meta_model(model_config)
    least = (RUNTIME_BYTES + weights_bytes(meta, precision.weights_dtype, _at_least_four_bit(config))
             + 16 * lora_parameters(meta, config))
    return least * (config.num_processes if precision.device.type == "cpu" else 1)


def estimate_memory(config: TrainConfig, lengths: list[int] | None = None,
                    device: torch.device | None = None) -> MemoryEstimate:
    """The memory `config` needs per process and the memory available, with an ETA from a probe.

    `lengths`: the training samples' token counts; read (and cached) from the dataset when omitted.
    """
    precision = choose_precision(config.fp16, config.bf16)
    device = device or precision.device
    source, model_config = _model_config(config)
    if lengths is None:
        lengths = _dataset_lengths(config)
    meta = _meta_model(model_config)
    lora_bytes = 16 * lora_parameters(meta, config)  # first: it names target modules the model lacks
    layers = model_config.num_hidden_layers
    rows, positions = longest_batch(lengths, config)
    tokens = rows * positions
    probe = probe_layer(model_config, config, precision)
    per_layer = probe.bytes_per_token
    if _attention_keeps_scores(rows, positions, model_config, precision, config):
        per_layer += probe.attention_bytes_per_token_per_position * positions
    last_layer = tokens * per_layer * (1 + BACKWARD_ROOM)  # kept (or recomputed), and its gradients
    outside = tokens * probe.other_bytes_per_token
    slack = ACTIVATION_SLACK["tcmalloc" if device.type == "cpu" and wanted_library() else "glibc"]
    plain = int(((layers - 1) * tokens * per_layer + last_layer + outside) * slack)
    checkpointed = int((layers * tokens * probe.checkpointed_bytes_per_token + last_layer + outside) * slack)
    fused = config.fast_paths and head_fuses(model_config)
    steps_per_epoch = math.ceil(math.ceil(len(lengths) / (config.batch_size * config.num_processes))
                                / config.gradient_accumulation_steps)
    available = available_memory(device)
    weights = weights_bytes(meta, precision.weights_dtype, config)
    head = head_bytes(model_config, rows, positions, precision, fused)
    fixed = weights + lora_bytes + head + RUNTIME_BYTES
    processes = config.num_processes if device.type == "cpu" else 1
    chosen = config.gradient_checkpointing
    if chosen is None:  # keep the activations where they fit, with a tenth of the memory to spare
        chosen = (fixed + plain) * processes > 0.9 * available
    slowdown = 4 / 3 if chosen else 1.0  # the recompute: one more forward pass
    eta = sum(lengths) * config.num_epochs * layers * probe.seconds_per_token * slowdown / config.num_processes
    least_weights = weights_bytes(meta, precision.weights_dtype, _at_least_four_bit(config))
    return MemoryEstimate(
        device=device.type, processes=config.num_processes,
        quantization=config.quantization.describe() if config.quantization else None,
        gradient_checkpointing=chosen, longest_batch=(rows, positions),
        weights_bytes=weights, lora_bytes=lora_bytes,
        activations_without_checkpointing_bytes=plain, activations_with_checkpointing_bytes=checkpointed,
        head_bytes=head, runtime_bytes=RUNTIME_BYTES,
        loading_bytes=RUNTIME_BYTES + _largest_shard(source) if config.quantization and device.type == "cpu" else 0,
        smallest_bytes=fixed - weights + least_weights + checkpointed,
        available_bytes=available, total_steps=steps_per_epoch * config.num_epochs, eta_seconds=round(eta, 1),
    )


def _dataset_lengths(config: TrainConfig) -> list[int]:
    from gpt_service.data.prepare import prepare_data
    from gpt_service.model_loading import load_tokenizer

    return list(prepare_data(config, load_tokenizer(config.base_model)).train.lengths)

