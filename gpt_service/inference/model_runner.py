"""Running one scheduled step through the model: the paged forward, or the model's own forward.

`PagedRunner` serves the architectures `FastDecoder` knows: prompt chunks and decode tokens in one
forward over the block pool. `ContiguousRunner` serves every other model through its own forward
(PEFT's mixed-adapter forward, `adapter_names`), with transformers' `DynamicCache`: the families
it covers differ in their attention (soft-capped logits, sliding windows, QK norms, partial
rotary, learned positions), which only their own code gets right, and their code reads only a
transformers `Cache`. A `Cache` over the block pool would have to gather every layer's blocks
into contiguous tensors at every step anyway, so this runner keeps the batch's cache contiguous
and left-padded (each row's own keys and values, the padding masked); its prompts are prefilled
whole, and the scheduler still admits by the KV blocks they would take.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from gpt_service.inference import cpu_kernels
from gpt_service.inference.fast_decoder import FastDecoder
from gpt_service.inference.paged import KVPool, PagedBatch
from gpt_service.inference.sequence import Sequence

Work = list[tuple[Sequence, int]]


class PagedRunner:
    """Steps of a model `FastDecoder` knows, over a block pool that outlives adapter changes."""

    chunked = True  # feeds prompts in chunks; the pool keeps what a sequence computed

    def __init__(self, decoder: FastDecoder, num_blocks: int, block_size: int, kernels: bool) -> None:
        self.decoder = decoder
        self.pool: KVPool = decoder.pool(num_blocks, block_size)
        # the C++ operators where the pool is on the CPU, else PyTorch's
        self.kernels = kernels and self.pool.keys[0].device.type == "cpu" and cpu_kernels.available()

    def execute(self, work: Work) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences fed to their end this step, and their next-token logits (float32, [sequences, vocab])."""
        device = self.decoder.lm_head.weights[0].device
        batch = PagedBatch.of(work, self.pool.block_size, device, self.kernels)
        return [seq for seq, n in work if seq.computed + n == len(seq.tokens)], self.decoder.forward(batch, self.pool)

    def release(self, seqs: list[Sequence]) -> None:
        """Nothing to do: a sequence's blocks go back through the KV cache manager."""


@functools.cache
def _cache_keyword_of(forward: Callable[..., Any]) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_keyword(model: Any) -> str:
    """The KV-cache argument's name: `cache` where the forward takes it (transformers 5.24), else `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base).forward)


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


class ContiguousRunner:
    """Steps through the model's own forward, the batch's cache one left-padded `DynamicCache`."""

    chunked = False

    def __init__(self, model_ref: Callable[[], Any]) -> None:
        self.model_ref = model_ref
        self.rows: list[Sequence] = []  # in the cache's row order
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def execute(self, work: Work) -> tuple[list[Sequence], torch.Tensor]:
        """Decode the batch's rows, then prefill the new sequences whole and add them to the batch."""
        joining = [seq for seq, _ in work if seq.computed == 0]
        assert len(joining) + len(self.rows) == len(work), "every row of the batch decodes at every step"
        decoded, logits = list(self.rows), []
        if self.rows:
            logits.append(self._decode())
        if joining:
            logits.append(self._prefill(joining))
        return decoded + joining, torch.cat(logits)

    def release(self, seqs: list[Sequence]) -> None:
        """The sequences leave the batch; all-padding columns go too."""
        gone = {id(seq) for seq in seqs}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep)
        self.mask = self.mask[index]
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.rows = [self.rows[i] for i in keep]

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, adapters: list[str]) -> torch.Tensor:
        model = self.model_ref()
        kwargs: dict[str, Any] = {}
        if hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapters
        device = model.device
        # The last position of a longer input is a strided slice; torch multiplies such a 3-d slice by
        # a frozen weight by expanding the weight once per row (a 16-row bf16 prefill took over a
        # second in the output layer alone), so the output layer is handed a contiguous copy.
        head = model.get_output_embeddings() if input_ids.shape[1] > 1 else None
        hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
        kwargs[_cache_keyword(model)] = cache
        try:
            out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        return out.logits[:, -1].float().cpu()

    def _prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.tokens) for seq in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)  # padding: any id, masked
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            n = len(seq.tokens)
            ids[i, width - n:] = torch.tensor(seq.tokens)
            mask[i, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [seq.adapter for seq in seqs])
        self._merge(seqs, cache, mask)
        return logits

    def _decode(self) -> torch.Tensor:
        rows = self.rows
        assert self.mask is not None and self.cache is not None
        last = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.long)
        positions = torch.tensor([len(row.tokens) - 1 for row in rows], dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        return self._forward(last[:, None], self.mask, positions[:, None], self.cache, [row.adapter for row in rows])

    def _merge(self, rows: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        assert self.mask is not None
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = torch.nn.functional.pad(a, (0, 0, width - old_len, 0))
                b = torch.nn.functional.pad(b, (0, 0, width - new_len, 0))
                setattr(old_layer, attr, torch.cat([a, b], dim=0))
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (width - old_len, 0)),
                               torch.nn.functional.pad(mask, (width - new_len, 0))], dim=0)
        self.rows = self.rows + rows
