"""Loaded models by name. Base weights are loaded once per (base model, dtype) and shared.

A name is a base model alone or a base model plus one LoRA adapter. All adapters of one base live
in a single PEFT model, so ten adapters cost ten adapters' memory, and one `BatchEngine` serves
them all in shared batches. A base goes when its last name is unloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from gpt_service.config import QuantizationSettings
from gpt_service.hardware import bf16_available, default_device
from gpt_service.inference.engine import BatchEngine, EngineOptions
from gpt_service.inference.errors import AdapterMismatch, ModelExists, ModelNotLoaded
from gpt_service.model_loading import load_causal_lm, load_tokenizer
from gpt_service.model_sources import HUB_ID
from gpt_service.quantization import bitsandbytes_config, check_available

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if bf16_available(default_device()) else torch.float32
    return DTYPES[name]


def _identity(name_or_path: str) -> str:
    """A comparable name: the real path of a local folder (or of a hub id's cache snapshot), else the id."""
    path = Path(name_or_path)
    if path.is_dir():
        resolved = path.resolve()
        parts = resolved.parts
        if "snapshots" in parts and parts[parts.index("snapshots") - 1].startswith("models--"):
            return parts[parts.index("snapshots") - 1][len("models--"):].replace("--", "/")
        return str(resolved)
    return name_or_path


def check_adapter(adapter_dir: Path, base_source: str) -> None:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterMismatch(f"{adapter_dir} is not a LoRA adapter folder (it has no adapter_config.json)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterMismatch(
            f"{adapter_dir} has no adapter_model.safetensors; pickle weights are refused because loading "
            "them can run code"
        )
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if trained_on and _identity(trained_on) != _identity(base_source) and (
        Path(trained_on).is_dir() or HUB_ID.match(trained_on)
    ):
        raise AdapterMismatch(
            f"the adapter {adapter_dir} was trained on {trained_on}, not on {base_source}; "
            f"load it with model_path {trained_on!r}"
        )


@dataclass
class BaseModel:
    source: str
    dtype: torch.dtype
    model: Any  # the plain model, or the PeftModel holding every adapter once one is loaded
    tokenizer: Any
    weight_bytes: int
    quantization: str | None  # "4-bit nf4", "8-bit": loaded through bitsandbytes
    engine: BatchEngine = field(init=False)
    adapters: dict[str, str] = field(default_factory=dict)  # PEFT adapter name -> folder
    users: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ServedModel:
    name: str
    base: BaseModel
    adapter: str | None  # the PEFT adapter name
    adapter_path: str | None

    def describe(self) -> dict[str, Any]:
        adapter_bytes = 0
        if self.adapter:
            adapter_bytes = sum(p.numel() * p.element_size() for n, p in self.base.model.named_parameters()
                                if f".{self.adapter}." in n)
        running, waiting = self.base.engine.load
        return {"model_name": self.name, "base_model": self.base.source, "lora_adapter": self.adapter_path,
                "dtype": str(self.base.dtype).removeprefix("torch."), "quantization": self.base.quantization,
                "base_memory_bytes": self.base.weight_bytes,
                "adapter_memory_bytes": adapter_bytes, "shared_with": sorted(self.base.users - {self.name}),
                "running": running, "waiting": waiting,
                "context_length": context_length(self.base.model, self.base.tokenizer),
                "engine": dataclasses.asdict(self.base.engine.stats())}


def context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)


def _key(base: BaseModel) -> tuple[str, torch.dtype, str | None]:
    """Bases are shared by source, dtype and quantization."""
    return _identity(base.source), base.dtype, base.quantization


class ModelRegistry:
    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self._bases: dict[tuple[str, torch.dtype, str | None], BaseModel] = {}
        self._names: dict[str, ServedModel] = {}
        self._lock = threading.RLock()  # loads and unloads one at a time
        self._counter = 0

    def get(self, name: str) -> ServedModel:
        served = self._names.get(name)
        if served is None:
            known = ", ".join(sorted(self._names)) or "none"
            raise ModelNotLoaded(f"model {name!r} is not loaded (loaded: {known}); load it with POST /models/load")
        return served

    def list(self) -> list[ServedModel]:
        return list(self._names.values())

    def find(self, model_path: str, lora_adapter: str | None, dtype: str) -> ServedModel | None:
        """A loaded model on this base (same folder or hub id, same dtype, unquantized) with this adapter, if any."""
        wanted = (_identity(model_path), resolve_dtype(dtype), None, _identity(lora_adapter) if lora_adapter else None)
        return next((served for served in self._names.values()
                     if (*_key(served.base), _identity(served.adapter_path) if served.adapter_path else None)
                     == wanted), None)

    def load(self, name: str, model_path: str, lora_adapter: str | None, dtype: str = "auto",
             replace: bool = False, quantization: QuantizationSettings | None = None) -> ServedModel:
        """Load (or reuse) the base and add the adapter; blocking, so call it off the event loop.

        With `quantization`, the base is loaded in 4 or 8 bits (bitsandbytes), computing in `dtype`.
        """
        with self._lock:
            if name in self._names and not replace:
                raise ModelExists(f"a model named {name!r} is already loaded; unload it or pass replace: true")
            torch_dtype = resolve_dtype(dtype)
            if lora_adapter:
                check_adapter(Path(lora_adapter), model_path)
            key = (_identity(model_path), torch_dtype, quantization.describe() if quantization else None)
            base = self._bases.get(key) or self._load_base(model_path, torch_dtype, quantization)
            adapter = self._add_adapter(base, lora_adapter) if lora_adapter else None
            if name in self._names:
                self.unload(name)
            served = ServedModel(name, base, adapter, lora_adapter)
            base.users.add(name)
            self._names[name] = served
            log.info("loaded %s (%s%s)", name, model_path, f" + {lora_adapter}" if lora_adapter else "")
            return served

    def unload(self, name: str) -> None:
        """Forget the name at once; its adapter (and base) go once its running requests finish."""
        with self._lock:
            served = self.get(name)
            del self._names[name]
            base = served.base
            base.users.discard(name)
            if not base.users:
                del self._bases[_key(base)]
                threading.Thread(target=base.engine.close, name=f"unload-{name}", daemon=True).start()
            elif served.adapter:
                threading.Thread(target=self._retire_adapter, args=(base, served.adapter), daemon=True).start()

    def close(self) -> None:
        """Unload every model and wait for the engines to finish what runs: at shutdown no thread may still
        be at work on a model while the interpreter exits (a daemon thread freeing tensors then aborts the
        process: "terminate called without an active exception")."""
        with self._lock:
            bases = list(self._bases.values())
            self._names.clear()
            self._bases.clear()
        for base in bases:
            base.engine.close()

    def _load_base(self, model_path: str, dtype: torch.dtype, quantization: QuantizationSettings | None) -> BaseModel:
        device = default_device()
        if quantization:
            check_available(device.type)
        tokenizer = load_tokenizer(model_path)
        model = load_causal_lm(model_path, dtype, device,
                               quantization=bitsandbytes_config(quantization, dtype) if quantization else None)
        model.eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tokenizer.eos_token_id}
        weight_bytes = model.get_memory_footprint()
        base = BaseModel(model_path, dtype, model, tokenizer, weight_bytes,
                         quantization.describe() if quantization else None)
        base.engine = BatchEngine(lambda: base.model, tokenizer, eos_ids, self.options, name=Path(model_path).name)
        self._bases[_key(base)] = base
        return base

    def _add_adapter(self, base: BaseModel, folder: str) -> str:
        self._counter += 1
        adapter = f"adapter_{self._counter}"
        with base.engine.model_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            try:
                if isinstance(base.model, PeftModel):
                    base.model.load_adapter(folder, adapter_name=adapter)
                else:
                    base.model = PeftModel.from_pretrained(base.model, folder, adapter_name=adapter)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise AdapterMismatch(f"the adapter {folder} does not fit {base.source}: {exc}") from exc
            base.model.eval()
        base.adapters[adapter] = folder
        return adapter

    @staticmethod
    def _retire_adapter(base: BaseModel, adapter: str) -> None:
        """Delete an adapter once no running or waiting request uses it."""
        while base.engine.uses_adapter(adapter):
            threading.Event().wait(0.05)
        with base.engine.model_lock:
            if len(base.adapters) == 1:  # the last adapter: back to the plain model
                base.model = base.model.unload()
            else:
                base.model.delete_adapter(adapter)
            base.adapters.pop(adapter, None)
